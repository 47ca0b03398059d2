"""Sparse decode (RocketKV's hybrid sparse attention over a pack, issue 15): what it keeps of
the answers, what a decode step reads, and how fast decoding runs, with and without it.

Quality. Per corpus, one pack at ``--ratio``; every question's gold-answer NLL from the pack
decoded densely and with each ``--settings`` of ``--sparse`` (``auto``: the paper's budget
split; a share of each head's rows), read the way decoding reads it (the question in one
dense forward, then one answer token per step; only the steps are sparse). Gain kept against
the full context and no context (cached, kvcompile/evaluation/answercache.py), pooled over
corpora, with the paired difference against the dense pack and its standard error.

Speed, on the last corpus's pack and on a pack of every token (ratio 1): decode tokens/s
over ``--steps`` greedy steps after a question, dense and sparse alternated ``--repeats``
times (median), the bytes of the prefix one step reads, and the aten ops one step issues
(torch.profiler: a noise-free proxy for launch overhead on a GPU).

    python bench/sparse.py                          # squad:2,squad:8 x 30 questions, Qwen2.5-Coder-0.5B
    python bench/sparse.py --corpora squad:2 --questions 5
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from peers import corpus_of  # noqa: E402

from kvcompile.attention import pack_attention  # noqa: E402
from kvcompile.builder import BuildOptions  # noqa: E402
from kvcompile.cache import forward  # noqa: E402
from kvcompile.evaluation import answercache, stats  # noqa: E402
from kvcompile.evaluation.methods import pack_method, prefill_method  # noqa: E402
from kvcompile.evaluation.run import MethodResult, fill_gain_kept, linearised  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.pack import load  # noqa: E402
from kvcompile.pipeline import build  # noqa: E402
from kvcompile.recipe import load_recipe  # noqa: E402
from kvcompile.sparse import parse_top_k  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def nlls(make, qas) -> MethodResult:
    method = make()
    t0 = time.perf_counter()
    rows = [{"id": qa.id, "nll": method.answer_nll(qa)} for qa in qas]
    log(f"    {method.name}: {time.perf_counter() - t0:.0f} s")
    return MethodResult(method.name, method.kind, method.ratio, method.kv_bytes, method.kv_tokens,
                        method.setup_seconds, None, rows)


def run_corpus(spec: str, lm, recipe, ratio: float, settings: list[str], n_questions: int, tmp: Path) -> dict:
    evalset, folder, qas, tk = corpus_of(spec, n_questions, tmp, lm, recipe)
    context = tk.stream()
    cached = partial(answercache.cached, folder=answercache.default_folder(), lm=lm, framing=tk.framing, tally={})
    path = tmp / f"{folder.name}-{ratio:g}.kvpack"
    t0 = time.perf_counter()
    build([folder], path, lm, recipe, BuildOptions(ratio=ratio))
    log(f"  {spec}: {tk.total} tokens, built at {ratio:g} in {time.perf_counter() - t0:.0f} s")
    pack = load(path)
    makers = [
        cached(partial(prefill_method, lm, tk.framing, context, "full", "full", 1.0), kind="full", context_ids=context),
        cached(partial(prefill_method, lm, tk.framing, tk.prefix_ids, "none", "none", 0.0), kind="none",
               context_ids=tk.prefix_ids),
        partial(pack_method, pack, lm),
    ]
    reports = {}
    for s in settings:
        def make(s=s):
            m = pack_method(pack, lm, sparsity={"top_k": parse_top_k(s)})
            m.name = f"sparse[{s}]@{ratio:g}"
            reports[m.name] = m.session.sparse_report()
            return m
        makers.append(make)
    results = [nlls(make, qas) for make in makers]
    fill_gain_kept(results)
    return {"spec": spec, "name": evalset.name, "tokens": tk.total, "questions": len(qas), "results": results,
            "sparse": reports, "pack": str(path), "question": qas[0].question}


def pooled_rows(runs: list[dict]) -> list[dict]:
    """Per method: gain kept pooled over corpora, and its paired difference from the dense pack."""
    by: dict[str, dict] = {}
    for run in runs:
        dense = next(r for r in run["results"] if r.kind == "pack" and not r.name.startswith("sparse"))
        z_dense = linearised(run["results"], dense)
        for r in run["results"]:
            if r.kind in ("full", "none"):
                continue
            z = linearised(run["results"], r)
            e = by.setdefault(r.name if r is not dense else "dense pack", {"z": [], "diff": [], "report": []})
            e["z"].append(z)
            e["diff"].append([a - b for a, b in zip(z, z_dense)])
            e["report"].append(run["sparse"].get(r.name))
    out = []
    for name, e in by.items():
        gain, diff = stats.pooled(e["z"]), stats.pooled(e["diff"])
        reports = [r for r in e["report"] if r]
        share = (sum(r["bytes_per_step"] / r["dense_bytes_per_step"] for r in reports) / len(reports)
                 if reports else 1.0)
        out.append({"method": name, "gain_kept": gain.mean, "se": gain.se,
                    "minus_dense": None if name == "dense pack" else diff.mean,
                    "minus_dense_se": None if name == "dense pack" else diff.se,
                    "bytes_read_share": share, "questions": gain.questions, "corpora": gain.corpora,
                    "parameters": reports[0] if reports else None})
    return out


@torch.no_grad()
def decode_rate(session, question: str, steps: int) -> float:
    """Greedy decode tokens/s over ``steps`` steps after the question's forward (EOS ignored)."""
    lm = session.lm
    ids = session.question_ids(question)
    with pack_attention(lm.model):
        cache = session.cache(capacity=len(ids) + steps + 1)
        nxt = forward(lm.model, torch.tensor([ids]), cache, logits_to_keep=1).logits[0, -1].argmax()
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = forward(lm.model, nxt.view(1, 1), cache, logits_to_keep=1).logits[0, -1].argmax()
        return steps / (time.perf_counter() - t0)


@torch.no_grad()
def ops_per_step(session, question: str) -> int:
    """aten ops one decode step issues (after the question's forward)."""
    from torch.profiler import ProfilerActivity, profile

    lm = session.lm
    ids = session.question_ids(question)
    with pack_attention(lm.model):
        cache = session.cache(capacity=len(ids) + 2)
        nxt = forward(lm.model, torch.tensor([ids]), cache, logits_to_keep=1).logits[0, -1].argmax()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            forward(lm.model, nxt.view(1, 1), cache, logits_to_keep=1)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def speed(pack, lm, label: str, question: str, settings: list[str], steps: int, repeats: int) -> list[dict]:
    sessions = {"dense": pack.session(lm)}
    for s in settings:
        sessions[f"sparse[{s}]"] = pack.session(lm).sparsify(top_k=parse_top_k(s))
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():  # warm-up
        decode_rate(session, question, 2)
    for _ in range(repeats):  # alternated, so drift on a shared machine hits every mode alike
        for name, session in sessions.items():
            rates[name].append(decode_rate(session, question, steps))
    out = []
    for name, session in sessions.items():
        report = session.sparse_report() if session.sparse is not None else None
        itemsize = torch.finfo(lm.dtype).bits // 8
        dense_bytes = sum(kv.rows for kv in session.kv) * 2 * session.kv[0].head_dim * itemsize
        out.append({"pack": label, "mode": name, "tokens_per_s": statistics.median(rates[name]),
                    "runs": rates[name], "ops_per_step": ops_per_step(session, question),
                    "prefix_rows": sum(kv.rows for kv in session.kv),
                    "bytes_per_step": report["bytes_per_step"] if report else dense_bytes,
                    "parameters": report})
    return out


def markdown(meta: dict, rows: list[dict], runs: list[dict], speeds: list[dict]) -> str:
    lines = [f"# Sparse decode over a pack ({meta['model']}, {meta['device']})", "",
             f"`{meta['command']}`, {meta['date']}. Corpora: "
             + ", ".join(f"{r['name']} ({r['tokens']} tokens, {r['questions']} questions)" for r in runs)
             + f"; packs at ratio {meta['ratio']:g}.", "",
             "## Gain kept (gold-answer NLL; the question dense, answer tokens one decode step each)", "",
             "| method | gain kept | minus the dense pack (paired) | prefix bytes read per step | parameters |",
             "|---|---|---|---|---|"]
    for r in rows:
        diff = "–" if r["minus_dense"] is None else f"{r['minus_dense']:+.3f} ± {r['minus_dense_se']:.3f}"
        p = r["parameters"]
        params = "" if not p else f"top_k {p['top_k']:.3g}, page {p['page']}, channels {p['channels']}"
        lines.append(f"| {r['method']} | {r['gain_kept']:.3f} ± {r['se']:.3f} | {diff} | "
                     f"{r['bytes_read_share']:.0%} | {params} |")
    lines += ["", "## Decode speed (median of alternated runs; EOS ignored)", "",
              "| pack | mode | prefix rows (all layers, heads) | prefix bytes read per step | tokens/s "
              "| aten ops per step |",
              "|---|---|---|---|---|---|"]
    for s in speeds:
        lines.append(f"| {s['pack']} | {s['mode']} | {s['prefix_rows']} | {s['bytes_per_step'] / 1e6:.2f} MB | "
                     f"{s['tokens_per_s']:.2f} | {s['ops_per_step']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--corpora", default="squad:2,squad:8")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--settings", default="auto,0.25", help="--sparse values to measure, comma-separated")
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "sparse")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    lm = load_model(args.model, device="cpu", progress=False)
    recipe = load_recipe("qa")
    meta = {"model": lm.name, "device": f"CPU ({args.threads} thread)", "date": time.strftime("%Y-%m-%d"),
            "ratio": args.ratio, "command": "python bench/sparse.py " + " ".join(argv or sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    runs, speeds = [], []
    with tempfile.TemporaryDirectory(prefix="sparse-") as tmp:
        for spec in (c.strip() for c in args.corpora.split(",") if c.strip()):
            runs.append(run_corpus(spec, lm, recipe, args.ratio, settings, args.questions, Path(tmp)))
        last = runs[-1]
        full = Path(tmp) / "full.kvpack"
        build([Path(tmp) / last["spec"].replace(":", "_")], full, lm, recipe, BuildOptions(ratio=1.0))
        for label, path in ((f"{last['name']} @ {args.ratio:g}", last["pack"]), (f"{last['name']} @ 1", full)):
            speeds += speed(load(path), lm, label, last["question"], settings, args.steps, args.repeats)
            log(f"  speed on {label}: " + ", ".join(f"{s['mode']} {s['tokens_per_s']:.2f} tok/s"
                                                      for s in speeds if s["pack"] == label))
    rows = pooled_rows(runs)
    data = {**meta, "rows": rows, "speed": speeds,
            "corpora": [{**{k: v for k, v in r.items() if k not in ("results", "pack")},
                         "methods": [{"name": m.name, "kind": m.kind, "gain_kept": m.gain_kept, "rows": m.rows}
                                     for m in r["results"]]} for r in runs]}
    (args.out / "sparse.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (args.out / "sparse.md").write_text(markdown(meta, rows, runs, speeds), encoding="utf-8")
    log(f"wrote {args.out}/sparse.{{md,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
