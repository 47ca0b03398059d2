"""kvcompile's task-aware packs next to kvpress's query-agnostic presses, full context, RAG and none.

    make bench-peers          # or: python bench/peers.py --jobs 2 --out docs/benchmarks/peers
    # one quick ablation: one corpus, one ratio, one press, no RAG
    python bench/peers.py --corpora squad:14 --ratios 0.25 --questions 10 --presses snapkv --no-rag \\
        --variant pool41:scorer_params.pool=41 --out /tmp/peers

Same model, corpus, questions, framing, attention and greedy decoding for every method
(``kvcompile eval``'s machinery). For each corpus the context ``[framing | corpus |
task prompt]`` is prefilled once with hooks that record each attention layer's inputs;
every press then compresses each layer from exactly what its own forward hook would
receive (kvpress compresses layer by layer after the layer's forward, and a layer's
compression never changes the prefill's later layers, so one prefill serves every press
and ratio). A check at start-up runs each press through kvpress's own hook on a short
input and compares the caches. The task prompt is the presses' observation window (it is
what SnapKV and Finch score with); each press's scores pick the best ``ratio x context``
tokens of each KV head among the corpus tokens (the task prompt's own KV is dropped, as
kvcompile drops it), and questions are placed right after the corpus, as in a pack.

Statistics (``kvcompile/evaluation/stats.py``): gain kept per method with its delta-method
standard error over the questions; paired differences in gain kept between kvcompile
(and each ``--variant``) and every press, the best press at each ratio, RAG and (for a
variant) plain kvcompile; all pooled over corpora, each corpus's questions normalised by
its own full-context gain. ``full``, ``none`` and ``rag`` answers are cached on disk
(``kvcompile/evaluation/answercache.py``), so reruns and ablations skip them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import torch
from transformers import DynamicCache

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvcompile.builder import BuildOptions, tokenize  # noqa: E402
from kvcompile.cache import forward  # noqa: E402
from kvcompile.corpus import read_corpus  # noqa: E402
from kvcompile.data.synthetic import write_corpus  # noqa: E402
from kvcompile.errors import CorpusError  # noqa: E402
from kvcompile.evaluation import answercache, report, stats  # noqa: E402
from kvcompile.evaluation.datasets import load_dataset  # noqa: E402
from kvcompile.evaluation.methods import RagMethod, SessionMethod, pack_method, prefill_method  # noqa: E402
from kvcompile.evaluation.run import MethodResult, evaluate, fill_gain_kept, linearised  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.pack import load  # noqa: E402
from kvcompile.pipeline import build  # noqa: E402
from kvcompile.ragged import RaggedKV, within_heads  # noqa: E402
from kvcompile.recipe import load_recipe  # noqa: E402
from kvcompile.rope import place, rotaries, unrotate  # noqa: E402
from kvcompile.session import Session  # noqa: E402

PRESSES = ("snapkv", "finch", "expected_attention", "knorm", "lagkv", "streaming_llm")
# Three SQuAD articles (~4k tokens each) and a HotpotQA pool of 30 questions: their gold paragraphs (~5.8k tokens)
# and distractors up to ~8k tokens.
DEFAULT_CORPORA = "squad:2,squad:8,squad:14,hotpotqa:0:8000"


def import_kvpress():
    """kvpress, imported so that kvcompile's packs still work beside it.

    Importing kvpress wraps every registered attention function for its head-masking
    presses (AdaKV and the like, not used here); the wrapper expects tensors, not a pack's
    ragged layers, so kvcompile's own attention is registered again.
    """
    import kvpress
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from kvcompile.attention import ATTN_IMPLEMENTATION, kvcompile_attention

    ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] = kvcompile_attention
    return kvpress


def presses(ratio: float, window: int, names=PRESSES) -> dict:
    """The kvpress presses compared, at kept ratio ``ratio`` (kvpress's compression_ratio = 1 - ratio)."""
    kvpress = import_kvpress()

    c = 1 - ratio
    make = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=c, window_size=window),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=c),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=c),
        "lagkv": lambda: kvpress.LagKVPress(compression_ratio=c),
        "streaming_llm": lambda: kvpress.StreamingLLMPress(compression_ratio=c),
        "finch": lambda: _finch(kvpress, c, window),
    }
    return {name: make[name]() for name in names}


def _finch(kvpress, c: float, window: int):
    finch = kvpress.FinchPress(compression_ratio=c, rerotate_keys=False)
    finch.window_size = window  # the task prompt, as the delimiter would have set it
    return finch


def attention_modules(model):
    mods = [layer.self_attn for layer in model.model.layers]
    for m in mods:  # kvpress reads the rotary embedding from the attention module
        m.rotary_emb = model.model.rotary_emb
    return mods


_NOT_FOR_PRESSES = ("hidden_states", "past_key_values", "cache")


@torch.no_grad()
def capture(lm, ids: list[int]) -> list[tuple]:
    """Prefill ``ids`` once; per layer (hidden_states, keys, values, kwargs) as kvpress's hook sees them."""
    seen = {}
    mods = attention_modules(lm.model)
    hooks = [m.register_forward_hook(lambda mod, a, kw, out, i=i: seen.__setitem__(i, kw), with_kwargs=True)
             for i, m in enumerate(mods)]
    cache = DynamicCache(config=lm.config)
    try:
        forward(lm.model, torch.tensor([ids], device=lm.device), cache, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return [(seen[i]["hidden_states"], cache.layers[i].keys, cache.layers[i].values,
             {k: v for k, v in seen[i].items() if k not in _NOT_FOR_PRESSES})
            for i in range(len(mods))]


@torch.no_grad()
def compress(press, lm, captured, context_len: int, ratio: float) -> list[RaggedKV]:
    """Score every layer with ``press`` and keep, per KV head, the ``ratio * context_len`` best corpus tokens.

    All six presses are score-then-top-k (kvpress's ``ScorerPress.compress``; Finch's
    ``compress`` without re-rotation is the same); taking the top-k over the corpus alone
    gives each press exactly kvcompile's budget, whether or not it would have spent part
    of it on the task prompt.
    """
    n = max(1, round(ratio * context_len))
    kv = []
    for module, (hs, keys, values, kwargs) in zip(attention_modules(lm.model), captured):
        scores = press.score(module, hs, keys, values, None, kwargs)[0, :, :context_len]
        idx = scores.topk(n, dim=-1).indices.sort(dim=-1).values  # [kv_heads, n]: equal budgets
        rows = idx[:, :, None].expand(-1, -1, keys.shape[-1])
        kv.append(RaggedKV.from_dense(keys[0].gather(1, rows), values[0].gather(1, rows), idx))
    return kv


PLACEMENTS = ("original", "compact")


@torch.no_grad()
def compacted(lm, kv: list[RaggedKV]) -> tuple[list[RaggedKV], int]:
    """A press's kept KV (post-RoPE, at corpus positions) re-rotated as a pack is loaded
    with ``--positions compact``: each head's rows at ``0, 1, ...`` in corpus order, and
    questions after the longest head (kvpress's ``KeyRerotationPress`` does the same per
    layer). Returns the layers and where questions start."""
    out = []
    for layer, rotary in zip(kv, rotaries(lm.model)):
        stored = layer.replace(keys=unrotate(layer, [rotary]),
                               positions=within_heads(layer.lengths, layer.keys.device))
        out.append(place(stored, [rotary], lm.device, lm.dtype))
    return out, max(max(layer.lengths) for layer in kv)


@torch.no_grad()
def check_against_kvpress_hooks(lm, ids: list[int], window: int, names=PRESSES) -> dict:
    """Each press through kvpress's own forward hooks vs. the captured path, on ``ids``."""
    captured = capture(lm, ids)
    result = {}
    for name, press in presses(0.5, window, names).items():
        if name == "finch":  # needs its delimiter token in the input; same score path as snapkv
            continue
        cache = DynamicCache(config=lm.config)
        # Registered before the press's own hooks, so it runs first (see kvpress_kwargs).
        shim = [m.register_forward_hook(kvpress_kwargs, with_kwargs=True) for m in attention_modules(lm.model)]
        try:
            with press(lm.model):
                forward(lm.model, torch.tensor([ids], device=lm.device), cache, logits_to_keep=1)
        finally:
            for h in shim:
                h.remove()
        ours = [press.compress(m, *c[:3], None, c[3])[0] for m, c in zip(attention_modules(lm.model), captured)]
        result[name] = all(torch.equal(a, layer.keys) for a, layer in zip(ours, cache.layers))
    return result


def kvpress_kwargs(module, args, kwargs, output):
    """Give kvpress 0.5.5's forward hook the keyword arguments it reads, whatever transformers passes.

    kvpress reads ``kwargs["past_key_values"]`` and ``kwargs["cache_position"]``;
    transformers 5.x no longer passes ``cache_position`` to the attention, and from 5.20 or
    so it passes the cache as ``cache``. A forward hook sees the same kwargs dict as the
    hooks registered after it, and runs after the forward, so adding the two keys here
    changes nothing the attention itself saw. The layer's cache already holds the ``q``
    new tokens, so their positions end at its length.
    """
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    kwargs["past_key_values"] = cache
    if kwargs.get("cache_position") is None:
        q = kwargs["hidden_states"].shape[1]
        end = cache.get_seq_length(module.layer_idx)
        kwargs["cache_position"] = torch.arange(end - q, end, device=kwargs["hidden_states"].device)


def unpinned(path: Path = REPO / "bench" / "constraints.txt", names=("transformers", "torch", "kvpress")) -> dict:
    """``{package: (installed, pinned)}`` for the packages whose version is not the one bench/constraints.txt pins."""
    import importlib.metadata as md

    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version
    out = {}
    for name in names:
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = None
        if name in pins and (have or "").split("+")[0] != pins[name]:
            out[name] = (have, pins[name])
    return out


# -- kvcompile build variants ----------------------------------------------------------------


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` -> (NAME, BuildOptions overrides).

    Any :class:`kvcompile.builder.BuildOptions` field (but ``ratio``, which ``--ratios``
    sets), and ``scorer_params.X`` for a scorer parameter. Values are JSON where they parse
    (``5``, ``0.1``, ``true``, ``null``), else strings. The options are checked here, before
    any model is loaded.
    """
    name, sep, rest = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise SystemExit(f"--variant {text!r}: want NAME:key=value,... (NAME of letters, digits, _ . + -)")
    fields = {f.name: f for f in dataclasses.fields(BuildOptions)}
    overrides: dict = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise SystemExit(f"--variant {name}: {item!r} is not key=value")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if key.startswith("scorer_params."):
            overrides.setdefault("scorer_params", {})[key.split(".", 1)[1]] = value
            continue
        if key not in fields or key == "ratio":
            raise SystemExit(f"--variant {name}: unknown option {key!r}; BuildOptions fields (ratio comes from "
                             f"--ratios): {', '.join(f for f in fields if f != 'ratio')}, and scorer_params.X")
        if isinstance(value, int) and not isinstance(value, bool) and "float" in str(fields[key].type):
            value = float(value)
        overrides[key] = value
    try:
        options = BuildOptions(ratio=0.25, **overrides)
        options.validate()
        options.make_scorer()
    except Exception as e:  # OptionError, or a scorer's TypeError on an unknown parameter
        raise SystemExit(f"--variant {name}: {e}") from None
    return name, overrides


# -- one corpus ----------------------------------------------------------------------------


def corpus_of(spec: str, n_questions: int, tmp: Path, lm, recipe):
    """A built-in dataset written as a corpus folder under ``tmp``: ``(evalset, folder, questions,
    tokenized corpus)``; the benchmarks' common start."""
    evalset = load_dataset(spec, questions=n_questions)
    folder = tmp / spec.replace(":", "_").replace("/", "_")
    write_corpus(evalset, folder)
    documents, _ = read_corpus([folder])
    return evalset, folder, evalset.questions[:n_questions], tokenize(documents, recipe, lm)


def run_corpus(spec: str, lm, recipe, ratios, n_questions, max_new_tokens, tmp: Path, log,
               press_names=PRESSES, rag: bool = True, variants: dict | None = None,
               nll_cache: Path | None = None, placements=("original",)) -> dict:
    variants = variants or {}
    evalset, folder, qas, tk = corpus_of(spec, n_questions, tmp, lm, recipe)
    if tk.total >= lm.max_positions:
        raise CorpusError(f"{spec}: {tk.total} tokens do not fit {lm.name}'s window of {lm.max_positions}")
    context = tk.stream()

    tally: dict = {}  # answers found in the cache and not, for the log
    cached = partial(answercache.cached, folder=nll_cache, lm=lm, framing=tk.framing, tally=tally)

    makers = [
        cached(partial(prefill_method, lm, tk.framing, context, "full", "full", 1.0), kind="full", context_ids=context),
        cached(partial(prefill_method, lm, tk.framing, tk.prefix_ids, "none", "none", 0.0), kind="none",
               context_ids=tk.prefix_ids),
    ]
    build_s = {}
    for r in ratios:
        for variant, overrides in [(None, {}), *variants.items()]:
            label = "kvcompile" if variant is None else f"kvcompile[{variant}]"
            path = folder.parent / f"{folder.name}-{variant or 'base'}-{r:g}.kvpack"
            t0 = time.perf_counter()
            build([folder], path, lm, recipe, BuildOptions(ratio=r, **overrides))
            build_s[f"{label}@{r:g}"] = time.perf_counter() - t0
            pack = load(path)
            log(f"  built {label}@{r:g} in {build_s[f'{label}@{r:g}']:.0f} s")
            makers.append(partial(_renamed, partial(pack_method, pack, lm), f"{label}@{r:g}"))
            if variant is None and rag:  # the pack's budget; named by the nominal ratio, as the presses are
                budget = round(pack.mean_kept())
                ratio = budget / pack.layout["tokens"]
                makers.append(cached(partial(RagMethod, lm, tk.framing, tk.doc_ids, budget, 128, f"rag@{r:g}",
                                             ratio), kind="rag", context_ids=context,
                                      context=lambda m, qa: m.context(qa)))

    capture_s = None
    if press_names:
        t0 = time.perf_counter()
        captured = capture(lm, context + tk.probe_ids)
        capture_s = time.perf_counter() - t0
        log(f"  captured the prefill of {len(context) + len(tk.probe_ids)} tokens in {capture_s:.0f} s")

        def peer(name, r, placement):
            press = presses(r, len(tk.probe_ids), [name])[name]
            t = time.perf_counter()
            kv, start = compress(press, lm, captured, len(context), r), len(context)
            if placement == "compact":
                kv, start = compacted(lm, kv)
            session = Session.over(lm, tk.framing, kv, start)
            label = name if placement == "original" else f"{name}[{placement}]"
            return SessionMethod(session, f"{label}@{r:g}", "peer", r, setup_seconds=time.perf_counter() - t)

        makers += [partial(peer, name, r, p) for r in ratios for p in placements for name in press_names]
    t0 = time.perf_counter()
    results = evaluate(makers, qas, lm.device, max_new_tokens, lambda name: None)
    log(f"  {len(makers)} methods x {len(qas)} questions in {time.perf_counter() - t0:.0f} s")
    if tally:
        log(f"  full/none/rag answers from the cache ({nll_cache}): {tally.get('hits', 0)} of "
            f"{tally.get('hits', 0) + tally.get('misses', 0)}")
    return {"spec": spec, "name": evalset.name, "documents": len(tk.doc_ids), "tokens": tk.total,
            "task_prompt_tokens": len(tk.probe_ids), "questions": len(qas), "build_s": build_s,
            "capture_prefill_s": capture_s, "results": results}


def _renamed(make, name: str):
    method = make()
    method.name = name
    return method


# -- statistics over corpora -----------------------------------------------------------------


def family(r: MethodResult) -> str:
    return r.name.split("@")[0]


def ratio_key(r: MethodResult) -> float | None:
    """The nominal kept ratio: the one in the name (``snapkv@0.25``), else the measured one to 2 decimals."""
    label = r.name.partition("@")[2]
    try:
        return round(float(label), 3)
    except ValueError:
        return None if r.ratio is None or r.kind in ("full", "none") else round(r.ratio, 2)


def is_kvcompile(fam: str) -> bool:
    return fam == "kvcompile" or fam.startswith("kvcompile[")


def per_question(runs: list[dict]) -> list[dict]:
    """Per corpus: {(family, ratio): linearised per-question gain kept} for the methods with a ratio."""
    out = []
    for run in runs:
        z = {}
        for r in run["results"]:
            key = ratio_key(r)
            if key is not None:
                values = linearised(run["results"], r)
                if values is not None:
                    z[(family(r), key)] = values
        out.append(z)
    return out


def aggregate(runs: list[dict]) -> dict:
    """Gain kept pooled over corpora per (family, ratio), and the paired comparisons of kvcompile's families.

    Comparisons: every kvcompile family (plain and each variant) minus every press, minus
    the best press at that ratio (highest pooled gain kept among the presses with the most
    questions: chosen after seeing the data, so its gap is a little flattering to the press),
    minus rag, and a variant minus plain kvcompile. Each over the corpora where both ran.
    """
    zs = per_question(runs)
    keys = sorted({k for z in zs for k in z}, key=lambda k: (k[0], -k[1]))
    gain = {k: stats.pooled(z[k] for z in zs if k in z) for k in keys}
    kinds = {(family(r), ratio_key(r)): r.kind for run in runs for r in run["results"]}
    ratios = sorted({k[1] for k in keys}, reverse=True)
    best = {}
    for ratio in ratios:
        pressed = [k for k in keys if k[1] == ratio and kinds.get(k) == "peer" and not math.isnan(gain[k].mean)]
        # Only presses that ran on every corpus any press ran on: a mean over fewer corpora is
        # not comparable (a press run on its two easiest corpora would be "best").
        most = max((gain[k].questions for k in pressed), default=0)
        if pressed:
            best[ratio] = max((gain[k].mean, k[0]) for k in pressed if gain[k].questions == most)[1]
    comparisons = []
    for a in sorted({k[0] for k in keys if is_kvcompile(k[0])}, key=lambda f: (f != "kvcompile", f)):
        for ratio in ratios:
            if (a, ratio) not in gain:
                continue
            others = [("best press", best.get(ratio))]
            others += [(f, f) for f in sorted({k[0] for k in keys if k[1] == ratio and kinds.get(k) == "peer"})]
            others += [(f, f) for f in sorted({k[0] for k in keys if k[1] == ratio and kinds.get(k) == "rag"})]
            if a != "kvcompile":
                others.append(("kvcompile", "kvcompile"))
            for label, b in others:
                if b is None or (b, ratio) not in gain:
                    continue
                groups = [[p - q for p, q in zip(z[(a, ratio)], z[(b, ratio)])]
                          for z in zs if (a, ratio) in z and (b, ratio) in z]
                if not groups:  # never ran on the same corpus
                    continue
                comparisons.append({"method": a, "versus": label, "reference": b, "ratio": ratio,
                                    **stats.pooled(groups).to_json()})
    return {"gain_kept": [{"family": k[0], "ratio": k[1], **gain[k].to_json()} for k in keys],
            "best_press": {str(r): f for r, f in best.items()}, "comparisons": comparisons}


def _est(d: dict) -> stats.Estimate:
    nan = float("nan")
    return stats.Estimate(nan if d["mean"] is None else d["mean"], nan if d["se"] is None else d["se"],
                          d["questions"], d["corpora"])


# -- the report --------------------------------------------------------------------------------


def markdown(runs: list[dict], meta: dict, agg: dict) -> str:
    n_q = sum(run["questions"] for run in runs)
    lines = [
        "# kvcompile vs kvpress presses, full context, RAG and no context",
        "",
        f"Model **{meta['model']}**, {meta['device']}, torch {meta['torch']}, transformers "
        f"{meta.get('transformers', '?')} ({meta['threads']} thread per corpus), "
        f"{'kvpress ' + meta['kvpress'] if meta.get('kvpress') else 'no presses'}. "
        f"{meta['date']}. {len(runs)} {'corpus' if len(runs) == 1 else 'corpora'}, {n_q} questions. "
        + (f"Greedy answers of at most {meta['max_new_tokens']} tokens. " if meta["max_new_tokens"]
           else "Gold-answer NLL only (no answers generated: answer metrics and TTFT are not measured). ")
        + "Made by `make bench-peers` (`bench/peers.py`); raw numbers in "
        "`peers.json`.",
        "",
        "*Gain kept* = share of the full context's gold-answer NLL gain over no documents "
        "(1 = as good as the whole corpus, 0 = no better than no documents; pooled over questions). "
        "*± x* = its standard error (delta method; pooled over corpora, each corpus's questions normalised "
        "by its own full-context gain, questions as the sampling unit: `kvcompile/evaluation/stats.py`). "
        "*KV* = mean tokens a question attends to per layer and KV head. Presses: kvpress, query-agnostic, "
        "the recipe's task prompt as their window (SnapKV, Finch); each keeps exactly kvcompile's budget, the same "
        "number of corpus tokens in every KV head (as kvcompile's default, equal head budgets, does; a pack also "
        "keeps its framing's few tokens whole). "
        "`PRESS` keeps its keys at their corpus positions with questions after the whole corpus (kvpress's default); "
        "`PRESS[compact]` re-rotates them to each head's ranks with questions after the longest head, as packs load "
        "by default (`--positions compact`). "
        "kvpress's own per-head budgets (AdaKV and the like) are simulated with masks, so they save no memory; "
        "none is used here.",
    ]
    if meta.get("variants"):
        lines += ["", "Variants (BuildOptions overrides): " + "; ".join(
            f"`kvcompile[{n}]` = {json.dumps(o)}" for n, o in meta["variants"].items()) + "."]
    gains = {(g["family"], g["ratio"]): _est(g) for g in agg["gain_kept"]}
    ratios = sorted({k[1] for k in gains}, reverse=True)
    fams = sorted({k[0] for k in gains}, key=lambda f: (not is_kvcompile(f), f != "kvcompile", f))
    lines += ["", "## Gain kept, by kept ratio (pooled over corpora)", "",
              "| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for fam in fams:
        cells = [gains[(fam, r)].format() if (fam, r) in gains else "–" for r in ratios]
        lines.append(f"| {f'**{fam}**' if is_kvcompile(fam) else fam} | " + " | ".join(cells) + " |")
    if agg["comparisons"]:
        lines += ["", "## Paired differences in gain kept (kvcompile minus the other method)", "",
                  "Mean over the questions of both methods' per-question gain kept, ± its standard error; "
                  "positive: kvcompile keeps more. "
                  + ("The best press is the press with the highest pooled gain kept at that ratio ("
                     + ", ".join(f"{float(r):.0%}: {f}" for r, f in agg["best_press"].items())
                     + "), chosen after seeing the data. " if agg["best_press"] else "")
                  + "Questions (corpora) per cell: "
                  + ", ".join(sorted({f"{c['questions']} ({c['corpora']})" for c in agg["comparisons"]})) + ".",
                  "",
                  "| method | versus | " + " | ".join(f"{r:.0%}" for r in ratios) + " |",
                  "|---|---|" + "---|" * len(ratios)]
        rows: dict[tuple, dict] = {}
        for c in agg["comparisons"]:
            rows.setdefault((c["method"], c["versus"]), {})[c["ratio"]] = _est(c)
        for (a, versus), cells in rows.items():
            lines.append(f"| {a} | {versus} | "
                         + " | ".join(cells[r].format(signed=True) if r in cells else "–" for r in ratios) + " |")
    zs = per_question(runs)
    for run, z in zip(runs, zs):
        lines += ["", f"## {run['name']} ({run['spec']}): {run['documents']} documents, {run['tokens']} tokens, "
                  f"{run['questions']} questions", "",
                  "| method | kept | KV tokens | contains | EM | F1 | NLL | gain kept | kvcompile − this | TTFT s "
                  "| tok/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report.ordered(run["results"]):
            s = r.summary()
            gain = stats.Estimate(_nan(s["gain_kept"]), _nan(s["gain_kept_se"]), len(r.rows))
            key, vs = ratio_key(r), "–"
            if key is not None and family(r) != "kvcompile" and ("kvcompile", key) in z and (family(r), key) in z:
                vs = stats.Estimate(*stats.mean_se([p - q for p, q in zip(z[("kvcompile", key)], z[(family(r), key)])]),
                                    len(r.rows)).format(signed=True)
            lines.append(f"| {r.name} | {s['ratio']:.0%} | {s['kv_tokens']:.0f} | {_cell(s['contains'], '.2f')} | "
                         f"{_cell(s['exact_match'], '.2f')} | {_cell(s['f1'], '.2f')} | {s['nll']:.3f} | "
                         f"{gain.format()} | {vs} | {_cell(s['ttft_s'], '.2f')} | {_cell(s['tokens_per_s'], '.1f')} |")
        lines.append("")
        capture = run.get("capture_prefill_s")
        lines.append("Build time per pack: " + ", ".join(f"{n}: {t:.0f} s" for n, t in run["build_s"].items())
                     + (f"; one plain prefill of the context (for the presses): {capture:.0f} s." if capture
                        else "."))
    return "\n".join(lines) + "\n"


def _nan(x):
    return float("nan") if x is None else x


def _cell(x, spec: str) -> str:
    """A table cell: ``x`` formatted, or a dash when it was not measured."""
    return "–" if x is None or x != x else format(x, spec)


def plot(runs: list[dict], agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def style(fam):
        if fam == "kvcompile":
            return dict(marker="o", lw=2.5, color="black")
        if is_kvcompile(fam):
            return dict(marker="o", lw=1.8)
        return dict(marker="s", ls="--") if fam == "rag" else dict(marker=".", lw=1)

    panels = len(runs) + (len(runs) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if len(runs) > 1:  # pooled over corpora first
        ax = axes.pop(0)
        fams: dict[str, list] = {}
        for g in agg["gain_kept"]:
            fams.setdefault(g["family"], []).append((g["ratio"], _est(g)))
        for fam, pts in sorted(fams.items()):
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[_zero(p[1].se) for p in pts],
                        label=fam, capsize=2, **style(fam))
        ax.axhline(1, color="gray", lw=1)
        ax.axhline(0, color="gray", ls=":", lw=1)
        ax.set(xscale="log", title=f"all {len(runs)} corpora (pooled)", xlabel="kept ratio", ylabel="gain kept")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax, run in zip(axes, runs):
        fams = {}
        for r in run["results"]:
            fams.setdefault(family(r), []).append(r)
        for fam, rs in sorted(fams.items()):
            if fam in ("full", "none"):
                ax.axhline(_zero(rs[0].gain_kept), color="gray", ls="-" if fam == "full" else ":", lw=1)
                continue
            rs = sorted(rs, key=lambda r: r.ratio)
            ax.errorbar([r.ratio for r in rs], [_nan(r.gain_kept) for r in rs],
                        yerr=[_zero(r.gain_kept_se) for r in rs], label=fam, capsize=2, **style(fam))
        ax.set(xscale="log", title=run["name"][:40], xlabel="kept ratio", ylabel="gain kept")
        ax.grid(alpha=0.3)
    if len(runs) == 1:
        axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _zero(x):
    return 0.0 if x is None or x != x else x


def write(runs: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(runs)
    data = {**meta, "aggregate": agg,
            "corpora": [{**{k: v for k, v in run.items() if k != "results"},
                         "methods": [r.to_json() for r in report.ordered(run["results"])]} for run in runs]}
    (out / "peers.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out / "peers.md").write_text(markdown(runs, meta, agg), encoding="utf-8")
    plot(runs, agg, out / "peers.png")


def read_runs(path: Path) -> tuple[list[dict], dict]:
    """Runs and meta back from a ``peers.json`` (for ``--merge`` and ``--jobs``)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("aggregate", None)  # recomputed from the rows
    runs = []
    for c in data.pop("corpora"):
        results = [MethodResult(m["name"], m["kind"], m["ratio"], m["kv_bytes"], m["kv_tokens"], m["setup_s"],
                                m["peak_memory"], m["rows"]) for m in c.pop("methods")]
        fill_gain_kept(results)
        # Older reports keyed build times by ratio alone (then JSON made them strings).
        c["build_s"] = {(f"kvcompile@{float(k):g}" if _is_number(k) else k): t for k, t in c["build_s"].items()}
        runs.append({**c, "results": results})
    return runs, data


def merge_runs(runs: list[dict], log=lambda msg: None) -> list[dict]:
    """One run per corpus: runs of the same corpus (spec and questions) are combined, a later
    run's methods replacing an earlier one's of the same name (a new default's rows beside the
    presses of an earlier run). Their full and none answers must agree (same model, corpus and
    questions): where they differ by more than 1e-3 nats the merge is refused."""
    merged: dict[str, dict] = {}
    for run in runs:
        old = merged.get(run["spec"])
        if old is None:
            merged[run["spec"]] = run
            continue
        mine = {r.name: r for r in old["results"]}
        for base in ("full", "none"):
            a, b = mine.get(base), next((r for r in run["results"] if r.name == base), None)
            if a is not None and b is not None:
                if [x["id"] for x in a.rows] != [x["id"] for x in b.rows]:
                    raise SystemExit(f"--merge: {run['spec']}: the runs asked different questions")
                off = max(abs(x["nll"] - y["nll"]) for x, y in zip(a.rows, b.rows))
                if off > 1e-3:
                    raise SystemExit(f"--merge: {run['spec']}: the runs' {base} answers differ by {off:.4f} nats: "
                                     "not the same model, corpus or framing")
        replaced = sorted(r.name for r in run["results"] if r.name in mine and r.name not in ("full", "none"))
        if replaced:
            log(f"{run['spec']}: {', '.join(replaced)} from the later run")
        mine.update({r.name: r for r in run["results"]})
        merged[run["spec"]] = {**old, "build_s": {**old["build_s"], **run["build_s"]},
                               "capture_prefill_s": old["capture_prefill_s"] or run["capture_prefill_s"],
                               "results": list(mine.values())}
    return list(merged.values())


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# -- one process per corpus ----------------------------------------------------------------


def run_parallel(args, corpora: list[str], log) -> int:
    """Run each corpus in its own process (``args.jobs`` at once, ``args.threads`` threads each) and merge."""
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        jobs, parts, failed = [], [], []
        for i, spec in enumerate(corpora):
            out = Path(tmp) / f"part{i}"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--corpora", spec, "--out", str(out), "--jobs", "1",
                   *child_args(args)]
            jobs.append((spec, cmd, out))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        running: list[tuple] = []
        pending = list(jobs)
        while pending or running:
            while pending and len(running) < args.jobs:
                spec, cmd, out = pending.pop(0)
                log(f"{spec}: started")
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                pump = threading.Thread(target=_prefix_lines, args=(proc.stderr, f"[{spec}] ", log), daemon=True)
                pump.start()
                running.append((spec, proc, out, pump))
            time.sleep(1)
            for item in list(running):
                spec, proc, out, pump = item
                if proc.poll() is not None:
                    pump.join()
                    running.remove(item)
                    if proc.returncode == 0 and (out / "peers.json").exists():
                        parts.append((spec, out / "peers.json"))
                    else:
                        failed.append(spec)
                        log(f"{spec}: failed (exit {proc.returncode})")
                    done = [read_runs(p) for s, p in sorted(parts, key=lambda sp: corpora.index(sp[0]))]
                    if done:  # after every corpus: a long run leaves its finished part behind
                        write([run for runs, _ in done for run in runs], done[0][1], args.out)
        if failed:
            log(f"failed: {', '.join(failed)}; {args.out} has the others")
            return 1
    log(f"wrote {args.out}/peers.{{md,json,png}}")
    return 0


def child_args(args) -> list[str]:
    a = ["--model", args.model, "--ratios", args.ratios, "--questions", str(args.questions),
         "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--presses", args.presses]
    a += ["--press-positions", args.press_positions]
    a += ["--no-rag"] if args.no_rag else []
    a += ["--no-nll-cache"] if args.no_nll_cache else ["--nll-cache", str(args.nll_cache)]
    for v in args.variant:
        a += ["--variant", v]
    return a


def _prefix_lines(stream, prefix: str, log) -> None:
    for line in stream:
        log(prefix + line.rstrip("\n"))


# -- main ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--corpora", default=DEFAULT_CORPORA, help="comma-separated dataset specs (datasets.py)")
    ap.add_argument("--ratios", default="0.5,0.25,0.1", help="kept ratios, comma-separated")
    ap.add_argument("--questions", type=int, default=30, help="questions per corpus (the first N)")
    ap.add_argument("--max-new-tokens", type=int, default=8,
                    help="greedy answer length; 0 measures only the gold answer's NLL (no answer, no TTFT)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (per corpus process with --jobs)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="corpora run at once, each in its own process with --threads threads, then merged")
    ap.add_argument("--presses", default=",".join(PRESSES),
                    help="comma-separated kvpress presses ('' or none: no presses, no kvpress needed)")
    ap.add_argument("--press-positions", default="original,compact",
                    help="where the presses' kept keys stand: original (kvpress's default, questions after the "
                         "whole corpus), compact (re-rotated to each head's ranks, as packs load; reported as "
                         "PRESS[compact]), or both, comma-separated")
    ap.add_argument("--no-rag", action="store_true", help="skip the BM25-RAG baseline")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                    help="also build kvcompile with these BuildOptions overrides (scorer, head_floor, context, "
                         "budgets, scorer_params.pool, ...), reported as kvcompile[NAME]; repeatable")
    ap.add_argument("--nll-cache", type=Path, default=None,
                    help="folder of cached full/none/rag answers (default: $KVCOMPILE_CACHE/bench-nll, "
                         "else ~/.cache/kvcompile/bench-nll)")
    ap.add_argument("--no-nll-cache", action="store_true", help="compute every answer, read and write no cache")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "peers")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="write one report from the peers.json of several runs and exit (runs of one corpus "
                         "are combined; a later run's methods replace an earlier one's of the same name)")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.merge:
        parts = [read_runs(p) for p in args.merge]
        write(merge_runs([run for runs, _ in parts for run in runs], log), parts[0][1], args.out)
        log(f"wrote {args.out}/peers.{{md,json,png}}")
        return 0
    press_names = [p.strip() for p in args.presses.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in press_names if p not in PRESSES]
    if unknown:
        ap.error(f"unknown press {unknown[0]!r}: choose from {', '.join(PRESSES)}")
    variants = dict(parse_variant(v) for v in args.variant)
    if len(variants) != len(args.variant):
        ap.error("two --variant with the same name")
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    if not ratios or not all(0 < r <= 1 for r in ratios):
        ap.error(f"--ratios must be in (0, 1], got {args.ratios!r}")
    if args.questions < 1:
        ap.error("--questions must be at least 1")
    if args.max_new_tokens < 0:
        ap.error("--max-new-tokens must be 0 or more")
    placements = [p.strip() for p in args.press_positions.split(",") if p.strip()]
    if not placements or any(p not in PLACEMENTS for p in placements):
        ap.error(f"--press-positions must be {' and/or '.join(PLACEMENTS)}, got {args.press_positions!r}")
    if args.nll_cache is None and not args.no_nll_cache:
        args.nll_cache = answercache.default_folder()
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    if args.jobs > 1 and len(corpora) > 1:
        return run_parallel(args, corpora, log)

    off = unpinned(names=("transformers", "torch", "kvpress") if press_names else ("transformers", "torch"))
    if off:
        log("WARNING: not the versions of bench/constraints.txt (make install-bench): "
            + ", ".join(f"{n} {have} (pinned {pin})" for n, (have, pin) in off.items()))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kvpress = import_kvpress() if press_names else None
    lm = load_model(args.model, device="cpu", progress=False)
    recipe = load_recipe("qa")
    checks = {}
    if press_names:
        tk_check = lm.tokenizer("The Normans were the people who in the 10th and 11th centuries gave their name to "
                                "Normandy, a region in France. " * 12, add_special_tokens=False)["input_ids"]
        checks = check_against_kvpress_hooks(lm, tk_check, 16, press_names)
        log(f"captured path vs kvpress hooks (identical keys): {checks}")
        if not all(checks.values()):
            log("WARNING: a press's captured path differs from kvpress's own hooks")
    import transformers

    meta = {"model": lm.name, "device": "CPU", "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": args.threads, "kvpress": getattr(kvpress, "__version__", "0.5.5") if kvpress else None,
            "date": time.strftime("%Y-%m-%d"), "max_new_tokens": args.max_new_tokens, "hook_check": checks,
            "presses": press_names, "press_positions": placements, "rag": not args.no_rag, "variants": variants,
            "questions": args.questions,
            "unpinned": {n: {"installed": have, "pinned": pin} for n, (have, pin) in off.items()}}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in corpora:
            log(f"{spec}:")
            runs.append(run_corpus(spec, lm, recipe, ratios, args.questions, args.max_new_tokens, Path(tmp), log,
                                   press_names, not args.no_rag, variants,
                                   None if args.no_nll_cache else args.nll_cache, placements))
            write(runs, meta, args.out)  # after every corpus: a long run leaves its finished part behind
    log(f"wrote {args.out}/peers.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
