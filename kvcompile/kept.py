"""What a pack kept, token by token: for every corpus token, the share of the pack's
(layer, KV head) pairs that kept it, mapped back onto the documents' text.

A pack stores, per layer, the positions each KV head kept (``Pack.positions``). Counting
them per position says how much of the model still sees each token; a token with share 1
is kept everywhere (the framing always is: it holds the attention sinks), a token with
share 0 is gone. Positions are absolute: the framing prefix comes first, then the
documents in manifest order (docs/kvpack-format.md, section 6).

The counts need only the pack. Showing them on text needs the corpus the pack was built
from (a pack stores no text) and the model's tokenizer (no weights), to tokenize each
document exactly as the build did. ``kept_html.py`` renders the result as a page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import CorpusError, ModelMismatchError, OptionError
from .pack import Pack

if TYPE_CHECKING:  # the reader (inspect without --corpus) needs no corpus reader
    from .corpus import Document

MIN_SPAN_SHARE = 0.5  # a "kept span" is a run of tokens each kept by at least half the heads
TOP_SPANS = 5


def kept_counts(pack: Pack) -> torch.Tensor:
    """``[cache tokens]`` int64: per position, how many (layer, KV head) pairs kept it.

    Within a head positions strictly increase (the reader refuses a pack where they do
    not), so a head counts a position at most once: counts lie in ``[0, layers x kv_heads]``.
    """
    tokens = pack.layout["tokens"]
    counts = torch.zeros(tokens, dtype=torch.int64)
    for positions in pack.positions:  # per layer [N]: all heads' rows at once
        counts += torch.bincount(positions, minlength=tokens)
    return counts


def heads_total(pack: Pack) -> int:
    """The number of (layer, KV head) pairs: the count of a token every head kept."""
    return pack.model["num_layers"] * pack.model["num_kv_heads"]


def document_starts(pack: Pack) -> list[int]:
    """Each manifest document's first absolute cache position (framing included), from the
    segments' spans: a segment holds its documents back to back."""
    manifest = pack.manifest()
    n_prefix = pack.layout["tokens"] - pack.header["corpus"]["tokens"]
    starts = [0] * len(manifest)
    for seg in pack.header["segments"]:
        at = n_prefix + seg["tokens"][0]
        for d in seg["documents"]:
            starts[d] = at
            at += manifest[d]["tokens"]
    return starts


# -- the corpus against the pack's manifest -----------------------------------------------


def match_corpus(pack: Pack, documents: Sequence[Document]) -> list[Document]:
    """``documents`` in the pack's manifest order, if they are exactly the pack's documents
    (same paths, same sha256); otherwise a :class:`CorpusError` naming what differs."""
    built = {m["path"]: m["sha256"] for m in pack.manifest()}
    given = {d.path: d for d in documents}
    missing = [p for p in built if p not in given]
    extra = [p for p in given if p not in built]
    changed = [p for p in built if p in given and given[p].sha256 != built[p]]
    if missing or extra or changed:
        parts = [f"{kind} {_names(paths)}" for kind, paths in
                 (("missing", missing), ("extra", extra), ("changed", changed)) if paths]
        raise CorpusError(f"{pack.path} was not built from this corpus ({'; '.join(parts)}): point --corpus "
                          "at the documents it was built from, or rebuild the pack")
    return [given[m["path"]] for m in pack.manifest()]


def _names(paths: list[str], shown: int = 5) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(repr(p) for p in paths[:shown]) + more


# -- tokens to text -----------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A run of consecutive tokens of one document, each kept by at least
    :data:`MIN_SPAN_SHARE` of the heads. ``start``/``end``: token indices in the document."""

    start: int
    end: int
    share: float  # mean over its tokens
    text: str

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class TextKept:
    """One run of the cache shown as text: a document, or the framing prefix.

    ``counts[i]``: how many of ``heads`` kept token ``i`` (absolute position ``start + i``);
    ``pieces[i]``: its text. Pieces concatenate to the text the build tokenized; a token
    that shares a character with the one before it (a byte-level split) has an empty piece.
    """

    path: str
    start: int
    counts: list[int]
    pieces: list[str]
    heads: int

    @property
    def tokens(self) -> int:
        return len(self.counts)

    @property
    def shares(self) -> list[float]:
        return [c / self.heads for c in self.counts]

    @property
    def share(self) -> float:
        """The share of this text's (token, layer, head) entries the pack kept."""
        return sum(self.counts) / (self.tokens * self.heads) if self.counts else 0.0

    def top_spans(self, top: int = TOP_SPANS, min_share: float = MIN_SPAN_SHARE) -> list[Span]:
        """The ``top`` kept spans that hold the most (length x mean share), largest first."""
        if not self.counts:
            return []
        counts = torch.tensor(self.counts, dtype=torch.float64)
        kept = torch.cat([torch.tensor([False]), counts >= min_share * self.heads, torch.tensor([False])])
        edges = kept.int().diff()  # +1 where a run starts, -1 one past where it ends
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        if not starts.numel():
            return []
        sums = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        mass = sums[ends] - sums[starts]
        order = torch.sort(-mass, stable=True).indices[:top]  # ties: the earlier span first
        return [Span(s, e, (m / ((e - s) * self.heads)), "".join(self.pieces[s:e]))
                for s, e, m in zip(starts[order].tolist(), ends[order].tolist(), mass[order].tolist())]

    def to_json(self) -> dict:
        return {"path": self.path, "start": self.start, "tokens": self.tokens, "kept_share": round(self.share, 4),
                "top_spans": [{"start": s.start, "end": s.end, "share": round(s.share, 4), "text": s.text}
                              for s in self.top_spans()],
                "token_shares": [round(s, 4) for s in self.shares], "token_text": self.pieces}


@dataclass(frozen=True)
class KeptView:
    """A pack's kept tokens on its corpus: the framing, then every document in order."""

    path: str
    model: str
    recipe: str
    layers: int
    kv_heads: int
    framing: TextKept
    documents: list[TextKept]

    @property
    def heads(self) -> int:
        return self.layers * self.kv_heads

    @property
    def corpus_share(self) -> float:
        """The share of the documents' (token, layer, head) entries kept (framing excluded)."""
        tokens = sum(d.tokens for d in self.documents)
        return sum(sum(d.counts) for d in self.documents) / (tokens * self.heads) if tokens else 0.0


def token_pieces(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """Each token's piece of ``text`` from a fast tokenizer's ``offset_mapping``.

    Offsets may overlap (a character split into byte tokens) or leave gaps (a tokenizer
    that trims spaces), so each token takes the characters from where the previous one
    ended to where it ends: the pieces concatenate to ``text`` exactly, every character
    once, uncovered characters going with the token after them.
    """
    pieces, cursor = [], 0
    for _, end in offsets:
        end = max(cursor, end)
        pieces.append(text[cursor:end])
        cursor = end
    if pieces:
        pieces[-1] += text[cursor:]
    return pieces


def document_pieces(tokenizer, document: Document, expected: int, where: str) -> list[str]:
    """The text of each of ``document``'s tokens, tokenized as the build did (the call of
    :func:`kvcompile.builder.document_ids`, with offsets); refuses if that is not
    ``expected`` tokens."""
    from .framing import document_text

    text = document_text(document.path, document.text)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow (Python) tokenizers have no offsets
        raise OptionError("showing tokens as text needs a fast tokenizer (with offsets); "
                          "this model's is slow") from None
    if len(enc["input_ids"]) != expected:
        raise ModelMismatchError(
            f"{where}: {document.path!r} is {len(enc['input_ids'])} tokens with this tokenizer, but the pack holds "
            f"{expected} for it: use the tokenizer of the model the pack was built with (--model)")
    return token_pieces(text, enc["offset_mapping"])


def kept_view(pack: Pack, documents: Sequence[Document], tokenizer) -> KeptView:
    """The pack's kept tokens shown on ``documents`` (which must be the pack's corpus, see
    :func:`match_corpus`), tokenized with ``tokenizer`` (the pack's model's)."""
    documents = match_corpus(pack, documents)
    counts = kept_counts(pack).tolist()
    heads = heads_total(pack)
    prefix = list(pack.framing.prefix_ids)
    # The framing's text is not stored, only its ids: one token decoded at a time.
    framing = TextKept("(framing)", 0, counts[: len(prefix)],
                       [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in prefix], heads)
    shown = []
    for doc, entry, start in zip(documents, pack.manifest(), document_starts(pack)):
        n = entry["tokens"]
        pieces = document_pieces(tokenizer, doc, n, pack.path)
        shown.append(TextKept(doc.path, start, counts[start : start + n], pieces, heads))
    m = pack.model
    return KeptView(pack.path, m["name"], pack.header["recipe"]["name"], m["num_layers"], m["num_kv_heads"],
                    framing, shown)


def document_shares(pack: Pack, counts: torch.Tensor | None = None) -> list[float]:
    """Each manifest document's kept share (its tokens x heads entries kept); needs no corpus."""
    counts = kept_counts(pack) if counts is None else counts
    sums = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    heads = heads_total(pack)
    return [(int(sums[s + m["tokens"]]) - int(sums[s])) / (m["tokens"] * heads)
            for s, m in zip(document_starts(pack), pack.manifest())]


def load_view(pack: Pack, corpus: Sequence, model: str | None = None, text_field: str = "text") -> KeptView:
    """:func:`kept_view` on the corpus at ``corpus`` (folders or files, read as ``build`` reads
    them) with the tokenizer of ``model`` (default: the pack's); loads no weights."""
    from .corpus import read_corpus
    from .models import identify

    documents, _ = read_corpus(list(corpus), text_field)
    return kept_view(pack, documents, identify(model or pack.model["name"]).tokenizer)
