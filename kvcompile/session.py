"""Answering questions from a pack: a model and a pack's KV, loaded once.

Every question gets its own :class:`~kvcompile.cache.PackCache` over the shared,
read-only prefix, so questions never affect each other. The model attends with the
pack's attention only while a question is being answered (:func:`pack_attention`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .attention import pack_attention
from .cache import PackCache, forward
from .errors import OptionError, QuestionError
from .models import LoadedModel, load_model
from .ragged import RaggedKV
from .sparse import PageSummary, Sparse


@dataclass
class Answer:
    text: str
    tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds; tokens_per_s


class Session:
    """Ask questions of a pack. ``model`` is a LoadedModel, a model name, or None for the pack's;
    ``positions``: where its keys stand (``original``, ``compact`` or ``auto``,
    :meth:`~kvcompile.pack.Pack.attended_positions`)."""

    def __init__(self, pack, model: LoadedModel | str | None = None, positions: str = "auto"):
        t0 = time.perf_counter()
        self.pack = pack
        self.lm = model if isinstance(model, LoadedModel) else load_model(model or pack.model["name"], progress=False)
        self.kv = pack.place(self.lm, positions)  # refuses another model than the pack's
        self.start = pack.attended_positions(positions)[1]
        self.framing = pack.framing
        self.sparse, self.pages, self.repair = None, None, None
        self.load_seconds = time.perf_counter() - t0

    @classmethod
    def over(cls, lm: LoadedModel, framing, kv: list[RaggedKV], start: int) -> Session:
        """A session over KV that is not a pack file: ``kv`` (post-RoPE, one RaggedKV per
        layer) with questions starting at position ``start``. Used by ``kvcompile eval``
        for its baselines and by the peer benchmark."""
        self = cls.__new__(cls)
        self.pack, self.lm, self.kv, self.start, self.framing = None, lm, kv, start, framing
        self.sparse, self.pages, self.repair = None, None, None
        self.load_seconds = 0.0
        return self

    def sparsify(self, top_k: float | None = None, page: int | None = None, channels: int | None = None,
                 kept_ratio: float | None = None) -> Session:
        """Decode from here on with RocketKV's hybrid sparse attention (kvcompile/sparse.py): each
        step attends, per KV head, only to the prefix pages its query chooses. Parameters left
        None follow the paper's budget split for what the pack kept (``kept_ratio``, by default
        the pack's). ``top_k = 1`` attends to every row (exact attention). Returns ``self``."""
        if self.repair is not None:
            raise OptionError("--sparse and --ape do not combine: choose one")
        self.lm.capability.check_plain_attention("--sparse")
        if kept_ratio is None:
            kept_ratio = self.pack.kept_ratio() if self.pack is not None else 1.0
        self.sparse = Sparse.auto(kept_ratio, self.kv[0].head_dim, top_k, page, channels)
        self.pages = [PageSummary.of(layer.materialise(), self.sparse) for layer in self.kv]
        return self

    def sparse_report(self) -> dict:
        """Sparse decode's parameters and what a step reads of the prefix (all layers, the
        model's dtype), against attending to every row."""
        itemsize = torch.finfo(self.lm.dtype).bits // 8
        sparse, dense = (sum(x) for x in zip(*(s.bytes_per_step(itemsize) for s in self.pages)))
        rows = sum(s.rows_read() for s in self.pages)
        return {**self.sparse.to_json(), "rows_per_step": rows, "prefix_rows": sum(kv.rows for kv in self.kv),
                "bytes_per_step": sparse, "dense_bytes_per_step": dense}

    def question_ids(self, question: str, reserve: int = 0) -> list[int]:
        """Token ids of ``question``; refuses an empty one or one that does not fit."""
        if not question or not question.strip():
            raise QuestionError("the question is empty: ask something")
        ids = self.framing.question_ids(self.lm.tokenizer, question)
        room = self.lm.max_positions - self.start
        if len(ids) + reserve > room:
            raise QuestionError(
                f"the question is {len(ids)} tokens, but only {room} positions are left after the corpus "
                f"in {self.lm.name}'s window of {self.lm.max_positions}"
                + (f" (with {reserve} reserved for the answer)" if reserve else "") + ": shorten it"
            )
        return ids

    def cache(self, capacity: int = 0) -> PackCache:
        """A fresh cache over the shared, read-only prefix, for one question
        (``capacity``: question and answer tokens to make room for up front)."""
        return PackCache(self.kv, self.start, capacity=capacity, sparse=self.pages, repair=self.repair)

    @torch.no_grad()
    def stream(self, question: str, max_new_tokens: int = 128, timings: dict | None = None) -> Iterator[str]:
        """Greedy-decode an answer, yielding text as it is produced.

        If ``timings`` is a dict it is filled with ``ttft`` (seconds to the first token),
        ``decode`` (seconds after it), ``tokens`` and ``tokens_per_s``.
        """
        ids = self.question_ids(question, reserve=1)
        max_new_tokens = max(1, min(max_new_tokens, self.lm.max_positions - self.start - len(ids)))
        with pack_attention(self.lm.model):
            cache = self.cache(capacity=len(ids) + max_new_tokens)
            yield from stream_text(self.lm, greedy(self.lm, ids, cache, max_new_tokens, timings=timings))

    def ask(self, question: str, max_new_tokens: int = 128) -> Answer:
        """The whole answer to ``question`` (greedy), with timings."""
        timings: dict = {}
        text = "".join(self.stream(question, max_new_tokens, timings))
        return Answer(text.strip(), int(timings.get("tokens", 0)), timings)

    @torch.no_grad()
    def first_token_logits(self, question: str) -> torch.Tensor:
        """Logits ``[vocab]`` of the first answer token (float32)."""
        ids = self.question_ids(question)
        x = torch.tensor([ids], device=self.lm.device)
        with pack_attention(self.lm.model):
            return forward(self.lm.model, x, self.cache(), logits_to_keep=1).logits[0, -1].float()

    @torch.no_grad()
    def answer_nll(self, question: str, answer: str) -> float:
        """Mean negative log-likelihood per token of ``answer`` given the pack and ``question``."""
        q = self.question_ids(question)
        a = answer_ids(self.lm, answer)
        x = torch.tensor([q + a], device=self.lm.device)
        with pack_attention(self.lm.model):
            if self.sparse is None:
                logits = forward(self.lm.model, x, self.cache(), logits_to_keep=len(a) + 1).logits
            else:  # as decoding reads it: the question in one forward, then one answer token per step
                cache = self.cache(capacity=len(q) + len(a))
                steps = [forward(self.lm.model, x[:, : len(q)], cache, logits_to_keep=1).logits]
                steps += [forward(self.lm.model, x[:, i : i + 1], cache).logits for i in range(len(q), len(x[0]) - 1)]
                return _nll(torch.cat(steps, dim=1)[0], a)
        return _nll(logits[0, :-1], a)


@torch.no_grad()
def greedy(lm: LoadedModel, ids: list[int], cache, max_new_tokens: int, timings: dict | None = None) -> Iterator[int]:
    """Greedy decoding: yield each new token id of the answer to ``ids`` until EOS.

    ``cache`` is any transformers cache holding the context (a pack's, or a plain
    prefilled one). ``timings`` as in :meth:`Session.stream`.
    """
    model, eos = lm.model, set(_eos_ids(lm))
    x = torch.tensor([ids], device=lm.device)
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for _ in range(max_new_tokens):
        logits = forward(model, x, cache, logits_to_keep=1).logits[0, -1]
        nxt = int(logits.argmax())
        if t_first is None:
            t_first = time.perf_counter()
        if nxt in eos:
            break
        n += 1
        yield nxt
        x = torch.tensor([[nxt]], device=lm.device)
    t_end = time.perf_counter()
    if timings is not None:
        t_first = t_first or t_end
        timings.update(ttft=t_first - t0, decode=t_end - t_first, tokens=n,
                       tokens_per_s=(n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0)


def stream_text(lm: LoadedModel, tokens: Iterator[int]) -> Iterator[str]:
    """Decode a stream of token ids into text pieces, never splitting a character."""
    out: list[int] = []
    shown = ""
    for t in tokens:
        out.append(t)
        text = lm.tokenizer.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back half a multi-byte character
            yield text[len(shown):]
            shown = text
    text = lm.tokenizer.decode(out, skip_special_tokens=True)
    if text != shown:
        yield text[len(shown):]


def answer_ids(lm: LoadedModel, answer: str) -> list[int]:
    return lm.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]


def _nll(logits: torch.Tensor, target: list[int]) -> float:
    """Mean NLL of ``target`` under ``logits [len(target), vocab]``."""
    t = torch.tensor(target, device=logits.device)
    return float(torch.nn.functional.cross_entropy(logits.float(), t))


@torch.no_grad()
def context_answer_nll(lm: LoadedModel, context_ids: list[int], question_ids: list[int], answer: str) -> float:
    """Mean NLL of ``answer`` after ``context_ids + question_ids`` in one ordinary forward pass.

    The reference for a pack: the full corpus (``prefix_ids + corpus``), or none
    (``prefix_ids`` alone).
    """
    a = answer_ids(lm, answer)
    x = torch.tensor([context_ids + question_ids + a], device=lm.device)
    logits = lm.model(x, use_cache=False, logits_to_keep=len(a) + 1).logits
    return _nll(logits[0, :-1], a)


def _eos_ids(lm: LoadedModel) -> list[int]:
    ids = []
    for source in (lm.tokenizer.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.append(source)
        elif source:
            ids.extend(source)
    return ids
