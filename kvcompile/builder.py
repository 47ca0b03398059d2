"""Compile a corpus into a pack: frame, prefill chunk by chunk, score, select, write.

Each document becomes a *segment*, compiled once and reusable while its content key
(`segment_keys`) holds. Within a document, chunked prefill as in "Beyond RAG"
(methods.md, section 1): for each chunk ``c_i`` the model sees ``[context | kept KV of
the document's earlier chunks | c_i | task prompt]`` in one forward pass; the task
prompt's attention scores the document's tokens; each layer keeps its budget, which
grows with the share of the document seen, so earlier survivors compete again; the task
prompt's own KV is dropped. The context is the framing alone (``independent``) or the
framing and every earlier segment (``chained``). Keys are stored before RoPE with their
positions.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import torch

from .attention import use_pack_attention
from .cache import PackCache, Prefix
from .codecs import get_codec
from .corpus import Document
from .errors import CorpusError, OptionError
from .framing import Framing, document_text, frame
from .models import LoadedModel
from .recipe import Recipe
from .rope import Rotary
from .scorers import LayerView, Scorer, make_scorer
from .selection import layer_budget, select


@dataclass
class BuildOptions:
    """Every option that shapes a pack's payload (all recorded in its header)."""

    ratio: float | None = 0.25  # share of the cache's tokens kept
    budget: int | None = None  # tokens kept per KV head; overrides ratio
    chunk_size: int = 2048
    sinks: int = 4
    scorer: str = "task_aware"
    scorer_params: dict = field(default_factory=dict)
    codec: str = "fp16"
    head_floor: float = 0.2
    context: str = "chained"  # what each document is compiled after: "independent" or "chained"

    def validate(self) -> None:
        if self.budget is None and self.ratio is None:
            raise OptionError("give --ratio or --budget")
        if self.budget is not None and self.budget < 1:
            raise OptionError(f"--budget must be a positive number of tokens, got {self.budget}")
        if self.budget is None and not 0 < self.ratio <= 1:
            raise OptionError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.chunk_size < 16:
            raise OptionError(f"--chunk-size must be at least 16 tokens, got {self.chunk_size}")
        if self.sinks < 0:
            raise OptionError(f"--sinks must be >= 0, got {self.sinks}")
        if not 0 <= self.head_floor <= 1:
            raise OptionError(f"head floor must be in [0, 1], got {self.head_floor}")
        if self.context not in CONTEXT_MODES:
            raise OptionError(f"--context must be one of {', '.join(CONTEXT_MODES)}, got {self.context!r}")

    def make_scorer(self) -> Scorer:
        if self.scorer == "stride" and self.ratio is None:
            raise OptionError("the stride scorer keeps a share of the tokens: give --ratio, not --budget")
        params = {"ratio": self.ratio} if self.scorer == "stride" else {}
        return make_scorer(self.scorer, **{**params, **self.scorer_params})

    def to_json(self) -> dict:
        """Every option, with the scorer's resolved parameters (defaults included)."""
        d = asdict(self)
        d["scorer_params"] = self.make_scorer().params()
        return d


@dataclass
class Tokenized:
    """The token stream of a corpus: framing prefix, then each document in order."""

    framing: Framing
    prefix_ids: list[int]
    doc_ids: list[list[int]]
    probe_ids: list[int]

    @property
    def corpus_tokens(self) -> int:
        return sum(len(d) for d in self.doc_ids)

    @property
    def total(self) -> int:
        return len(self.prefix_ids) + self.corpus_tokens

    def stream(self) -> list[int]:
        return self.prefix_ids + [t for d in self.doc_ids for t in d]


@dataclass
class Compiled:
    """The result of compilation, before encoding: per layer, per KV head.

    keys: pre-RoPE ``[kept, head_dim]``; values ``[kept, head_dim]`` (as stored, through the
    codec); positions ``[kept]``, absolute.
    """

    keys: list[list[torch.Tensor]]
    values: list[list[torch.Tensor]]
    positions: list[list[torch.Tensor]]
    tokenized: Tokenized
    seconds: dict[str, float] = field(default_factory=dict)


def tokenize(documents: list[Document], recipe: Recipe, lm: LoadedModel) -> Tokenized:
    """Frame and tokenise the corpus and the task prompt for ``lm``'s tokenizer."""
    tok = lm.tokenizer
    framing = frame(tok)
    doc_ids = [tok(document_text(d.path, d.text), add_special_tokens=False)["input_ids"] for d in documents]
    probe_ids = framing.question_ids(tok, recipe.task_prompt())
    return Tokenized(framing, list(framing.prefix_ids), doc_ids, probe_ids)


def target_tokens(options: BuildOptions, total: int) -> int:
    """Tokens kept per KV head (on average over heads) for a cache of ``total`` tokens."""
    if options.budget is not None:
        return min(options.budget, total)
    return max(1, round(options.ratio * total))


def check_fits(tk: Tokenized, options: BuildOptions, lm: LoadedModel) -> None:
    """Refuse a corpus whose positions would exceed the model's window."""
    need = tk.total + len(tk.probe_ids)
    if tk.corpus_tokens == 0:
        raise CorpusError("the corpus has no tokens after tokenisation: add documents with text")
    if need > lm.max_positions:
        raise CorpusError(
            f"the corpus is {tk.corpus_tokens} tokens; with framing and task prompt it needs {need} positions, "
            f"more than {lm.name}'s window of {lm.max_positions}: split the corpus into several packs "
            "or use a model with a longer context"
        )


CONTEXT_MODES = ("independent", "chained")


@dataclass
class Segment:
    """One document's kept KV: per layer, per KV head; keys pre-RoPE. Tensors are as
    stored (the codec's round trip), positions relative to the document's first token."""

    keys: list[list[torch.Tensor]]
    values: list[list[torch.Tensor]]
    positions: list[list[torch.Tensor]]


def segment_keys(documents: list[Document], fingerprint: str, recipe: Recipe, options: BuildOptions) -> list[str]:
    """Content keys of the segments (one per document).

    A key covers everything the segment's payload depends on: the document, the model,
    the recipe, the options, and the context it was compiled against: the framing alone
    in ``independent`` mode, every earlier segment in ``chained`` mode (chained keys).
    With ``--budget`` the per-document budget depends on the whole corpus, so every key
    covers every document.
    """
    base = {"model": fingerprint, "recipe": recipe.source, "probes": list(recipe.probes),
            "options": options.to_json()}
    if options.budget is not None:
        base["corpus"] = [d.sha256 for d in documents]
    keys, previous = [], ""
    for d in documents:
        context = previous if options.context == "chained" else ""
        blob = json.dumps({**base, "doc": d.sha256, "path": d.path, "context": context}, sort_keys=True)
        previous = hashlib.sha256(blob.encode()).hexdigest()
        keys.append(previous)
    return keys


class _Compiler:
    """The model-side state of one compilation: model, scorer, probe, codec, rotary."""

    def __init__(self, tk: Tokenized, options: BuildOptions, lm: LoadedModel):
        self.model, self.options, self.lm = lm.model, options, lm
        use_pack_attention(self.model)
        cfg = self.model.config
        self.layers, self.kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rotary = Rotary.of(self.model)
        self.device, self.dtype = lm.device, lm.dtype
        self.scorer = options.make_scorer()
        self.codec = get_codec(options.codec)
        self.probe = torch.tensor(tk.probe_ids, dtype=torch.long, device=self.device)
        self.seconds = {"prefill": 0.0, "score": 0.0}

    def stored(self, k_post: torch.Tensor, v: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and values as the pack stores them (pre-RoPE, through the codec)."""
        k = self.rotary.undo(k_post, p) if self.rotary is not None else k_post
        n = k.shape[0]
        return (self.codec.decode(self.codec.encode(k), n, self.head_dim),
                self.codec.decode(self.codec.encode(v), n, self.head_dim))

    def attendable(self, seg: Segment, origin: int) -> Segment:
        """A stored segment as later tokens attend to it (model dtype, RoPE at ``origin + position``),
        computed exactly as a pack is loaded, so reused and fresh segments give the same context."""
        def rot(k, p):
            k = k.to(self.device, self.dtype)
            return self.rotary.apply(k, p.to(self.device) + origin) if self.rotary is not None else k

        return Segment([[rot(k, p) for k, p in zip(kl, pl)] for kl, pl in zip(seg.keys, seg.positions)],
                       [[v.to(self.device, self.dtype) for v in vl] for vl in seg.values],
                       [[p.to(self.device) + origin for p in pl] for pl in seg.positions])

    @torch.no_grad()
    def segment(self, ids: list[int], origin: int, context: list[Segment], target: int, protect: int,
                progress=None) -> Segment:
        """Compile one document's tokens at positions ``origin...`` after ``context`` (attendable
        segments, in order).

        Chunked prefill ``[context | kept of this document | chunk | task prompt]``; the
        layer's budget (``target`` per head on average) grows with the share of the
        document seen, so earlier survivors of this document compete again. ``protect``:
        positions below it are always kept (sinks beyond the framing).
        """
        kv_heads, o = self.kv_heads, self.options
        stream = torch.tensor(ids, dtype=torch.long, device=self.device)
        empty = torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)
        keys = [[empty] * kv_heads for _ in range(self.layers)]  # post-RoPE while compiling
        values = [[empty] * kv_heads for _ in range(self.layers)]
        positions = [[torch.empty(0, dtype=torch.long, device=self.device)] * kv_heads for _ in range(self.layers)]
        for start in range(0, len(ids), o.chunk_size):
            chunk = stream[start : start + o.chunk_size]
            end = start + chunk.numel()
            budget = layer_budget(target, end, len(ids), kv_heads)
            needs_scores = budget < sum(p.numel() for p in positions[0]) + kv_heads * chunk.numel()
            n_probe = self.probe.numel() if needs_scores else 0
            heads = range(kv_heads)
            prefixes = [Prefix([torch.cat([*(s.keys[li][h] for s in context), keys[li][h]]) for h in heads],
                               [torch.cat([*(s.values[li][h] for s in context), values[li][h]]) for h in heads])
                        for li in range(self.layers)]
            cache = PackCache(prefixes, start=origin + start, capture_queries=n_probe)
            t0 = time.perf_counter()
            x = torch.cat([chunk, self.probe]) if n_probe else chunk
            self.model(x[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            chunk_pos = torch.arange(origin + start, origin + end, device=self.device)
            for li, layer in enumerate(cache.layers):
                cand_k = [torch.cat([keys[li][h], layer.keys[0, h]]) for h in range(kv_heads)]
                cand_v = [torch.cat([values[li][h], layer.values[0, h]]) for h in range(kv_heads)]
                cand_p = [torch.cat([positions[li][h], chunk_pos]) for h in range(kv_heads)]
                if n_probe:
                    view = LayerView(cand_k, cand_v, cand_p, layer.queries[0], n_probe, self.head_dim**-0.5)
                    kept = select(self.scorer.score(view), budget, [p - origin < protect for p in cand_p],
                                  o.head_floor)
                else:
                    kept = [torch.arange(p.numel(), device=self.device) for p in cand_p]
                keys[li] = [k[i] for k, i in zip(cand_k, kept)]
                values[li] = [v[i] for v, i in zip(cand_v, kept)]
                positions[li] = [p[i] for p, i in zip(cand_p, kept)]
            self.seconds["prefill"] += t1 - t0
            self.seconds["score"] += time.perf_counter() - t1
            if progress is not None:
                progress(end)
        out = Segment([], [], [])
        for kl, vl, pl in zip(keys, values, positions):
            pairs = [self.stored(k, v, p) for k, v, p in zip(kl, vl, pl)]
            out.keys.append([k for k, _ in pairs])
            out.values.append([v for _, v in pairs])
            out.positions.append([(p - origin).cpu() for p in pl])
        return out


@torch.no_grad()
def compile_corpus(tk: Tokenized, options: BuildOptions, lm: LoadedModel, progress=None,
                   reused: dict[int, Segment] | None = None) -> Compiled:
    """Compile every document into a segment (or take it from ``reused``, by document index)
    and assemble the pack's KV in corpus order.

    The framing prefix is prefilled once and kept whole. In ``independent`` mode each
    document is compiled right after the framing (at the positions that follow it) and
    shifted to its place in the corpus when assembled; in ``chained`` mode it is compiled
    at its place, after the kept KV of every earlier document. ``progress`` is called with
    the number of tokens compiled so far.
    """
    c = _Compiler(tk, options, lm)
    reused = reused or {}
    n_prefix = len(tk.prefix_ids)
    starts = [n_prefix]
    for ids in tk.doc_ids:
        starts.append(starts[-1] + len(ids))
    ratio = options.ratio if options.ratio is not None else min(1.0, options.budget / tk.total)

    # The framing: one plain prefill, kept whole (it holds the attention sinks).
    none = torch.empty(0, c.head_dim, dtype=c.dtype, device=c.device)
    cache = PackCache([Prefix([none] * c.kv_heads, [none] * c.kv_heads) for _ in range(c.layers)], start=0)
    t0 = time.perf_counter()
    c.model(torch.tensor([tk.prefix_ids], device=c.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    c.seconds["prefill"] += time.perf_counter() - t0
    pos = torch.arange(n_prefix, device=c.device)
    framing = Segment([], [], [])
    for layer in cache.layers:
        pairs = [c.stored(layer.keys[0, h], layer.values[0, h], pos) for h in range(c.kv_heads)]
        framing.keys.append([k for k, _ in pairs])
        framing.values.append([v for _, v in pairs])
        framing.positions.append([pos.cpu()] * c.kv_heads)
    framing_ctx = c.attendable(framing, 0)

    segments: list[Segment] = []
    context = [framing_ctx]  # chained: grows by each placed segment; concatenated once per chunk
    done = n_prefix
    for d, ids in enumerate(tk.doc_ids):
        if d in reused:
            seg = reused[d]
        else:
            origin = n_prefix if options.context == "independent" else starts[d]
            base = [framing_ctx] if options.context == "independent" else context
            report = (lambda n, done=done: progress(done + n)) if progress else None
            seg = c.segment(ids, origin, base, max(1, round(ratio * len(ids))), options.sinks - starts[d], report)
        segments.append(seg)
        done += len(ids)
        if progress is not None:
            progress(done)
        if options.context == "chained":
            context.append(c.attendable(seg, starts[d]))

    def assemble(part: str) -> list[list[torch.Tensor]]:
        out = []
        for li in range(c.layers):
            heads = []
            for h in range(c.kv_heads):
                pieces = [getattr(framing, part)[li][h]]
                for seg, start in zip(segments, starts):
                    t = getattr(seg, part)[li][h]
                    pieces.append(t + start if part == "positions" else t)
                heads.append(torch.cat(pieces))
            out.append(heads)
        return out

    return Compiled(assemble("keys"), assemble("values"), assemble("positions"), tk, c.seconds)
