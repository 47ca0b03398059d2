"""Segments chosen per question (issue 15): RAG's choice of context at a pack's latency.

A pack holds every segment's KV, computed offline; once the question is known, choosing
which segments to attend to costs a BM25 ranking. The build stores each segment's BM25
terms (``bm25s``'s tokenizer with English stop words, the retriever of the ``rag``
baseline, :mod:`kvcompile.evaluation.rag`) as the pack's segment index, so a question is
ranked without the corpus. The best segments are taken, best first, while their kept
tokens fit the budget (one that would overflow is passed over for a smaller one), and
their KV is placed after the framing in corpus order at compacted positions: each head's
rows at ``0, 1, ...``, the question after the longest head.

Segments compiled ``chained`` saw the documents before them; attended without them, they
carry context that is no longer there. ``independent`` segments stand alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import OptionError
from .models import LoadedModel
from .pack import Pack, visible
from .ragged import within_heads
from .repair import Ape, ApeLayer
from .rope import place, rotaries
from .session import Session

RETRIEVER = {"retriever": "bm25s", "stopwords": "en"}


def _bm25s():
    try:
        import bm25s
    except ImportError as exc:  # a declared dependency; only a broken install gets here
        raise OptionError("segment selection needs bm25s: pip install bm25s") from exc
    return bm25s


def segment_terms(texts: Sequence[str]) -> list[dict[str, int]]:
    """Each text's BM25 terms with their counts (sorted by term: equal texts, equal bytes)."""
    tokens = _bm25s().tokenize(list(texts), stopwords=RETRIEVER["stopwords"], return_ids=False, show_progress=False)
    out = []
    for words in tokens:
        counts: dict[str, int] = {}
        for w in words:
            counts[w] = counts.get(w, 0) + 1
        out.append(dict(sorted(counts.items())))
    return out


class SegmentIndex:
    """BM25 over the segments' stored terms: rank segments for a question."""

    def __init__(self, terms: Sequence[dict[str, int]]):
        bm25s = _bm25s()
        self._tokenize = bm25s.tokenize
        self.size = len(terms)
        # A segment with no term (punctuation only) still needs a row: an empty string scores nothing.
        corpus = [[t for t, n in counts.items() for _ in range(n)] or [""] for counts in terms]
        self._bm25 = bm25s.BM25()
        self._bm25.index(corpus, show_progress=False)

    def scores(self, question: str) -> list[float]:
        """BM25 score of every segment for ``question``."""
        words = self._tokenize([question], stopwords=RETRIEVER["stopwords"], return_ids=False, show_progress=False)[0]
        if not words:
            return [0.0] * self.size
        return [float(s) for s in self._bm25.get_scores(words)]


def choose(scores: Sequence[float], sizes: Sequence[float], budget: float, always: Sequence[int] = ()) -> list[int]:
    """The segments to attend to, in corpus order: ``always`` first, then the best scores (ties: corpus
    order) whose ``sizes`` fit in what is left of ``budget``, one that would overflow passed over for a
    smaller one, as the ``rag`` baseline fills its budget."""
    taken, used = set(always), sum(sizes[i] for i in set(always))
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if i not in taken and used + sizes[i] <= budget:
            taken.add(i)
            used += sizes[i]
    return sorted(taken)


@dataclass
class Selection:
    """What a question attended to: segment indices (corpus order) and their kept tokens per head."""

    segments: list[int]
    tokens: float


class Selector:
    """Sessions over the segments of ``pack`` that each question ranks best (module docstring).

    ``budget``: kept tokens per KV head (on average) the chosen segments may hold, or, below
    1, that share of the corpus's tokens. ``always``: segment indices always attended.
    ``ape``: attend to the chosen segments with APE's boundary repair (kvcompile/repair.py).
    The pack's layers are decoded once and shared by every question.
    """

    def __init__(self, pack: Pack, lm: LoadedModel, budget: float, always: Sequence[int] = (), ape: Ape | None = None):
        pack.check_model(lm)
        if ape is not None:
            lm.capability.check_plain_attention("--ape")
        self.ape = ape
        if not pack.model["rope"]:
            raise OptionError(f"{pack.model['name']!r} has absolute positions, which its KV holds: segments cannot "
                              "be moved next to each other; query the whole pack")
        if budget <= 0:
            raise OptionError(f"the selection budget must be positive, got {budget:g}")
        segments = pack.header["segments"]
        bad = [j for j in always if not 0 <= j < len(segments)]
        if bad:
            raise OptionError(f"segment {bad[0]} does not exist: the pack has segments 0..{len(segments) - 1}")
        self.pack, self.lm, self.always = pack, lm, list(always)
        self.index = SegmentIndex(pack.segment_terms())
        self.budget = budget * pack.header["corpus"]["tokens"] if budget < 1 else float(budget)
        n_prefix = pack.layout["tokens"] - pack.header["corpus"]["tokens"]
        self.bounds = torch.tensor([n_prefix + s["tokens"][0] for s in segments] + [pack.layout["tokens"]])
        self.layers = [pack.layer(li) for li in range(len(pack.kept))]
        heads = sum(len(k) for k in pack.kept)
        kept = torch.zeros(len(segments), dtype=torch.float64)
        for layer in self.layers:
            seg = torch.bucketize(layer.positions, self.bounds, right=True) - 1  # -1: the framing
            kept += torch.bincount(seg[seg >= 0], minlength=len(segments)).double()
        self.sizes = (kept / heads).tolist()  # kept tokens per (layer, KV head), on average
        self.rotaries = rotaries(lm.model)

    def choose(self, question: str) -> Selection:
        chosen = choose(self.index.scores(question), self.sizes, self.budget, self.always)
        return Selection(chosen, sum(self.sizes[j] for j in chosen))

    def session(self, question: str) -> tuple[Session, Selection]:
        """A session over the framing and the segments ``question`` ranks best, and what they are."""
        chosen = self.choose(question)
        wanted = torch.zeros(len(self.sizes) + 1, dtype=torch.bool)
        wanted[0] = True  # the framing
        wanted[torch.tensor(chosen.segments, dtype=torch.long) + 1] = True
        rows = [layer.where(wanted[torch.bucketize(layer.positions, self.bounds, right=True)])
                for layer in self.layers]
        shared = [r.head_counts(r.positions < self.bounds[0]) for r in rows]  # the framing's rows come first
        rows = [r.replace(positions=within_heads(r.lengths).to(r.positions.dtype)) for r in rows]
        start = max(r.max_len for r in rows)
        kv = [place(visible(r, self.lm.capability.windows[li], start), [self.rotaries[li]], self.lm.device,
                    self.lm.dtype) for li, r in enumerate(rows)]
        session = Session.over(self.lm, self.pack.framing, kv, start)
        if self.ape is not None:
            session.repair = [ApeLayer(self.ape, n.to(self.lm.device)) for n in shared]
        return session, chosen
