"""kvcompile's task-aware packs next to kvpress's query-agnostic presses, full context, RAG and none.

    make bench-peers          # or: python bench/peers.py --out docs/benchmarks/peers

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
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
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
from kvcompile.evaluation import report  # noqa: E402
from kvcompile.evaluation.datasets import load_dataset  # noqa: E402
from kvcompile.evaluation.methods import SessionMethod  # noqa: E402
from kvcompile.evaluation.plan import plan  # noqa: E402
from kvcompile.evaluation.run import MethodResult, evaluate  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.pack import load  # noqa: E402
from kvcompile.pipeline import build  # noqa: E402
from kvcompile.ragged import RaggedKV  # noqa: E402
from kvcompile.recipe import load_recipe  # noqa: E402
from kvcompile.session import Session  # noqa: E402


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


def presses(ratio: float, window: int) -> dict:
    """The kvpress presses compared, at kept ratio ``ratio`` (kvpress's compression_ratio = 1 - ratio)."""
    kvpress = import_kvpress()

    c = 1 - ratio
    finch = kvpress.FinchPress(compression_ratio=c, rerotate_keys=False)
    finch.window_size = window  # the task prompt, as the delimiter would have set it
    return {
        "snapkv": kvpress.SnapKVPress(compression_ratio=c, window_size=window),
        "expected_attention": kvpress.ExpectedAttentionPress(compression_ratio=c),
        "knorm": kvpress.KnormPress(compression_ratio=c),
        "lagkv": kvpress.LagKVPress(compression_ratio=c),
        "streaming_llm": kvpress.StreamingLLMPress(compression_ratio=c),
        "finch": finch,
    }


def attention_modules(model):
    mods = [layer.self_attn for layer in model.model.layers]
    for m in mods:  # kvpress reads the rotary embedding from the attention module
        m.rotary_emb = model.model.rotary_emb
    return mods


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
             {k: v for k, v in seen[i].items() if k not in ("hidden_states", "past_key_values")})
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


@torch.no_grad()
def check_against_kvpress_hooks(lm, ids: list[int], window: int) -> dict:
    """Each press through kvpress's own forward hooks vs. the captured path, on ``ids``."""
    captured = capture(lm, ids)
    result = {}
    for name, press in presses(0.5, window).items():
        if name == "finch":  # needs its delimiter token in the input; same score path as snapkv
            continue
        cache = DynamicCache(config=lm.config)
        # kvpress 0.5.5 reads kwargs["cache_position"], which transformers 5.x no longer passes to attention.
        pre = [m.register_forward_pre_hook(_add_cache_position, with_kwargs=True) for m in attention_modules(lm.model)]
        try:
            with press(lm.model):
                lm.model(torch.tensor([ids], device=lm.device), past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        finally:
            for h in pre:
                h.remove()
        ours = [press.compress(m, *c[:3], None, c[3])[0] for m, c in zip(attention_modules(lm.model), captured)]
        result[name] = all(torch.equal(a, layer.keys) for a, layer in zip(ours, cache.layers))
    return result


def _add_cache_position(module, args, kwargs):
    q = kwargs["hidden_states"].shape[1]
    past = kwargs["past_key_values"].get_seq_length(module.layer_idx)
    kwargs["cache_position"] = torch.arange(past, past + q, device=kwargs["hidden_states"].device)
    return args, kwargs


def run_corpus(spec: str, lm, recipe, ratios, n_questions, max_new_tokens, tmp: Path, log) -> dict:
    evalset = load_dataset(spec, questions=n_questions)
    folder = tmp / spec.replace(":", "_").replace("/", "_")
    write_corpus(evalset, folder)
    documents, _ = read_corpus([folder])
    qas = evalset.questions[:n_questions]
    packs, build_s = [], {}
    for r in ratios:
        path = folder.parent / f"{folder.name}-{r:g}.kvpack"
        t0 = time.perf_counter()
        build([folder], path, lm, recipe, BuildOptions(ratio=r))
        build_s[r] = time.perf_counter() - t0
        packs.append(load(path))
        log(f"  built {path.name} in {build_s[r]:.0f} s")
    makers = plan(lm, packs, documents, recipe, ["full", "rag", "none"])

    tk = tokenize(documents, recipe, lm)
    context = tk.stream()
    t0 = time.perf_counter()
    captured = capture(lm, context + tk.probe_ids)
    capture_s = time.perf_counter() - t0
    log(f"  captured the prefill of {len(context) + len(tk.probe_ids)} tokens in {capture_s:.0f} s")

    def peer(name, r):
        press = presses(r, len(tk.probe_ids))[name]
        t = time.perf_counter()
        session = Session.over(lm, tk.framing, compress(press, lm, captured, len(context), r), len(context))
        return SessionMethod(session, f"{name}@{r:g}", "peer", r, setup_seconds=time.perf_counter() - t)

    makers += [partial(peer, name, r) for r in ratios for name in presses(0.5, 1)]
    t0 = time.perf_counter()
    results = evaluate(makers, qas, lm.device, max_new_tokens, lambda name: None)
    log(f"  {len(makers)} methods x {len(qas)} questions in {time.perf_counter() - t0:.0f} s")
    return {"spec": spec, "name": evalset.name, "documents": len(documents), "tokens": tk.total,
            "task_prompt_tokens": len(tk.probe_ids), "questions": len(qas), "build_s": build_s,
            "capture_prefill_s": capture_s, "results": results}


def markdown(runs: list[dict], meta: dict) -> str:
    lines = [
        "# kvcompile vs kvpress presses, full context, RAG and no context",
        "",
        f"Model **{meta['model']}**, {meta['device']}, torch {meta['torch']} ({meta['threads']} thread), "
        f"kvpress {meta['kvpress']}. {meta['date']}. Greedy answers of at most {meta['max_new_tokens']} tokens. "
        "Made by `make bench-peers` (`bench/peers.py`); raw numbers in `peers.json`.",
        "",
        "*Gain kept* = share of the full context's gold-answer NLL gain over no documents "
        "(1 = as good as the whole corpus, 0 = no better than no documents; pooled over questions). "
        "*KV* = mean tokens a question attends to per layer and KV head. Presses: kvpress, query-agnostic, "
        "the recipe's task prompt as their window (SnapKV, Finch); each keeps exactly kvcompile's budget, the same "
        "number of corpus tokens in every KV head (kvcompile's budget is per layer, split unevenly over heads). "
        "kvpress's own per-head budgets (AdaKV and the like) are simulated with masks, so they save no memory; "
        "none is used here.",
        "",
        "## Gain kept, by kept ratio (mean over corpora)",
        "",
    ]
    families: dict[str, dict[float, list[float]]] = {}
    for run in runs:
        for r in run["results"]:
            if r.ratio is not None and r.kind not in ("full", "none"):
                families.setdefault(r.name.split("@")[0], {}).setdefault(round(r.ratio, 2), []).append(r.gain_kept)
    ratios = sorted({k for f in families.values() for k in f}, reverse=True)
    lines += ["| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |",
              "|---|" + "---|" * len(ratios)]
    for fam in sorted(families, key=lambda f: (f != "kvcompile", f)):
        cells = [f"{statistics.fmean(families[fam][r]):.2f}" if r in families[fam] else "–" for r in ratios]
        lines.append(f"| {'**kvcompile**' if fam == 'kvcompile' else fam} | " + " | ".join(cells) + " |")
    for run in runs:
        lines += ["", f"## {run['name']} ({run['spec']}): {run['documents']} documents, {run['tokens']} tokens, "
                  f"{run['questions']} questions", "",
                  "| method | kept | KV tokens | contains | EM | F1 | NLL | gain kept | TTFT s | tok/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report.ordered(run["results"]):
            s = r.summary()
            lines.append(f"| {r.name} | {s['ratio']:.0%} | {s['kv_tokens']:.0f} | {s['contains']:.2f} | "
                         f"{s['exact_match']:.2f} | {s['f1']:.2f} | {s['nll']:.3f} | {s['gain_kept']:.2f} | "
                         f"{s['ttft_s']:.2f} | {s['tokens_per_s']:.1f} |")
        lines.append("")
        lines.append("Build time per pack: " + ", ".join(f"{r:g}: {s:.0f} s" for r, s in run["build_s"].items())
                     + f"; one plain prefill of the context (for the presses): {run['capture_prefill_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 4.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        fams: dict[str, list] = {}
        for r in run["results"]:
            fams.setdefault(r.name.split("@")[0], []).append(r)
        for fam, rs in sorted(fams.items()):
            if fam in ("full", "none"):
                ax.axhline(rs[0].gain_kept, color="gray", ls="-" if fam == "full" else ":", lw=1)
                continue
            rs = sorted(rs, key=lambda r: r.ratio)
            style = {"kvcompile": dict(marker="o", lw=2.5, color="black"), "rag": dict(marker="s", ls="--")}
            ax.plot([r.ratio for r in rs], [r.gain_kept for r in rs], label=fam,
                    **style.get(fam, dict(marker=".", lw=1)))
        ax.set(xscale="log", title=run["name"][:40], xlabel="kept ratio", ylabel="gain kept")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(runs: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {**meta, "corpora": [{**{k: v for k, v in run.items() if k != "results"},
                                 "methods": [r.to_json() for r in report.ordered(run["results"])]} for run in runs]}
    (out / "peers.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out / "peers.md").write_text(markdown(runs, meta), encoding="utf-8")
    plot(runs, out / "peers.png")


def read_runs(path: Path) -> tuple[list[dict], dict]:
    """Runs and meta back from a ``peers.json`` (for ``--merge``)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    runs = []
    for c in data.pop("corpora"):
        results = [MethodResult(m["name"], m["kind"], m["ratio"], m["kv_bytes"], m["kv_tokens"], m["setup_s"],
                                m["peak_memory"], m["rows"], m["gain_kept"]) for m in c.pop("methods")]
        c["build_s"] = {float(r): t for r, t in c["build_s"].items()}  # JSON made the ratios strings
        runs.append({**c, "results": results})
    return runs, data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--corpora", default="squad:2,squad:8,squad:14,hotpotqa:0")  # ~4k tokens each
    ap.add_argument("--ratios", default="0.5,0.25,0.1")
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "peers")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="write one report from the peers.json of several runs (say, one per core) and exit")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [read_runs(p) for p in args.merge]
        write([run for runs, _ in parts for run in runs], parts[0][1], args.out)
        return 0
    kvpress = import_kvpress()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    lm = load_model(args.model, device="cpu", progress=False)
    recipe = load_recipe("qa")
    ratios = [float(r) for r in args.ratios.split(",")]
    tk_check = lm.tokenizer("The Normans were the people who in the 10th and 11th centuries gave their name to "
                            "Normandy, a region in France. " * 12, add_special_tokens=False)["input_ids"]
    window = 16
    checks = check_against_kvpress_hooks(lm, tk_check, window)
    log(f"captured path vs kvpress hooks (identical keys): {checks}")
    meta = {"model": lm.name, "device": "CPU", "torch": torch.__version__, "threads": args.threads,
            "kvpress": getattr(kvpress, "__version__", "0.5.5"), "date": time.strftime("%Y-%m-%d"),
            "max_new_tokens": args.max_new_tokens, "hook_check": checks}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.corpora.split(","):
            log(f"{spec}:")
            runs.append(run_corpus(spec, lm, recipe, ratios, args.questions, args.max_new_tokens, Path(tmp), log))
            write(runs, meta, args.out)  # after every corpus: a long run leaves its finished part behind
    log(f"wrote {args.out}/peers.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
