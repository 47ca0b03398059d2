"""The retrieval baseline: BM25 over fixed-size token chunks, filled up to a token budget.

Chunks are cut from each document's own tokens (as the pack frames it, path heading
included), so the context given to the model is made of exactly the counted tokens:
a retrieved context never exceeds its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError


@dataclass(frozen=True)
class Chunk:
    doc: int  # index of the document in the corpus
    start: int  # offset of the chunk's first token in its document
    ids: tuple[int, ...]


def chunk_documents(doc_ids: list[list[int]], size: int) -> list[Chunk]:
    """Cut each document's token ids into consecutive chunks of ``size`` tokens (the last may be shorter)."""
    if size < 1:
        raise OptionError(f"--rag-chunk must be a positive number of tokens, got {size}")
    return [Chunk(d, s, tuple(ids[s : s + size])) for d, ids in enumerate(doc_ids) for s in range(0, len(ids), size)]


class Bm25Retriever:
    """BM25 (``bm25s``, English stop words) over chunk texts."""

    def __init__(self, chunks: list[Chunk], texts: list[str]):
        try:
            import bm25s
        except ImportError as exc:  # a declared dependency; only a broken install gets here
            raise OptionError("the rag baseline needs bm25s: pip install bm25s") from exc
        self._bm25s = bm25s
        self.chunks = chunks
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def scores(self, question: str) -> list[float]:
        """BM25 score of every chunk for ``question``."""
        q = self._bm25s.tokenize([question], stopwords="en", show_progress=False, return_ids=False)
        return [float(s) for s in self.index.get_scores(q[0])]

    def retrieve(self, question: str, budget: int) -> list[Chunk]:
        """The best-scoring chunks whose tokens sum to at most ``budget``, in corpus order.

        Chunks are taken by descending score (ties: corpus order); one that would overflow
        the budget is passed over for a smaller one further down.
        """
        scores = self.scores(question)
        order = sorted(range(len(self.chunks)), key=lambda i: (-scores[i], i))
        taken, used = [], 0
        for i in order:
            n = len(self.chunks[i].ids)
            if used + n <= budget:
                taken.append(i)
                used += n
        return [self.chunks[i] for i in sorted(taken)]
