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
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import torch

from .attention import pack_attention
from .budgets import BUDGET_POLICIES, corpus_budgets, document_budgets
from .cache import PackCache, forward
from .codecs import QUANTS, Codec, layer_codecs, make_codec
from .corpus import Document
from .errors import CorpusError, OptionError
from .framing import Framing, document_text, frame
from .kvmix import DEFAULTS as KVMIX
from .models import LoadedModel
from .ragged import RaggedKV, within_heads
from .recipe import Recipe
from .reconstruction import max_attention, prompt_tokens, repeat_ids
from .rope import place, rotaries, unrotate
from .scorers import SCORERS, LayerView, Scorer, make_scorer
from .selection import layer_budget, select

AUTO = "auto"  # an option the build decides from the corpus (BuildOptions.resolved)
CONTEXT_MODES = ("independent", "chained", "whole")


@dataclass
class BuildOptions:
    """Every option that shapes a pack's payload (all recorded in its header)."""

    ratio: float | None = 0.25  # share of the cache's tokens kept
    budget: int | None = None  # tokens kept per KV head; overrides ratio
    chunk_size: int = 2048
    sinks: int = 4
    scorer: str = "task_aware"
    scorer_params: dict = field(default_factory=dict)
    codec: str = "fp16"  # storage of unquantised parts: fp16, bf16 or fp32
    quant: str = "none"  # codecs.QUANTS: none, int8/4/3/2 (KIVI groups) or kvmix (bits per layer)
    quant_group: int = 32  # tokens per key group, channels per value group
    layer_bits: list | None = None  # kvmix: (key bits, value bits) per layer, from the profile (kvmix.py)
    quant_outliers: float | None = None  # share of each run's rows stored exactly; None: the quant's default
    rvq_depth: int = 2  # rvq: residual levels (8-bit codes) per sub-vector
    rvq_group: int = 8  # rvq: channels per sub-vector (8 and depth 2: 2 bits per value, as int2)
    head_floor: float = 1.0  # share of the even per-head budget each head keeps at least (1: equal heads)
    # What each document is compiled after: "independent", "chained" or "whole"; "auto": whole
    # when the corpus fits the window, else chained (streamed). Decided by :meth:`resolved`.
    context: str = AUTO
    # How documents share the budget: "document", "corpus" (budgets.py); "auto": corpus where one
    # selection covers the corpus (whole, or after a stream scorer).
    budgets: str = AUTO
    doc_floor: float = 0.1  # with corpus budgets: the share of its even budget a document keeps at least
    stream: bool | None = None  # compile at compacted positions (corpora beyond the window); None: if it does not fit
    # A streamed build's first pass: this scorer compresses the stream (keeping what the window
    # holds), then ``scorer`` makes the final selection over what it kept. "none": ``scorer``
    # streams alone. "auto": lagkv for a scorer that reads the task prompt (measured better and
    # twice as fast as asking the task prompt about every chunk: docs/methods.md section 2).
    stream_scorer: str | None = AUTO

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
        if self.context not in (AUTO, *CONTEXT_MODES):
            raise OptionError(f"--context must be one of {', '.join((AUTO, *CONTEXT_MODES))}, got {self.context!r}")
        if self.budgets not in (AUTO, *BUDGET_POLICIES):
            raise OptionError(f"--budgets must be one of {', '.join((AUTO, *BUDGET_POLICIES))}, got {self.budgets!r}")
        if not 0 <= self.doc_floor <= 1:
            raise OptionError(f"document floor must be in [0, 1], got {self.doc_floor}")
        make_codec(self.codec)
        if self.quant not in QUANTS:
            raise OptionError(f"--quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if not 1 <= self.quant_group <= 4096:
            raise OptionError(f"--quant-group must be in [1, 4096], got {self.quant_group}")
        if not 1 <= self.rvq_depth <= 16:
            raise OptionError(f"--rvq-depth must be in [1, 16], got {self.rvq_depth}")
        if not 1 <= self.rvq_group <= 256:
            raise OptionError(f"--rvq-group must be in [1, 256], got {self.rvq_group}")
        if self.stream not in (None, True, False):
            raise OptionError(f"stream must be true, false or unset (auto), got {self.stream!r}")
        if self.quant_outliers is not None and not 0 <= self.quant_outliers <= 1:
            raise OptionError(f"--quant-outliers must be a share in [0, 1], got {self.quant_outliers}")
        if self.stream_scorer not in (None, AUTO, "none"):
            make_scorer(self.stream_scorer)

    def resolved(self, fits: bool) -> BuildOptions:
        """The options with every automatic choice made, for a corpus that ``fits`` the window
        at its own positions or not: stream only when it does not; read it whole when it
        fits, else chain the documents; share the budget across the corpus when read whole or
        selected after a stream scorer (one selection decides it at no cost), else per
        document. Unless read whole, the scorer gets its defaults for that: after a stream
        scorer, which leaves one selection over the whole stream, only the terms that need the
        corpus repeated turned off (``Scorer.off``); otherwise ``Scorer.apart`` (also a wider
        pool, for documents scored a chunk at a time). A stream scorer applies to streamed
        chained builds only. Explicit choices stand."""
        stream = (not fits) if self.stream is None else self.stream
        context = self.context if self.context != AUTO else ("chained" if stream else "whole")
        stream_scorer = self.stream_scorer if stream else None  # a corpus that fits is read without a first pass
        if stream_scorer == AUTO:
            reads = self.scorer in SCORERS and SCORERS[self.scorer].reads_task_prompt
            stream_scorer = "lagkv" if context == "chained" and reads else None
        elif stream_scorer == "none":
            stream_scorer = None
        if stream_scorer is not None and context != "chained":
            raise OptionError(f"--stream-scorer compresses one stream of the documents before the final selection; "
                              f"--context {context} compiles each document alone: use --context chained")
        selected_once = context == "whole" or stream_scorer is not None  # one final selection over the corpus
        budgets = self.budgets if self.budgets != AUTO else ("corpus" if selected_once else "document")
        params = self.scorer_params
        if context != "whole" and self.scorer in SCORERS:
            scorer = SCORERS[self.scorer]
            params = {**(scorer.off if stream_scorer is not None else scorer.apart), **params}
        options = replace(self, stream=stream, context=context, budgets=budgets, scorer_params=params,
                          stream_scorer=stream_scorer)
        if context != "whole" and options.make_scorer().reads_reconstruction:
            raise OptionError(f"the {self.scorer} scorer's reconstruction term repeats the whole corpus, which a "
                              f"{context} build does not read at once: use --context whole, or recon 0")
        return options

    @property
    def surveyed(self) -> bool:
        """Whether documents' budgets come from a survey prefill before compiling (``corpus``
        budgets; under ``whole`` context, or a stream scorer's final selection, the compile's
        own selection decides them)."""
        return self.budgets == "corpus" and self.context != "whole" and self.stream_scorer is None

    @property
    def outliers(self) -> float:
        """The share of rows stored exactly: the option, else kvmix's default, else none."""
        if self.quant_outliers is not None:
            return self.quant_outliers
        return KVMIX["outliers"] if self.quant == "kvmix" else 0.0

    def codecs(self, layers: int, head_dim: int) -> list[tuple[Codec, Codec]]:
        """The (keys, values) codec of each layer."""
        if self.quant == "kvmix":
            if self.layer_bits is None or len(self.layer_bits) != layers:
                raise OptionError("kvmix needs the bits of every layer: build through kvcompile.build")
            bits = self.layer_bits
        elif self.quant == "rvq":
            bits = [(self.rvq_depth, self.rvq_depth)] * layers
        else:
            b = int(self.quant[3:]) if self.quant.startswith("int") else 16
            bits = [(b, b)] * layers
        group = self.rvq_group if self.quant == "rvq" else self.quant_group
        return layer_codecs(self.quant, self.codec, head_dim, group, bits, self.outliers)

    def first_pass(self) -> BuildOptions:
        """The options of a streamed build's first pass (``stream_scorer``): that scorer, with its
        defaults for a corpus not read whole, and no quantisation (what it keeps is selected
        again, then quantised once)."""
        return replace(self, scorer=self.stream_scorer, scorer_params=dict(SCORERS[self.stream_scorer].apart),
                       stream_scorer=None, quant="none", layer_bits=None, quant_outliers=None)

    def make_scorer(self) -> Scorer:
        if self.scorer == "stride" and self.ratio is None:
            raise OptionError("the stride scorer keeps a share of the tokens: give --ratio, not --budget")
        params = {"ratio": self.ratio} if self.scorer == "stride" else {}
        return make_scorer(self.scorer, **{**params, **self.scorer_params})

    def to_json(self) -> dict:
        """Every option, with the scorer's resolved parameters (defaults included)."""
        d = asdict(self)
        d["scorer_params"] = self.make_scorer().params()
        if self.stream_scorer not in (None, AUTO, "none"):
            d["stream_scorer_params"] = self.first_pass().make_scorer().params()
        return d

    def key_json(self) -> dict:
        """The options as segment keys cover them: :meth:`to_json`, less the fields that change
        nothing where they are off (corpus budgets under ``document`` budgets, quantisation
        without ``--quant``, RVQ's without ``rvq``, a scorer's terms at their ``off``
        values), so that packs written before they existed stay reusable."""
        d = self.to_json()
        off = SCORERS[self.scorer].off
        d["scorer_params"] = {k: v for k, v in d["scorer_params"].items() if k not in off or off[k] != v}
        if not d["stream"]:
            del d["stream"]
        if d["stream_scorer"] is None:
            del d["stream_scorer"]
        if self.budgets == "document":
            del d["budgets"], d["doc_floor"]
        elif not self.surveyed:
            del d["doc_floor"]  # one selection over the corpus: no floor per document
        if self.quant == "none":
            del d["quant"], d["quant_group"], d["layer_bits"], d["quant_outliers"]
        if self.quant != "rvq":
            del d["rvq_depth"], d["rvq_group"]
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
    """The result of compilation, before encoding: one :class:`RaggedKV` per layer, rows
    as stored (pre-RoPE keys, the codec's round trip), positions absolute, on the CPU."""

    layers: list[RaggedKV]
    tokenized: Tokenized
    budgets: list[int]  # per document: tokens kept per KV head, on average (the segment's budget)
    seconds: dict[str, float] = field(default_factory=dict)


def document_ids(tokenizer, document: Document) -> list[int]:
    """A document's token ids, as it stands in the corpus (its header line included)."""
    return tokenizer(document_text(document.path, document.text), add_special_tokens=False)["input_ids"]


def tokenize(documents: list[Document], recipe: Recipe, lm: LoadedModel) -> Tokenized:
    """Frame and tokenise the corpus and the task prompt for ``lm``'s tokenizer."""
    tok = lm.tokenizer
    framing = frame(tok)
    doc_ids = [document_ids(tok, d) for d in documents]
    probe_ids = framing.question_ids(tok, recipe.task_prompt())
    return Tokenized(framing, list(framing.prefix_ids), doc_ids, probe_ids)


def target_tokens(options: BuildOptions, total: int) -> int:
    """Tokens kept per KV head (on average over heads) for a cache of ``total`` tokens."""
    if options.budget is not None:
        return min(options.budget, total)
    return max(1, round(options.ratio * total))


def fits(tk: Tokenized, max_positions: int) -> bool:
    """Whether the corpus, with its framing and task prompt, fits a window at its own positions."""
    return tk.total + len(tk.probe_ids) <= max_positions


# Positions a streamed compile leaves free after its kept tokens (besides the task prompt's):
# its last chunks shrink to fit them, and a finished pack leaves them for questions and answers.
STREAM_RESERVE = 512


def stream_room(tk: Tokenized, options: BuildOptions, max_positions: int) -> int:
    """The most rows one (layer, KV head) may hold in a streamed compile, framing included.

    Each chunk is prefilled after the longest head's compacted rows, then the task prompt,
    so ``kept + chunk + task prompt`` must fit the window: chunks are cut to what is left,
    down to ``min(chunk_size, STREAM_RESERVE)``, and the room is what remains beside that."""
    return max_positions - min(options.chunk_size, STREAM_RESERVE) - len(tk.probe_ids)


def check_fits(tk: Tokenized, options: BuildOptions, lm: LoadedModel) -> None:
    """Refuse, before compiling, a corpus whose positions would exceed the model's window: at
    its own positions, or (streamed) at compacted ones, naming the largest ratio that fits."""
    if tk.corpus_tokens == 0:
        raise CorpusError("the corpus has no tokens after tokenisation: add documents with text")
    need, window = tk.total + len(tk.probe_ids), lm.max_positions
    if not options.stream:
        if need > window:
            raise CorpusError(
                f"the corpus is {tk.corpus_tokens} tokens; with framing and task prompt it needs {need} positions, "
                f"more than {lm.name}'s window of {window}: build with --stream (chunk by chunk after the "
                "compacted kept tokens), split the corpus into several packs, or use a model with a longer context")
        return
    if lm.capability.absolute_positions:
        raise CorpusError(f"{lm.name} has absolute positions, which its KV holds: a streamed compile needs RoPE, "
                          f"so the corpus must fit its window of {window} (split it into several packs)")
    if options.surveyed or options.context == "whole":
        what, fix = (("--context whole reads", "--context chained") if options.context == "whole"
                     else ("--budgets corpus surveys", "--budgets document, or --stream-scorer lagkv (its final "
                           "selection shares the budget)"))
        raise OptionError(f"{what} the whole corpus in one prefill, which a streamed compile avoids (the corpus needs "
                          f"{need} positions, {lm.name}'s window is {window}): use {fix}")
    room, framing = stream_room(tk, options, window), len(tk.prefix_ids)
    if room <= framing:
        raise OptionError(f"--chunk-size {options.chunk_size} leaves no room for kept tokens in {lm.name}'s window "
                          f"of {window}: lower --chunk-size")
    lengths = [len(ids) for ids in tk.doc_ids]
    kept = sum(document_budgets(lengths, corpus_ratio(tk, options)))
    if framing + kept > room:
        free = room - framing - len(lengths)  # each document's budget may round up by one token
        if options.budget is not None:
            what, most = f"--budget {options.budget}", f"the largest --budget that fits is {max(1, free)}"
        else:
            largest = max(0.0, math.floor(1000 * free / tk.corpus_tokens) / 1000)
            what, most = f"ratio {options.ratio:g}", f"the largest ratio that fits is {largest:g}"
        raise CorpusError(
            f"the corpus is {tk.corpus_tokens} tokens: {what} keeps {kept} of them per KV head, and with the "
            f"framing's {framing} that is more than the {room} positions a streamed pack may fill in {lm.name}'s "
            f"window of {window} ({window - room - len(tk.probe_ids)} positions for a chunk, a question and its "
            f"answer, and the task prompt's {len(tk.probe_ids)}, stay free): {most}")


def segment_keys(documents: list[Document], fingerprint: str, recipe: Recipe, options: BuildOptions,
                 budgets: Sequence[int | None] | None = None) -> list[str]:
    """Content keys of the segments (one per document).

    A key covers everything the segment's payload depends on: the document, the model,
    the recipe, the options, and the context it was compiled against: the framing alone
    in ``independent`` mode, every earlier segment in ``chained`` mode (chained keys).
    Under surveyed ``corpus`` budgets a document's budget comes from the whole corpus, so
    it is in the key (``budgets``, tokens per KV head; ``None`` for a document whose budget
    is not known yet, whose key then matches nothing). Under ``document`` budgets with
    ``--budget`` the per-document budget depends on the whole corpus's length, RVQ's
    codebooks on all of its rows, a streamed ``independent`` segment's room in the window
    on its share of the corpus, and a ``whole`` segment's rows and selection on all of it
    (and a stream scorer's final selection), so every key covers every document.
    """
    if AUTO in (options.context, options.budgets, options.stream_scorer) or options.stream is None:
        raise ValueError("segment keys need resolved options: BuildOptions.resolved")
    base = {"model": fingerprint, "recipe": recipe.source, "probes": list(recipe.probes),
            "options": options.key_json()}
    if options.surveyed and budgets is None:
        raise ValueError("corpus budgets are part of the keys: pass them")
    if ((options.budgets == "document" and options.budget is not None) or options.quant == "rvq"
            or (options.stream and options.context == "independent") or options.context == "whole"
            or options.stream_scorer is not None):
        base["corpus"] = [d.sha256 for d in documents]
    keys, previous = [], ""
    for i, d in enumerate(documents):
        context = previous if options.context == "chained" else ""
        item = {**base, "doc": d.sha256, "path": d.path, "context": context}
        if options.surveyed:
            item["budget"] = budgets[i] if budgets[i] is not None else f"unknown {i}"
        previous = hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()
        keys.append(previous)
    return keys


# A streamed build's first pass keeps at most this many times the budget (less where the
# window's room is smaller): the final selection has that much to choose from, and the
# build's memory and time follow the budget, not a long window's room. Measured streams
# had 1.2-3.1x (docs/methods.md section 2).
FIRST_PASS_SHARE = 4

# The most bytes of probe attention per scorer call, by device type. On a GPU every op is a
# launch, so all layers go in one call; on a CPU a matrix that stays in cache is faster
# than one big pass (measured: 0.76 s against 1.25 s of scoring in a 7.5 s build).
SCORE_CALL_BYTES = {"cuda": 256 << 20, "cpu": 4 << 20}


class _Compiler:
    """The model-side state of one compilation: model, scorer, probe, codec, rotary."""

    def __init__(self, tk: Tokenized, options: BuildOptions, lm: LoadedModel):
        self.model, self.options, self.lm = lm.model, options, lm
        cap = lm.capability
        self.layers, self.kv_heads, self.head_dim = cap.num_layers, cap.num_kv_heads, cap.head_dim
        self.rotaries = rotaries(self.model)  # per layer; the compiler's KV stacks all layers
        self.device, self.dtype = lm.device, lm.dtype
        self.scorer = options.make_scorer()
        self.codecs = options.codecs(self.layers, self.head_dim)
        self.probe = torch.tensor(tk.probe_ids, dtype=torch.long, device=self.device)
        self.seconds = {"prefill": 0.0, "score": 0.0}

    def stored(self, kv: RaggedKV) -> RaggedKV:
        """Pre-RoPE KV (one segment or the framing; layers stacked) as the pack stores it: through
        each layer's codecs (a run per head: groups stay in it)."""
        if not self.codecs[0][0].per_run:
            return kv  # codebooks learned on the whole corpus at write time: context sees the rows unquantised
        layers = kv.split(self.layers)
        if all(c == self.codecs[0] for c in self.codecs):
            layers = [kv]  # one call for every layer
        keys, values = [], []
        for (kc, vc), part in zip(self.codecs, layers):
            keys.append(kc.roundtrip(part.keys, part.lengths))
            values.append(vc.roundtrip(part.values, part.lengths))
        return kv.replace(keys=torch.cat(keys), values=torch.cat(values))

    def unrotated(self, kv: RaggedKV, positions: torch.Tensor) -> RaggedKV:
        """Post-RoPE KV as attended (layers stacked), keys turned back before RoPE, positions
        replaced by ``positions`` (where the tokens stand in the corpus)."""
        return kv.replace(keys=unrotate(kv, self.rotaries), positions=positions)

    def attendable(self, seg: RaggedKV, origin: int) -> RaggedKV:
        """A stored segment as later tokens attend to it, placed exactly as a pack is loaded
        (so reused and fresh segments give the same context)."""
        return place(seg, self.rotaries, self.device, self.dtype, shift=origin)

    def prefill(self, ids: torch.Tensor, cache: PackCache) -> None:
        t0 = time.perf_counter()
        forward(self.model, ids[None], cache, logits_to_keep=1)
        if self.device.type == "cuda":  # so that the time is the forward's, not the scoring's
            torch.cuda.synchronize(self.device)
        self.seconds["prefill"] += time.perf_counter() - t0

    def new_tokens(self, cache: PackCache, n: int, positions: torch.Tensor) -> tuple[RaggedKV, torch.Tensor]:
        """The first ``n`` new tokens of every layer of ``cache``, stacked (layer-major heads), and
        the keys of the rest (the probe) ``[layers x kv_heads, rest, head_dim]``."""
        keys = torch.stack([layer.new_keys[0] for layer in cache.layers])  # [layers, kv_heads, t, head_dim]
        values = torch.stack([layer.new_values[0] for layer in cache.layers])
        heads, d = self.layers * self.kv_heads, self.head_dim
        kv = RaggedKV.from_dense(keys[:, :, :n].reshape(heads, n, d), values[:, :, :n].reshape(heads, n, d), positions)
        return kv, keys[:, :, n:].reshape(heads, keys.shape[2] - n, d)

    def score(self, candidates: RaggedKV, probe_keys: torch.Tensor | None, queries: torch.Tensor | None,
              chunk_start: int | None = None, reconstruction: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[N]`` of stacked candidates (every layer, layer-major), as many heads per scorer
        call as keep the probe's attention matrix ``[heads, group x probe, candidates]`` under
        :data:`SCORE_CALL_BYTES`; ``queries`` ``None`` (a scorer that does not read the task
        prompt): all heads in one call. ``chunk_start``, ``reconstruction`` (``[N]``): see
        :class:`LayerView`."""
        if queries is None:  # a scorer that does not read the task prompt: no attention matrix to bound
            return self.scorer.score(LayerView(candidates, None, None, self.head_dim**-0.5, kv_heads=self.kv_heads,
                                               chunk_start=chunk_start, reconstruction=reconstruction))
        heads = candidates.heads
        group = queries.shape[0] // heads
        n_probe = probe_keys.shape[1]
        per_head = group * n_probe * (candidates.max_len + n_probe) * 4
        most = max(1, SCORE_CALL_BYTES.get(self.device.type, SCORE_CALL_BYTES["cpu"]) // max(per_head, 1))
        per_call = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= most)
        scaling = self.head_dim**-0.5
        parts = candidates.split(heads // per_call)
        recon = [None] * len(parts) if reconstruction is None else reconstruction.split([p.rows for p in parts])
        return torch.cat([
            self.scorer.score(LayerView(part, probe_keys[i * per_call : (i + 1) * per_call],
                                        queries[i * per_call * group : (i + 1) * per_call * group], scaling,
                                        first_head=i * per_call, kv_heads=self.kv_heads,
                                        chunk_start=chunk_start, reconstruction=recon[i]))
            for i, part in enumerate(parts)])

    def framing(self, tk: Tokenized) -> tuple[RaggedKV, RaggedKV]:
        """The framing prefix, prefilled once and kept whole (it holds the attention sinks): as
        stored, and as later tokens attend to it."""
        n = len(tk.prefix_ids)
        empty = RaggedKV.empty(self.kv_heads, self.head_dim, self.dtype, self.device)
        cache = PackCache([empty] * self.layers, start=0, capacity=n)
        self.prefill(torch.tensor(tk.prefix_ids, device=self.device), cache)
        kv = self.new_tokens(cache, n, torch.arange(n, device=self.device))[0]
        stored = self.stored(self.unrotated(kv, kv.positions))
        return stored, self.attendable(stored, 0)

    def read_corpus(self, tk: Tokenized, framing: RaggedKV, progress=None) -> RaggedKV:
        """Every corpus token's KV ``[layers x kv_heads]`` (post-RoPE, absolute positions, all kept),
        prefilled after ``framing`` (attendable) in chunks of ``chunk_size``: each row is
        computed against the whole corpus before it, as a press sees it. ``progress(tokens)``."""
        o, n_prefix = self.options, len(tk.prefix_ids)
        stream = torch.tensor(tk.stream()[n_prefix:], dtype=torch.long, device=self.device)
        seen = RaggedKV.empty(self.layers * self.kv_heads, self.head_dim, self.dtype, self.device)
        for start in range(0, stream.numel(), o.chunk_size):
            chunk = stream[start : start + o.chunk_size]
            at = n_prefix + start
            cache = PackCache(RaggedKV.cat([framing, seen]).split(self.layers), start=at, capacity=chunk.numel(),
                              transient=True)
            self.prefill(chunk, cache)
            seen = RaggedKV.cat([seen, self.new_tokens(cache, chunk.numel(),
                                                       torch.arange(at, at + chunk.numel(), device=self.device))[0]])
            if progress is not None:
                progress(start + chunk.numel())
        return seen

    def reconstruct(self, tk: Tokenized, framing: RaggedKV, seen: RaggedKV, context: list[RaggedKV]) -> torch.Tensor:
        """Reconstruction scores ``[N]`` of every row of ``seen`` (:meth:`read_corpus`): the corpus
        is repeated after itself, ``chunk_size`` tokens per forward (fewer where the window has
        less room), and each token scored by the most attention the repeat of its chunk pays it
        (:mod:`kvcompile.reconstruction`). ``context``: ``[framing | seen]`` per layer, as attended."""
        layers, heads, d = self.layers, self.kv_heads, self.head_dim
        n_prefix, n = len(tk.prefix_ids), tk.corpus_tokens
        room = self.lm.max_positions - tk.total - prompt_tokens(self.lm.tokenizer)
        if room < 1:
            raise CorpusError(f"the corpus leaves no room in the {self.lm.max_positions}-token window to repeat it "
                              "(the task-aware scorer's reconstruction term): build with --recon 0, or --context "
                              "chained")
        corpus = tk.stream()[n_prefix:]
        keys = seen.keys.view(layers, heads, n, d)  # every token in every head, by position
        prefix = framing.keys.view(layers, heads, n_prefix, d)
        scores = torch.empty(layers, heads, n, device=self.device)
        max_bytes = SCORE_CALL_BYTES.get(self.device.type, SCORE_CALL_BYTES["cpu"])
        step = min(self.options.chunk_size, room)
        for start in range(0, n, step):
            end = min(start + step, n)
            ids = repeat_ids(self.lm.tokenizer, corpus, start, end)
            cache = PackCache(context, start=tk.total, capture_queries=len(ids), capacity=len(ids))
            self.prefill(torch.tensor(ids, dtype=torch.long, device=self.device), cache)
            t0 = time.perf_counter()
            for i, layer in enumerate(cache.layers):
                scores[i, :, start:end] = max_attention(layer.queries[0], prefix[i], keys[i, :, start:end],
                                                        layer.new_keys[0], d**-0.5, max_bytes)
            self.seconds["score"] += time.perf_counter() - t0
        return scores.flatten()

    def score_corpus(self, tk: Tokenized, framing: RaggedKV, seen: RaggedKV) -> torch.Tensor:
        """Scores ``[N]`` of every row of ``seen`` (:meth:`read_corpus`), from one forward of the
        task prompt after the framing and the whole corpus (and the corpus repeated, for a scorer
        that reads reconstruction)."""
        context = RaggedKV.cat([framing, seen]).split(self.layers)  # one copy, for every forward after the corpus
        recon = self.reconstruct(tk, framing, seen, context) if self.scorer.reads_reconstruction else None
        if not self.scorer.reads_task_prompt:
            return self.score(seen, None, None, reconstruction=recon)
        n_probe = self.probe.numel()
        cache = PackCache(context, start=tk.total, capture_queries=n_probe, capacity=n_probe)
        self.prefill(self.probe, cache)
        t0 = time.perf_counter()
        probe_keys = torch.stack([layer.new_keys[0] for layer in cache.layers]).flatten(0, 1)  # [layers x heads, P, D]
        queries = torch.cat([layer.queries[0] for layer in cache.layers])
        del cache
        scores = self.score(seen, probe_keys, queries, reconstruction=recon)
        self.seconds["score"] += time.perf_counter() - t0
        return scores

    def select_corpus(self, tk: Tokenized, seen: RaggedKV, scores: torch.Tensor, ratio: float,
                      budgets: Sequence[int] | None = None) -> torch.Tensor:
        """Which rows of ``seen`` (corpus rows at their corpus positions, every layer stacked:
        every token from :meth:`read_corpus`, or a first pass's survivors) are kept: bool ``[N]``.

        One selection over the corpus, ``ratio`` of it per layer (documents compete), or with
        ``budgets`` (tokens per KV head, per document) one per document, each among its own rows.
        """
        o, n_prefix = self.options, len(tk.prefix_ids)
        protected = seen.positions < o.sinks
        if budgets is None:
            target = self.kv_heads * max(1, round(ratio * tk.corpus_tokens))
            return select(scores, seen, target, protected, o.head_floor, self.layers)
        keep, start = torch.zeros_like(protected), n_prefix
        for ids, budget in zip(tk.doc_ids, budgets):
            rows = (seen.positions >= start) & (seen.positions < start + len(ids))
            counts = seen.head_counts(rows)
            doc = seen.take(rows, counts.tolist(), counts)
            keep[rows] = select(scores[rows], doc, self.kv_heads * budget, protected[rows], o.head_floor,
                                self.layers)
            start += len(ids)
        return keep

    @torch.no_grad()
    def survey(self, tk: Tokenized, framing: RaggedKV, ratio: float) -> list[int]:
        """What one corpus-wide selection keeps of each document: rows, summed over layers and heads.

        The whole corpus is prefilled after the framing (every token kept, so its rows are
        computed against the full corpus, as a press sees them), then the task prompt, whose
        attention scores every corpus token at once; the build's own scorer and selection
        then keep ``ratio`` of the corpus per layer. ``framing``: as from :meth:`framing`,
        attendable.
        """
        seen = self.read_corpus(tk, framing)
        keep = self.select_corpus(tk, seen, self.score_corpus(tk, framing, seen), ratio)
        return torch.bincount(self.document_of(tk, seen.positions[keep]), minlength=len(tk.doc_ids)).tolist()

    def document_of(self, tk: Tokenized, positions: torch.Tensor) -> torch.Tensor:
        """The document ``[N]`` that each corpus position falls in."""
        ends = torch.tensor([len(ids) for ids in tk.doc_ids], device=positions.device).cumsum(0) + len(tk.prefix_ids)
        return torch.bucketize(positions, ends, right=True)

    @torch.no_grad()
    def whole(self, tk: Tokenized, framing: RaggedKV, budgets: Sequence[int] | None, progress=None,
              ) -> list[RaggedKV]:
        """Compile every document from one reading of the whole corpus (``--context whole``).

        The corpus is prefilled once after the framing with every token kept
        (:meth:`read_corpus`), the task prompt scores all of it (:meth:`score_corpus`), one
        selection keeps the budget (:meth:`select_corpus`: corpus-wide, or per document with
        ``budgets``), and the kept rows are cut into one segment per document. Rows are thus
        computed as a press computes them, against the whole uncompressed corpus, and the
        build costs one prefill; but every segment depends on every document.
        Returns the segments as stored (positions relative to each document's start).
        """
        seen = self.read_corpus(tk, framing, progress)
        ratio = corpus_ratio(tk, self.options)
        if keeps_everything(tk, ratio, budgets):  # nothing to choose: spare the scoring forwards
            keep = torch.ones(seen.rows, dtype=torch.bool, device=self.device)
        else:
            keep = self.select_corpus(tk, seen, self.score_corpus(tk, framing, seen), ratio, budgets)
        kept = seen.where(keep)
        return self.cut(tk, self.stored(self.unrotated(kept, kept.positions)))

    def cut(self, tk: Tokenized, kept: RaggedKV) -> list[RaggedKV]:
        """Kept rows of the whole corpus (as stored, at corpus positions, every layer stacked) cut
        into one segment per document, positions relative to each document's start."""
        docs = len(tk.doc_ids)
        doc = self.document_of(tk, kept.positions)
        counts = torch.bincount(doc * kept.heads + kept.head_ids(), minlength=docs * kept.heads).view(docs, -1)
        per_head = counts.tolist()  # the one host sync for every document's cut
        segments, start = [], len(tk.prefix_ids)
        for d, ids in enumerate(tk.doc_ids):
            segments.append(kept.take(doc == d, per_head[d], counts[d]).shifted(-start))
            start += len(ids)
        return segments

    def compacted(self, parts: Sequence[RaggedKV]) -> RaggedKV:
        """Stored parts (layers stacked) placed one after another at compacted positions: each
        head's rows at ``0, 1, ...`` in order, as a pack is loaded with ``--positions compact``."""
        # Joined as stored (fp16 by default; reused segments come so too), then widened once: a
        # streamed compile's context is the window's room, and a copy of it per part would double it.
        dtype = parts[0].keys.dtype
        kv = RaggedKV.cat([p.to(self.device, dtype) for p in parts])
        return self.attendable(kv.replace(positions=within_heads(kv.lengths, self.device)), 0)

    @torch.no_grad()
    def segment(self, ids: list[int], origin: int, context: list[RaggedKV], target: int, protect: int,
                progress=None, room: int | None = None) -> RaggedKV:
        """Compile one document's tokens, which stand at positions ``origin...``, after
        ``context`` (the attendable parts that precede it, in order, every layer stacked).

        Chunked prefill ``[context | kept of this document | chunk | task prompt]``; the
        layer's budget (``target`` per head on average) grows with the share of the
        document seen, so earlier survivors of this document compete again. ``protect``:
        positions below it are always kept (sinks beyond the framing). Concatenation,
        scoring and selection run on every layer and head at once (stacked); the kept
        counts come back to the host in one transfer per chunk.

        The kept rows are held as stored (pre-RoPE, at their corpus positions) and placed
        for each chunk: at their own positions, or, with ``room`` (a streamed compile, whose
        ``context`` is compacted), compacted after each head's context with the chunk after
        the longest head (cut to what the window has left after it for the task prompt), and
        no head growing past ``room`` rows, context included: however long the corpus, no
        position reaches the window's end.
        Returns the kept KV as stored, every layer stacked, positions relative to ``origin``.
        """
        o, device = self.options, self.device
        stream = torch.tensor(ids, dtype=torch.long, device=device)
        ctx = RaggedKV.cat(context)
        cap = None if room is None else torch.tensor([room - n for n in ctx.lengths], device=device)
        kept = RaggedKV.empty(self.layers * self.kv_heads, self.head_dim, self.dtype, device)
        frozen = [0] * kept.heads  # per head: its first rows, judged and kept by a recursive scorer
        start = 0
        while start < len(ids):
            if room is None:
                at, attended, n = origin + start, self.attendable(kept, 0), o.chunk_size
                full = False
            else:
                heads = [c + k for c, k in zip(ctx.lengths, kept.lengths)]
                at = max(heads)
                n = min(o.chunk_size, self.lm.max_positions - self.probe.numel() - at)  # the chunk fits the window
                full = at + n > room
                behind = torch.repeat_interleave(torch.tensor(ctx.lengths, device=device),
                                                 torch.tensor(kept.lengths, device=device), output_size=kept.rows)
                attended = self.attendable(kept.replace(positions=behind + within_heads(kept.lengths, device)), 0)
            chunk = stream[start : start + n]
            n, end = chunk.numel(), start + chunk.numel()
            budget = layer_budget(target, end, len(ids), self.kv_heads)
            select_now = full or budget < kept.rows // self.layers + self.kv_heads * n
            n_probe = self.probe.numel() if select_now and self.scorer.reads_task_prompt else 0
            x = torch.cat([chunk, self.probe]) if n_probe else chunk
            cache = PackCache(RaggedKV.cat([ctx, attended]).split(self.layers), start=at, capture_queries=n_probe,
                              capacity=x.numel(), transient=True)
            self.prefill(x, cache)
            t1 = time.perf_counter()
            chunk_kv, probe_keys = self.new_tokens(cache, n, torch.arange(at, at + n, device=device))
            queries = torch.cat([layer.queries[0] for layer in cache.layers]) if n_probe else None
            del cache  # and with it the concatenated context: scoring needs only the kept rows and the chunk
            here = torch.arange(origin + start, origin + end, device=device).repeat(chunk_kv.heads)
            candidates = RaggedKV.cat([kept, self.unrotated(chunk_kv, here)])  # as stored
            if select_now:  # queries: [layers x q_heads, probe, D], or None without a task prompt
                view, protected = RaggedKV.cat([attended, chunk_kv]), candidates.positions - origin < protect
                if any(frozen):  # a recursive scorer judges only what it has not judged and kept before
                    is_frozen = within_heads(candidates.lengths, device) < torch.repeat_interleave(
                        torch.tensor(frozen, device=device), torch.tensor(candidates.lengths, device=device),
                        output_size=candidates.rows)
                    open_view = view.take(~is_frozen, [c - f for c, f in zip(candidates.lengths, frozen)])
                    scores = torch.full((candidates.rows,), float("inf"), device=device).masked_scatter(
                        ~is_frozen, self.score(open_view, probe_keys, queries, at).float())
                    protected = protected | is_frozen
                else:
                    scores = self.score(view, probe_keys, queries, at)
                keep = select(scores, candidates, budget, protected, o.head_floor, self.layers, cap)
                counts = candidates.head_counts(keep)
                kept_counts = counts.tolist()  # the one host sync of the chunk
                if self.scorer.recursive:  # what it judged and kept stays; its window is judged again
                    frozen = [max(f, k - self.scorer.window(c - f))
                              for f, k, c in zip(frozen, kept_counts, candidates.lengths)]
                candidates = candidates.take(keep, kept_counts, counts)
            kept = candidates
            self.seconds["score"] += time.perf_counter() - t1
            if progress is not None:
                progress(end)
            start = end
        return self.stored(kept).shifted(-origin)

    def documents(self, tk: Tokenized, framing: RaggedKV, framing_ctx: RaggedKV, budgets: Sequence[int], progress,
                  reused: dict[int, RaggedKV]) -> list[RaggedKV]:
        """Compile every document into a segment, one after another (``independent`` or
        ``chained``, streamed or not: :meth:`segment`), or take it from ``reused`` (by document
        index). ``framing``: as stored; ``framing_ctx``: attendable. Returns the segments as
        stored (positions relative to each document's start)."""
        o, n_prefix, starts = self.options, len(tk.prefix_ids), document_starts(tk)
        room = stream_room(tk, o, self.lm.max_positions) if o.stream else None
        independent = o.context == "independent"
        segments: list[RaggedKV] = []
        chained = [framing_ctx]  # the framing, then each placed segment (at its own positions)
        done = n_prefix
        for d, ids in enumerate(tk.doc_ids):
            if d in reused:
                seg = reused[d]
            else:
                origin = n_prefix if independent else starts[d]
                context = None  # a streamed compile's previous context goes before the next is compacted
                if independent:
                    context = [framing_ctx]
                else:
                    context = [self.compacted([framing, *segments])] if o.stream else chained
                doc_room = room
                if room is not None and independent:  # segments meet only at load: each gets its share of the room
                    doc_room = n_prefix + (room - n_prefix) * len(ids) // tk.corpus_tokens
                report = (lambda n, done=done, d=d: progress(done + n, d)) if progress else None
                seg = self.segment(ids, origin, context, budgets[d], o.sinks - starts[d], report, doc_room)
            segments.append(seg)
            done += len(ids)
            if progress is not None:
                progress(done, d + 1)
            if not independent and not o.stream:
                chained.append(self.attendable(seg, starts[d]))
        return segments

    @torch.no_grad()
    def reselect(self, tk: Tokenized, framing: RaggedKV, framing_ctx: RaggedKV, budgets: Sequence[int],
                 progress=None) -> list[RaggedKV]:
        """A streamed compile in two passes (``stream_scorer``): the stream scorer compresses the
        chained stream (:meth:`documents`, recursively for LagKV) to what the window holds, but
        no more than :data:`FIRST_PASS_SHARE` times the budget, each document keeping the same
        share; then the task prompt follows those survivors, compacted, and the build's scorer
        selects the budget among them (:meth:`select_corpus`: corpus-wide, or ``budgets`` per
        document). An attention-free first pass forwards no task prompt per
        chunk, and the final selection sees the whole stream at once.
        Returns the segments as stored (positions relative to each document's start).
        """
        o, n_prefix = self.options, len(tk.prefix_ids)
        first = _Compiler(tk, o.first_pass(), self.lm)
        lengths = [len(ids) for ids in tk.doc_ids]
        room = stream_room(tk, o, self.lm.max_positions) - n_prefix - len(lengths)  # rounding: a row per document
        ratio = corpus_ratio(tk, o)
        share = min(1.0, max(ratio, min(room / tk.corpus_tokens, FIRST_PASS_SHARE * ratio)))
        drafts = first.documents(tk, framing, framing_ctx, document_budgets(lengths, share), progress, {})
        for part, seconds in first.seconds.items():
            self.seconds[part] += seconds
        starts = document_starts(tk)
        drafted = RaggedKV.cat([seg.shifted(start) for seg, start in zip(drafts, starts)])  # at corpus positions
        per_document = budgets if o.budgets == "document" else None
        if keeps_everything(tk, ratio, per_document):
            return [self.stored(seg) for seg in drafts]
        # Copies of a room-sized context are the peak memory: each goes as soon as it is used,
        # and the survivors are scored a layer at a time.
        placed = self.compacted([framing, *drafts])  # the framing's rows first in every head
        del drafts
        layers = placed.split(self.layers)
        probe_keys = queries = None
        if self.scorer.reads_task_prompt:
            n_probe = self.probe.numel()
            cache = PackCache(layers, start=max(placed.lengths), capture_queries=n_probe, capacity=n_probe,
                              transient=True)
            self.prefill(self.probe, cache)
            probe_keys = torch.stack([layer.new_keys[0] for layer in cache.layers]).flatten(0, 1)
            queries = torch.cat([layer.queries[0] for layer in cache.layers])
            del cache
        t0 = time.perf_counter()
        h, q = self.kv_heads, (0 if queries is None else queries.shape[0] // self.layers)
        scores = torch.cat([
            self.score(layer.where(within_heads(layer.lengths, self.device) >= n_prefix),
                       None if probe_keys is None else probe_keys[li * h : (li + 1) * h],
                       None if queries is None else queries[li * q : (li + 1) * q])
            for li, layer in enumerate(layers)])
        del placed, layers
        keep = self.select_corpus(tk, drafted, scores, ratio, per_document)
        self.seconds["score"] += time.perf_counter() - t0
        return self.cut(tk, self.stored(drafted.where(keep)))


def corpus_ratio(tk: Tokenized, options: BuildOptions) -> float:
    """The share of the corpus kept: ``budget`` over the cache's tokens (it overrides the ratio,
    as :func:`target_tokens` has it), else ``ratio``."""
    return options.ratio if options.budget is None else min(1.0, options.budget / tk.total)


def keeps_everything(tk: Tokenized, ratio: float, budgets: Sequence[int] | None) -> bool:
    """Whether a selection at ``ratio`` (or with per-document ``budgets``, tokens per KV head)
    keeps every corpus token, so that scoring cannot change what is kept."""
    if budgets is None:
        return round(ratio * tk.corpus_tokens) >= tk.corpus_tokens
    return all(b >= len(ids) for b, ids in zip(budgets, tk.doc_ids, strict=True))


@torch.no_grad()
def plan_budgets(tk: Tokenized, options: BuildOptions, lm: LoadedModel) -> tuple[list[int], float]:
    """Each document's budget (tokens kept per KV head, on average) under ``options.budgets``
    (:mod:`kvcompile.budgets`), and the seconds spent on it (the ``corpus`` policy's survey
    prefill; ``document`` needs no model)."""
    ratio, lengths = corpus_ratio(tk, options), [len(ids) for ids in tk.doc_ids]
    if not options.surveyed:  # under whole context, the compile's one selection decides (these are nominal)
        return document_budgets(lengths, ratio), 0.0
    t0 = time.perf_counter()
    with pack_attention(lm.model):
        c = _Compiler(tk, options, lm)
        kept = c.survey(tk, c.framing(tk)[1], ratio)
    return corpus_budgets(kept, lengths, ratio, options.doc_floor), time.perf_counter() - t0


@torch.no_grad()
def compile_corpus(tk: Tokenized, options: BuildOptions, lm: LoadedModel, budgets: Sequence[int],
                   progress=None, reused: dict[int, list[RaggedKV]] | None = None) -> Compiled:
    """Compile every document into a segment (or take it from ``reused``, by document index:
    one RaggedKV per layer, as :meth:`Pack.segments` gives them) and assemble the pack's KV
    in corpus order.

    ``budgets``: per document, tokens kept per KV head (:func:`plan_budgets`). The framing
    prefix is prefilled once and kept whole. In ``independent`` mode each document is
    compiled right after the framing (at the positions that follow it) and shifted to its
    place in the corpus when assembled; in ``chained`` mode it is compiled at its place,
    after the kept KV of every earlier document (with ``options.stream``, compacted:
    :meth:`_Compiler.segment`). ``progress(tokens, documents)`` is called with the numbers
    compiled so far.
    """
    options = options.resolved(fits(tk, lm.max_positions))
    with pack_attention(lm.model):
        stacked = {d: RaggedKV.stack(seg) for d, seg in (reused or {}).items()}
        return _compile(_Compiler(tk, options, lm), tk, options, list(budgets), progress, stacked)


def _compile(c: _Compiler, tk: Tokenized, options: BuildOptions, budgets: list[int], progress,
             reused: dict[int, RaggedKV]) -> Compiled:
    framing, framing_ctx = c.framing(tk)
    starts = document_starts(tk)
    if options.context == "whole" or options.stream_scorer is not None:
        # Their keys cover the corpus (a selection over all of it): every segment is reused, or none.
        if len(reused) == len(tk.doc_ids):
            segments = [reused[d] for d in range(len(tk.doc_ids))]
        elif options.context == "whole":
            report = (lambda n: progress(len(tk.prefix_ids) + n, 0)) if progress else None
            segments = c.whole(tk, framing_ctx, budgets if options.budgets == "document" else None, report)
        else:
            segments = c.reselect(tk, framing, framing_ctx, budgets, progress)
        budgets = [round(seg.rows / (c.layers * c.kv_heads)) for seg in segments]  # what each kept, per head
        if progress is not None:
            progress(tk.total, len(tk.doc_ids))
    else:
        segments = c.documents(tk, framing, framing_ctx, budgets, progress, reused)
    return _assemble(c, tk, framing, segments, starts, budgets)


def document_starts(tk: Tokenized) -> list[int]:
    """Each document's first position in the cache, then the end of the corpus."""
    starts = [len(tk.prefix_ids)]
    for ids in tk.doc_ids:
        starts.append(starts[-1] + len(ids))
    return starts


def _assemble(c: _Compiler, tk: Tokenized, framing: RaggedKV, segments: list[RaggedKV], starts: list[int],
              budgets: list[int]) -> Compiled:
    """The pack's KV in corpus order: the framing, then each segment shifted to its start."""
    every = RaggedKV.cat([framing.to("cpu"), *(seg.to("cpu").shifted(start) for seg, start in zip(segments, starts))])
    return Compiled(every.split(c.layers), tk, budgets, c.seconds)
