"""Questions with gold answers, evaluation sets, and reading QA files.

`QA` and `EvalSet` are the one definition shared by every evaluation data source
(synthetic corpora, SQuAD, HotpotQA, user-supplied JSONL files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvcompile.errors import CorpusError

# Rough tokens per whitespace-separated word for English prose with BPE tokenisers;
# good enough to size corpora without loading a tokenizer.
TOKENS_PER_WORD = 1.3


@dataclass(frozen=True)
class QA:
    """One question with its gold answers.

    ``answers`` are short spans; the first is the canonical one. ``doc`` is the path of
    the document that holds the answer, or None when it is spread over several.
    """

    id: str
    question: str
    answers: tuple[str, ...]
    doc: str | None = None


@dataclass(frozen=True)
class EvalSet:
    """A corpus, as (path, text) documents in order, and the questions asked about it."""

    name: str
    documents: list[tuple[str, str]]
    questions: list[QA]


def approx_tokens(text: str) -> int:
    """Estimate the token count of ``text`` as words * 1.3 (no tokenizer needed)."""
    return round(len(text.split()) * TOKENS_PER_WORD)


def read_qa_jsonl(path: str | Path) -> list[QA]:
    """Read questions from a JSONL file, one JSON object per line.

    Each line holds ``{"question": str, "answers": [str, ...]}`` (or ``"answer": str``),
    optionally ``"id"`` (default ``"q<line number>"``) and ``"doc"``. Blank lines are
    skipped. Raises `CorpusError`, naming the line, on a missing or empty file, invalid
    JSON, a missing or empty question or answer, or a repeated id.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"QA file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read QA file {path}: {exc}") from exc

    questions: list[QA] = []
    seen_ids: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{where}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise CorpusError(f"{where}: expected a JSON object with 'question' and 'answers'")

        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise CorpusError(f"{where}: missing or empty 'question'")
        answers = _answers_of(row, where)

        qid = str(row["id"]) if row.get("id") is not None else f"q{number}"
        if qid in seen_ids:
            raise CorpusError(f"{where}: duplicate id {qid!r}")
        seen_ids.add(qid)

        doc = row.get("doc")
        if doc is not None and not isinstance(doc, str):
            raise CorpusError(f"{where}: 'doc' must be a string path")
        questions.append(QA(id=qid, question=question.strip(), answers=answers, doc=doc))

    if not questions:
        raise CorpusError(f"QA file is empty: {path}")
    return questions


def _answers_of(row: dict, where: str) -> tuple[str, ...]:
    """The gold answers of one JSONL row, from "answers" (a list) or "answer" (a string)."""
    if "answers" in row:
        raw = row["answers"]
        # A bare string under "answers" is a common slip; accept it as one answer.
        if isinstance(raw, str):
            raw = [raw]
    elif "answer" in row:
        raw = [row["answer"]]
    else:
        raise CorpusError(f"{where}: missing 'answers' (a list of strings) or 'answer'")
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise CorpusError(f"{where}: 'answers' must be a list of strings")
    answers = tuple(a.strip() for a in raw if a.strip())
    if not answers:
        raise CorpusError(f"{where}: 'answers' is empty")
    return answers
