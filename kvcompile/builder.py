"""Compile a corpus into a pack: frame, prefill chunk by chunk, score, select, write.

Chunked prefill as in "Beyond RAG" (methods.md, section 1): for each chunk ``c_i`` the
model sees ``[kept KV of earlier chunks | c_i | task prompt]`` in one forward pass; the
task prompt's attention scores every cached token; each layer keeps its budget, which
grows with the corpus seen so far so that earlier survivors compete again; the task
prompt's own KV is dropped. Keys stay at their original positions throughout and are
stored before RoPE.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import torch

from .attention import use_pack_attention
from .cache import PackCache, Prefix
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
    doc_floor: float = 0.9  # share of each document's proportional budget it keeps at least

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
        if not 0 <= self.doc_floor <= 1:
            raise OptionError(f"--doc-floor must be in [0, 1], got {self.doc_floor}")

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

    keys: pre-RoPE ``[kept, head_dim]``; values ``[kept, head_dim]``; positions ``[kept]``.
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


@torch.no_grad()
def compile_corpus(tk: Tokenized, options: BuildOptions, lm: LoadedModel, progress=None) -> Compiled:
    """Run the chunked, scored prefill and return the kept KV of every layer and head.

    ``progress``, if given, is called with the number of tokens prefilled so far.
    """
    model = lm.model
    use_pack_attention(model)
    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rotary = Rotary.of(model)
    device, dtype = lm.device, lm.dtype
    scorer = options.make_scorer()
    stream = torch.tensor(tk.stream(), dtype=torch.long, device=device)
    probe = torch.tensor(tk.probe_ids, dtype=torch.long, device=device)
    total, target = stream.numel(), target_tokens(options, stream.numel())
    protect = max(len(tk.prefix_ids), options.sinks)
    scaling = head_dim**-0.5
    # Document d spans stream positions [starts[d], starts[d + 1]); the framing prefix counts as document 0.
    lengths = torch.tensor([len(d) for d in tk.doc_ids], device=device)
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=device), len(tk.prefix_ids) + lengths.cumsum(0)])

    empty = torch.empty(0, head_dim, dtype=dtype, device=device)
    keys = [[empty] * kv_heads for _ in range(layers)]  # post-RoPE while compiling
    values = [[empty] * kv_heads for _ in range(layers)]
    positions = [[torch.empty(0, dtype=torch.long, device=device)] * kv_heads for _ in range(layers)]
    seconds = {"prefill": 0.0, "score": 0.0}

    for start in range(0, total, options.chunk_size):
        chunk = stream[start : start + options.chunk_size]
        end = start + chunk.numel()
        budget = layer_budget(target, end, total, kv_heads)
        doc_share = ((starts[1:].clamp(max=end) - starts[:-1]).clamp(min=0)).float() / end
        needs_scores = budget < sum(p.numel() for p in positions[0]) + kv_heads * chunk.numel()
        n_probe = probe.numel() if needs_scores else 0
        cache = PackCache([Prefix(k, v) for k, v in zip(keys, values)], start=start, capture_queries=n_probe)
        t0 = time.perf_counter()
        ids = torch.cat([chunk, probe]) if n_probe else chunk
        model(ids[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        chunk_pos = torch.arange(start, end, device=device)
        for li, layer in enumerate(cache.layers):
            cand_k = [torch.cat([keys[li][h], layer.keys[0, h]]) for h in range(kv_heads)]
            cand_v = [torch.cat([values[li][h], layer.values[0, h]]) for h in range(kv_heads)]
            cand_p = [torch.cat([positions[li][h], chunk_pos]) for h in range(kv_heads)]
            if n_probe:
                view = LayerView(cand_k, cand_v, cand_p, layer.queries[0], n_probe, scaling)
                scores = scorer.score(view)
                docs = [torch.bucketize(p, starts[1:-1], right=True) for p in cand_p]
                kept = select(scores, budget, [p < protect for p in cand_p], options.head_floor,
                              docs, doc_share, options.doc_floor)
            else:
                kept = [torch.arange(p.numel(), device=device) for p in cand_p]
            keys[li] = [k[i] for k, i in zip(cand_k, kept)]
            values[li] = [v[i] for v, i in zip(cand_v, kept)]
            positions[li] = [p[i] for p, i in zip(cand_p, kept)]
        seconds["prefill"] += t1 - t0
        seconds["score"] += time.perf_counter() - t1
        if progress is not None:
            progress(end)

    if rotary is not None:
        keys = [[rotary.undo(k, p) for k, p in zip(kl, pl)] for kl, pl in zip(keys, positions)]
    return Compiled(keys, values, positions, tk, seconds)


def segment_keys(documents: list[Document], lm: LoadedModel, recipe: Recipe, options: BuildOptions) -> list[str]:
    """Content keys of the segments (one per document), chained: each covers its context."""
    keys, previous = [], ""
    for d in documents:
        blob = json.dumps(
            {"doc": d.sha256, "path": d.path, "model": lm.fingerprint, "recipe": recipe.source,
             "probes": list(recipe.probes), "options": options.to_json(), "context": previous},
            sort_keys=True,
        )
        previous = hashlib.sha256(blob.encode()).hexdigest()
        keys.append(previous)
    return keys
