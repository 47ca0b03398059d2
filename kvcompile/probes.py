"""Probes written from the corpus: ``build --auto-probes N``.

A recipe's probes are generic to its task ("How much does the paid plan cost?"); the
questions a pack will really be asked are about *this* corpus. Before compiling, the
model reads the corpus and writes ``N`` sample questions in the recipe's style, which
join the task prompt (the "few-shot" task prompt of the Beyond RAG paper, which scored
best there, with examples drawn from the documents themselves).

How, exactly (every step deterministic, so two builds of the same inputs write the
same probes and the same pack):

1. Every document is cut into chunks of at most :data:`CHUNK_CHARS` characters, at a
   paragraph, line or word break (never across documents, so a chunk's text depends on
   its document only). When the corpus has fewer chunks than ``N``, the chunks are
   halved until it has enough (or they reach :data:`MIN_CHUNK_CHARS`).
2. ``N`` chunks are chosen spread evenly over the corpus: chunk ``floor((2i + 1) T / 2N)``
   of the ``T`` chunks, for ``i < N`` (at most one probe per chunk).
3. For each, one short prompt: the recipe's first :data:`MAX_EXAMPLES` probe questions
   as examples (or, for a recipe without probes, its task description), the chunk (at
   most :data:`CHUNK_TOKENS` tokens), and a request for one question that it answers; in
   the model's chat template when it has one, the reply primed with ``Question:``.
   Greedy decoding with the plain model, at most ``max_new_tokens`` tokens, stopped at
   the first ``?`` or line break.
4. The question is cleaned (a leading ``Question:``, list marker or quote dropped), and
   questions that are empty or repeat a probe already there add nothing to the task prompt.

Each probe is recorded in the pack's header with the document it was written from, the
SHA-256 of its chunk's text and a *key*: the SHA-256 of the model's fingerprint, the
generation prompt's token ids and the generation settings. A rebuild takes from the
previous pack every probe whose key is unchanged, without running the model; only a
probe whose chunk (or the recipe's examples, or the model) changed is written again.
Since the probes are part of the task prompt, and the task prompt is part of every
segment's key, any change to the probes recompiles every document.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpus import Document
from .errors import OptionError, PackError
from .recipe import Recipe

MAX_AUTO_PROBES = 1024  # a pack records at most 4,096 probes in all (format spec, section 8)
CHUNK_CHARS = 1200  # about 300 tokens of English: a generation prompt stays cheap on a CPU
MIN_CHUNK_CHARS = 200
CHUNK_TOKENS = 384  # the most tokens of a chunk that go into a prompt, whatever its script
MAX_NEW_TOKENS = 32
MAX_EXAMPLES = 4  # the recipe's probes shown as examples, the first ones
MAX_QUESTION_CHARS = 500
PROMPT_VERSION = 1  # part of every probe's key: bump when the prompt below changes

SYSTEM = "You write short questions about documents."
_EXAMPLES = "Questions like these are asked about a set of documents:\n{examples}"
_TASK = "The questions asked about a set of documents are described here:\n{description}"
_REQUEST = ("Here is a passage from one of the documents:\n\"\"\"\n{text}\n\"\"\"\n\n"
            "Write a question that a reader could ask about this passage and that the passage answers.")
_ANSWER_LEAD = "Question:"  # the reply starts with it, so that it is a question at once
_LEAD = re.compile(r"^\s*(?:(?:question|q)\s*:|[-*•](?=\s)|\d{1,2}[.)](?=\s))\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Chunk:
    """A piece of one document that a probe is written from."""

    document: str  # the document's path
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AutoProbe:
    """One written probe, as the pack's header records it (``recipe.auto_probes``)."""

    question: str  # "" when the model wrote nothing usable
    document: str  # the path of the document it was written from
    sha256: str  # of the chunk's text
    key: str  # of model fingerprint, generation prompt and settings: what reuse matches

    def to_json(self) -> dict:
        return {"question": self.question, "document": self.document, "sha256": self.sha256, "key": self.key}


@dataclass(frozen=True)
class AutoProbes:
    """The probes of one build: ``n`` asked for, one entry per chosen chunk."""

    n: int
    probes: tuple[AutoProbe, ...]
    generated: int = 0  # how many were written by the model in this build (the rest were reused)

    @property
    def questions(self) -> list[str]:
        """The distinct, non-empty questions, in order."""
        return list(dict.fromkeys(p.question for p in self.probes if p.question))

    @property
    def reused(self) -> int:
        return len(self.probes) - self.generated

    def extend(self, recipe: Recipe) -> Recipe:
        """``recipe`` with these questions after its own probes (those it already has add nothing)."""
        return recipe.with_probes(self.questions)

    def to_json(self) -> list[dict]:
        return [p.to_json() for p in self.probes]


def check_scorer(scorer) -> None:
    """Refuse auto probes for a scorer that never reads the task prompt they would join."""
    if not scorer.reads_task_prompt:
        raise OptionError(f"--auto-probes writes sample questions for the task prompt, which the {scorer.name} "
                          "scorer does not read: drop --auto-probes, or use --scorer task_aware or snapkv")


def check_count(n: Any, option: str = "--auto-probes") -> int:
    """``n`` as a number of probes: an integer in [1, MAX_AUTO_PROBES] (a digit string too), else OptionError."""
    if isinstance(n, str):
        text = n.strip()
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise OptionError(f"{option} takes a positive number of probes, such as 8, not {n!r}")
        n = int(text)
    if type(n) is not int or not 1 <= n <= MAX_AUTO_PROBES:
        raise OptionError(f"{option} must be a whole number from 1 to {MAX_AUTO_PROBES}, got {n!r}")
    return n


# ----------------------------------------------------------------------------- choosing chunks


def split_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters, at the last paragraph, line,
    sentence or word break in the second half of each piece (or hard, without one)."""
    pieces = []
    text = text.strip()
    while text:
        if len(text) <= size:
            pieces.append(text)
            break
        cut = -1
        for sep in ("\n\n", "\n", ". ", " "):
            cut = text.rfind(sep, size // 2, size)
            if cut >= 0:
                cut += len(sep)
                break
        if cut < 0:
            cut = size
        piece, text = text[:cut].strip(), text[cut:].strip()
        if piece:
            pieces.append(piece)
    return pieces


def choose_chunks(documents: Sequence[Document], n: int, size: int = CHUNK_CHARS) -> list[Chunk]:
    """``n`` chunks spread evenly over the corpus (fewer if it has fewer, even at
    :data:`MIN_CHUNK_CHARS`), in corpus order."""
    while True:
        chunks = [Chunk(d.path, piece) for d in documents for piece in split_text(d.text, size)]
        if len(chunks) >= n or size <= MIN_CHUNK_CHARS:
            break
        size = max(MIN_CHUNK_CHARS, size // 2)
    t = len(chunks)
    if t <= n:
        return chunks
    return [chunks[(2 * i + 1) * t // (2 * n)] for i in range(n)]


# ----------------------------------------------------------------------------- prompts


def prompt_ids(tokenizer, recipe: Recipe, chunk: Chunk) -> list[int]:
    """The token ids of the prompt that asks for a question about ``chunk``."""
    ids = tokenizer(chunk.text, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids[:CHUNK_TOKENS], skip_special_tokens=True) if len(ids) > CHUNK_TOKENS else chunk.text
    examples = recipe.probes[:MAX_EXAMPLES]
    lead = (_EXAMPLES.format(examples="\n".join(f"- {q}" for q in examples)) if examples
            else _TASK.format(description=recipe.description.strip()))
    body = lead + "\n\n" + _REQUEST.format(text=text.strip())
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": body}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(rendered + _ANSWER_LEAD, add_special_tokens=False)["input_ids"]
    return tokenizer(f"{SYSTEM}\n\n{body}\n\n{_ANSWER_LEAD}", add_special_tokens=True)["input_ids"]


def probe_key(fingerprint: str, ids: Sequence[int], max_new_tokens: int) -> str:
    """What a written probe depends on: the model, its prompt, the generation settings."""
    blob = json.dumps({"model": fingerprint, "prompt": list(ids), "max_new_tokens": max_new_tokens,
                       "decoding": "greedy", "version": PROMPT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def clean_question(text: str) -> str:
    """The question in a generated reply: its first line, up to the first ``?``, without a
    leading ``Question:``, list marker or quote."""
    text = text.strip()
    text = text.split("\n", 1)[0] if text else ""
    if "?" in text:
        text = text[: text.index("?") + 1]
    text = _LEAD.sub("", text).strip().strip("\"'`“”").strip()
    return text[:MAX_QUESTION_CHARS]


# ----------------------------------------------------------------------------- writing


def recorded_probes(header: dict) -> dict[str, str]:
    """``{key: question}`` of the auto probes a pack's header records, keeping only those
    that agree with the pack itself (a non-empty question is among its recipe's probes)."""
    recipe = header.get("recipe", {})
    probes = set(recipe.get("probes", ()))
    return {p["key"]: p["question"] for p in recipe.get("auto_probes", ())
            if p["question"] == "" or p["question"] in probes}


def previous_probes(path: str | os.PathLike | None, fingerprint: str) -> dict[str, str]:
    """``{key: question}`` recorded by the pack at ``path`` for the model of ``fingerprint``;
    empty when there is no such pack or it is unusable (its header is validated as at any load)."""
    from .pack import load

    if path is None or not Path(path).exists():
        return {}
    try:
        pack = load(path, verify=False)  # the header, checked; no tensor is needed
    except PackError:
        return {}
    if pack.model["fingerprint"] != fingerprint:
        return {}
    return recorded_probes(pack.header)


class Probing:
    """The auto probes of one build (or plan), written once the corpus is read.

    ``model``: a LoadedModel, or a ModelIdentity. ``write=False`` (a plan: ``--check``,
    ``--dry-run``) takes probes only from ``previous``, the pack a rebuild starts from.
    After :meth:`resolve`, ``probes`` is the :class:`AutoProbes` (None when some would
    have to be written and cannot be) and ``recipe`` the recipe they extend.
    """

    def __init__(self, n: int, model, previous: str | os.PathLike | None = None, *, write: bool = True,
                 progress: Callable[[int, int], None] | None = None, generate=None):
        self.n = check_count(n, "auto_probes")
        self.model, self.previous, self.write = model, previous, write
        self.progress, self.generate = progress, generate
        self.probes: AutoProbes | None = None
        self.recipe: Recipe | None = None

    def resolve(self, documents: Sequence[Document], recipe: Recipe) -> Recipe:
        """``recipe`` with the probes written for ``documents`` (unchanged if they cannot be)."""
        self.probes = write_probes(self.model, documents, recipe, self.n,
                                   previous=previous_probes(self.previous, self.model.fingerprint),
                                   write=self.write, generate=self.generate, progress=self.progress)
        self.recipe = self.probes.extend(recipe) if self.probes is not None else recipe
        return self.recipe


def write_probes(lm, documents: Sequence[Document], recipe: Recipe, n: int, *,
                 previous: dict[str, str] | None = None, write: bool = True, max_new_tokens: int = MAX_NEW_TOKENS,
                 generate: Callable[[Any, list[int], int], str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> AutoProbes | None:
    """Up to ``n`` questions about ``documents`` in the style of ``recipe``'s probes.

    ``lm`` is a :class:`~kvcompile.models.LoadedModel`, or anything with ``fingerprint``
    and ``tokenizer`` (a ``ModelIdentity``) when nothing needs generating. ``previous``:
    ``{key: question}`` recorded by an earlier pack (:func:`recorded_probes`); a probe
    whose key is there is taken from it instead of generated. Returns None if a probe
    needs generating and cannot be (``write=False``, or ``lm`` has no weights).
    ``generate(lm, ids, max_new_tokens)`` replaces the greedy decoder (tests);
    ``progress(done, total)`` is called per chunk.
    """
    n = check_count(n, "auto_probes")
    previous = previous or {}
    generate = generate or generate_question
    chunks = choose_chunks(documents, n)
    probes, generated = [], 0
    for i, chunk in enumerate(chunks):
        ids = prompt_ids(lm.tokenizer, recipe, chunk)
        key = probe_key(lm.fingerprint, ids, max_new_tokens)
        if key in previous:
            question = previous[key]
        elif not write or getattr(lm, "model", None) is None:
            return None
        else:
            question = clean_question(generate(lm, ids, max_new_tokens))
            generated += 1
        probes.append(AutoProbe(question, chunk.document, chunk.sha256, key))
        if progress is not None:
            progress(i + 1, len(chunks))
    # A question the recipe already asks, or an earlier chunk's, adds nothing: recorded as written.
    return AutoProbes(n, tuple(probes), generated)


def generate_question(lm, ids: list[int], max_new_tokens: int) -> str:
    """Greedy decoding after ``ids`` with the plain model, stopped at the first ``?`` or
    line break (after some text) or at ``max_new_tokens``."""
    from transformers import DynamicCache

    from .session import greedy

    out: list[int] = []
    text = ""
    for token in greedy(lm, ids, DynamicCache(config=lm.config), max_new_tokens):
        out.append(token)
        text = lm.tokenizer.decode(out, skip_special_tokens=True).lstrip()
        if "?" in text or "\n" in text:
            break
    return text
