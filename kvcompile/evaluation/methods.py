"""The ways of giving a model the corpus that ``kvcompile eval`` compares.

Each method answers the same questions with the same model, framing, attention and
greedy decoding; they differ only in the KV the question attends to:

- ``pack``: a compiled ``.kvpack``, answered exactly as ``kvcompile query`` does;
- ``full``: the whole corpus, prefilled once and cached (the quality ceiling);
- ``none``: the framing alone, no documents (the floor);
- ``rag``: BM25 chunks up to the pack's token budget, prefilled per question;
- ``select``: the pack's own segments that BM25 ranks best per question, within a token
  budget (``query --select``, :mod:`kvcompile.retrieval`): RAG's choice at a pack's cost;
- any other per-head KV (the kvpress peers of ``bench/peers.py``).

All but ``rag`` are a :class:`~kvcompile.session.Session` over per-head prefixes (``select``:
one per question).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import torch
from transformers import DynamicCache

from ..cache import forward
from ..data.qa import QA
from ..framing import Framing
from ..models import LoadedModel
from ..ragged import RaggedKV
from ..session import Session, _nll, answer_ids, greedy, stream_text
from .rag import Bm25Retriever, chunk_documents


def kv_bytes_per_token(lm: LoadedModel, itemsize: int = 2) -> int:
    """Bytes of keys and values one token takes in every layer and KV head (fp16 by default)."""
    cap = lm.capability
    return 2 * cap.num_layers * cap.num_kv_heads * cap.head_dim * itemsize


class Method(ABC):
    """A context for the questions. ``kv_tokens``: tokens a question attends to per layer and
    KV head; ``kv_bytes``: their bytes (means over the questions asked, where they vary)."""

    name: str
    kind: str
    ratio: float | None = None
    setup_seconds: float = 0.0
    kv_tokens: float
    kv_bytes: float

    @abstractmethod
    def answer_nll(self, qa: QA) -> float:
        """Mean NLL per token of the first gold answer."""

    @abstractmethod
    def generate(self, qa: QA, max_new_tokens: int) -> tuple[str, dict]:
        """Greedy answer text and timings (``ttft``, ``decode``, ``tokens``, ``tokens_per_s``)."""


class SessionMethod(Method):
    """Questions answered by a Session: over a pack, or over KV computed here."""

    def __init__(self, session: Session, name: str, kind: str, ratio: float | None, kv_bytes: float | None = None,
                 setup_seconds: float = 0.0):
        self.session, self.name, self.kind, self.ratio = session, name, kind, ratio
        self.setup_seconds = setup_seconds
        self.kv_tokens = sum(layer.rows for layer in session.kv) / sum(layer.heads for layer in session.kv)
        self.kv_bytes = kv_bytes if kv_bytes is not None else self.kv_tokens * kv_bytes_per_token(session.lm)

    def answer_nll(self, qa: QA) -> float:
        return self.session.answer_nll(qa.question, qa.answers[0])

    def generate(self, qa: QA, max_new_tokens: int) -> tuple[str, dict]:
        timings: dict = {}
        text = "".join(self.session.stream(qa.question, max_new_tokens, timings))
        return text.strip(), timings


def pack_method(pack, lm: LoadedModel, positions: str = "auto", sparsity: dict | None = None) -> SessionMethod:
    """A pack, loaded as ``kvcompile query --positions`` loads it; its bytes are the pack's KV
    payload. Named ``kvcompile@RATIO``, with the codec, positions other than the default and
    sparse decode (``sparsity``: :meth:`Session.sparsify`'s arguments) in brackets
    (``kvcompile[int4,original]@0.25``, ``kvcompile[sparse]@0.25``): such a variant is compared
    with the plain pack."""
    t0 = time.perf_counter()
    session = Session(pack, lm, positions)
    if sparsity is not None:
        session.sparsify(**sparsity)
    ratio = pack.kept_ratio()
    o = pack.header["options"]
    label = f"{o['ratio']:g}" if o.get("ratio") is not None else f"{o['budget']}tok"
    tags = ([o["quant"]["name"]] if "quant" in o else []) + ([positions] if positions != "auto" else [])
    tags += ["sparse"] if sparsity is not None else []
    variant = f"[{','.join(tags)}]" if tags else ""  # codec, positions and selection side by side
    sizes = pack.sizes()
    return SessionMethod(session, f"kvcompile{variant}@{label}", "pack", ratio,
                         kv_bytes=sizes["keys"] + sizes["values"] + sizes["positions"],
                         setup_seconds=time.perf_counter() - t0)


@torch.no_grad()
def prefill_method(lm: LoadedModel, framing: Framing, context_ids: list[int], name: str, kind: str,
                   ratio: float | None = None) -> SessionMethod:
    """``context_ids`` prefilled once with an ordinary forward pass and kept whole."""
    t0 = time.perf_counter()
    cache = DynamicCache(config=lm.config)
    forward(lm.model, torch.tensor([context_ids], device=lm.device), cache, logits_to_keep=1)
    positions = torch.arange(len(context_ids), device=lm.device)
    kv = [RaggedKV.from_dense(layer.keys[0], layer.values[0], positions) for layer in cache.layers]
    session = Session.over(lm, framing, kv, len(context_ids))
    return SessionMethod(session, name, kind, ratio, setup_seconds=time.perf_counter() - t0)


class RagMethod(Method):
    """BM25 over chunks of the corpus; the best chunks up to ``budget`` tokens are prefilled per question."""

    kind = "rag"

    def __init__(self, lm: LoadedModel, framing: Framing, doc_ids: list[list[int]], budget: int, chunk_tokens: int,
                 name: str | None = None, ratio: float | None = None):
        self.lm, self.framing = lm, framing
        self.budget = budget - len(framing.prefix_ids)  # the framing counts against the budget too
        self.chunks = chunk_documents(doc_ids, chunk_tokens)
        t0 = time.perf_counter()
        texts = [lm.tokenizer.decode(c.ids) for c in self.chunks]
        self.retriever = Bm25Retriever(self.chunks, texts)
        self.setup_seconds = time.perf_counter() - t0
        self.name = name or (f"rag@{ratio:g}" if ratio is not None else "rag")
        self.ratio = ratio
        self.contexts: dict[str, list[int]] = {}  # by question: retrieved once, used by nll and generate

    def context(self, qa: QA) -> list[int]:
        """Framing prefix plus the retrieved chunks' tokens, in corpus order."""
        if qa.question not in self.contexts:
            chunks = self.retriever.retrieve(qa.question, max(0, self.budget))
            self.contexts[qa.question] = list(self.framing.prefix_ids) + [t for c in chunks for t in c.ids]
        return self.contexts[qa.question]

    @torch.no_grad()
    def answer_nll(self, qa: QA) -> float:
        a = answer_ids(self.lm, qa.answers[0])
        x = self.context(qa) + self.framing.question_ids(self.lm.tokenizer, qa.question) + a
        logits = self.lm.model(torch.tensor([x], device=self.lm.device), use_cache=False,
                               logits_to_keep=len(a) + 1).logits
        return _nll(logits[0, :-1], a)

    def generate(self, qa: QA, max_new_tokens: int) -> tuple[str, dict]:
        # Retrieval and the prefill of the retrieved chunks are part of the time to first token.
        timings: dict = {}
        t0 = time.perf_counter()
        ids = self.context(qa) + self.framing.question_ids(self.lm.tokenizer, qa.question)
        retrieval = time.perf_counter() - t0
        tokens = greedy(self.lm, ids, DynamicCache(config=self.lm.config), max_new_tokens, timings=timings)
        text = "".join(stream_text(self.lm, tokens)).strip()
        timings["ttft"] += retrieval
        return text, timings

    @property
    def kv_tokens(self) -> float:
        sizes = [len(c) for c in self.contexts.values()]
        return sum(sizes) / len(sizes) if sizes else 0.0

    @property
    def kv_bytes(self) -> float:
        return self.kv_tokens * kv_bytes_per_token(self.lm)


class SelectMethod(Method):
    """A pack's segments chosen per question (:class:`~kvcompile.retrieval.Selector`): BM25 over
    the pack's segment index, the best segments within ``budget`` kept tokens per head (below
    1: that share of the corpus), with APE's boundary repair if ``ape`` is given. Choosing and
    placing them counts in the time to first token."""

    kind = "select"

    def __init__(self, pack, lm: LoadedModel, budget: float, name: str = "select", ape=None):
        from ..retrieval import Selector

        t0 = time.perf_counter()
        self.selector = Selector(pack, lm, budget, ape=ape)
        self.setup_seconds = time.perf_counter() - t0
        self.name, self.lm = name, lm
        self.ratio = self.selector.budget / pack.layout["tokens"]
        self.tokens: list[float] = []  # per question: tokens attended per layer and KV head
        self._last: tuple[str, Session, float] | None = None  # nll and generate ask the same question

    def session(self, qa: QA) -> tuple[Session, float]:
        """The question's session and the seconds it took to choose and place its segments."""
        if self._last is None or self._last[0] != qa.question:
            t0 = time.perf_counter()
            session, _ = self.selector.session(qa.question)
            self._last = (qa.question, session, time.perf_counter() - t0)
            self.tokens.append(sum(layer.rows for layer in session.kv) / sum(layer.heads for layer in session.kv))
        return self._last[1], self._last[2]

    def answer_nll(self, qa: QA) -> float:
        return self.session(qa)[0].answer_nll(qa.question, qa.answers[0])

    def generate(self, qa: QA, max_new_tokens: int) -> tuple[str, dict]:
        session, seconds = self.session(qa)
        timings: dict = {}
        text = "".join(session.stream(qa.question, max_new_tokens, timings))
        timings["ttft"] += seconds
        return text.strip(), timings

    @property
    def kv_tokens(self) -> float:
        return sum(self.tokens) / len(self.tokens) if self.tokens else 0.0

    @property
    def kv_bytes(self) -> float:
        return self.kv_tokens * kv_bytes_per_token(self.lm)
