"""Answers that do not change between runs, cached on disk: the baselines of a benchmark.

``full``, ``none`` and ``rag`` answer a question from a context that depends only on the
model, the framing, the corpus and (for rag) the retrieved chunks, not on how packs are
built. Their gold-answer NLL and greedy answer are cached per

    (model and its fingerprint, dtype, device type, transformers and torch versions,
     method kind, framing, context token ids,
     question, first gold answer)  [+ max_new_tokens for the answer]

in one small JSON file per (model, kind, context or corpus) under a folder (by default
``~/.cache/kvcompile/bench-nll``, or ``$KVCOMPILE_CACHE/bench-nll``), so that reruns and
ablations of ``bench/peers.py`` skip them. A context that stays the same for every
question (``full``, ``none``) is not even prefilled when all its answers are cached.

Cached rows keep the timings of the run that computed them. A file is rewritten
atomically after each new answer; two processes on the same corpus at once may lose each
other's new entries, never corrupt the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from ..data.qa import QA
from ..framing import Framing
from ..models import LoadedModel
from .methods import Method

VERSION = 1  # bump when what a cached value means changes


def default_folder() -> Path:
    from ..models import cache_dir

    return cache_dir() / "bench-nll"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def identity(lm: LoadedModel, kind: str, framing: Framing, context_ids: list[int]) -> dict:
    """What a cached answer depends on, other than the question."""
    import torch
    import transformers

    return {"cache_version": VERSION, "model": lm.name, "fingerprint": lm.fingerprint, "dtype": str(lm.dtype),
            "device": lm.device.type, "kind": kind, "framing": framing.to_json(),
            "context": _digest(list(context_ids)), "context_tokens": len(context_ids),
            "transformers": transformers.__version__, "torch": torch.__version__}


class CacheFile:
    """The cached answers of one (model, kind, context): ``meta`` (the method's sizes and setup
    time), ``nll`` by question and answer, ``answers`` by question and max_new_tokens."""

    def __init__(self, folder: Path, ident: dict):
        self.ident = ident
        self.path = Path(folder) / _slug(ident["model"]) / f"{ident['kind']}-{_digest(ident)[:20]}.json"
        data = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}  # unreadable: start it again
            if data.get("identity") != ident:
                data = {}
        self.meta: dict | None = data.get("meta")
        self.nll: dict[str, float] = data.get("nll", {})
        self.answers: dict[str, dict] = data.get("answers", {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"identity": self.ident, "meta": self.meta, "nll": self.nll, "answers": self.answers},
                          indent=0, ensure_ascii=False)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def nll_key(qa: QA, context_ids: list[int] | None = None) -> str:
    return _digest([qa.question, qa.answers[0], None if context_ids is None else _digest(list(context_ids))])


def answer_key(qa: QA, max_new_tokens: int, context_ids: list[int] | None = None) -> str:
    return _digest([qa.question, max_new_tokens, None if context_ids is None else _digest(list(context_ids))])


class CachedMethod(Method):
    """A method whose answers come from a :class:`CacheFile` when they are there.

    With a fixed context (``full``, ``none``), ``make`` runs only on the first question
    that is not cached (so a fully cached baseline is never prefilled). With a context per
    question (``rag``: ``context`` maps a question to its token ids), the method is made
    at once (retrieval is cheap) and that context is part of each question's key.
    """

    def __init__(self, make: Callable[[], Method], file: CacheFile,
                 context: Callable[[QA], list[int]] | None = None, tally: dict | None = None):
        self._make, self.file, self._context = make, file, context
        self._inner: Method | None = None
        self.hits = self.misses = 0
        self.tally = tally if tally is not None else {}  # "hits" and "misses", shared by several methods
        if context is not None or file.meta is None:
            self._ensure()

    def _ensure(self) -> Method:
        if self._inner is None:
            self._inner = self._make()
            if self._context is None:
                m = self._inner
                self.file.meta = {"name": m.name, "kind": m.kind, "ratio": m.ratio, "kv_tokens": m.kv_tokens,
                                  "kv_bytes": m.kv_bytes, "setup_seconds": m.setup_seconds}
        return self._inner

    def _attr(self, name):
        # A per-question context (rag): the method itself knows what it attended to.
        return getattr(self._inner, name) if self._context is not None else self.file.meta[name]

    name = property(lambda self: self._attr("name"))
    kind = property(lambda self: self._attr("kind"))
    ratio = property(lambda self: self._attr("ratio"))
    kv_tokens = property(lambda self: self._attr("kv_tokens"))
    kv_bytes = property(lambda self: self._attr("kv_bytes"))
    setup_seconds = property(lambda self: self._attr("setup_seconds"))

    def _count(self, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        self.tally[what] = self.tally.get(what, 0) + 1

    def _ctx(self, qa: QA) -> list[int] | None:
        return None if self._context is None else self._context(qa)

    def answer_nll(self, qa: QA) -> float:
        key = nll_key(qa, self._ctx(qa))
        if key in self.file.nll:
            self._count("hits")
            return self.file.nll[key]
        self._count("misses")
        value = self._ensure().answer_nll(qa)
        self.file.nll[key] = value
        self.file.save()
        return value

    def generate(self, qa: QA, max_new_tokens: int) -> tuple[str, dict]:
        key = answer_key(qa, max_new_tokens, self._ctx(qa))
        if key in self.file.answers:
            self._count("hits")
            hit = self.file.answers[key]
            return hit["prediction"], dict(hit["timings"])
        self._count("misses")
        prediction, timings = self._ensure().generate(qa, max_new_tokens)
        self.file.answers[key] = {"prediction": prediction,
                                  "timings": {k: v for k, v in timings.items() if _jsonable(v)}}
        self.file.save()
        return prediction, timings


def cached(make: Callable[[], Method], folder: Path | None, lm: LoadedModel, kind: str, framing: Framing,
           context_ids: list[int] | None = None,
           context: Callable[[Method, QA], list[int]] | None = None,
           tally: dict | None = None) -> Callable[[], Method]:
    """A maker of ``make``'s method that reads and fills the cache under ``folder`` (None: no cache).

    Give ``context_ids`` for a context fixed for every question. With ``context(method, qa)``,
    the context chosen per question (rag's retrieved chunks) is part of each question's key,
    and ``context_ids`` (say, the whole corpus) only names the file. ``tally`` (a dict)
    counts the ``hits`` and ``misses`` of every method made.
    """
    if folder is None:
        return make

    def build() -> Method:
        file = CacheFile(folder, identity(lm, kind, framing, context_ids or []))
        if context is None:
            return CachedMethod(make, file, tally=tally)
        holder: dict = {}

        def inner() -> Method:
            holder["m"] = make()
            return holder["m"]

        return CachedMethod(inner, file, context=lambda qa: context(holder["m"], qa), tally=tally)

    return build


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))
