"""Composed packs against the pack of the union, and compacted against original positions (issue 14).

For each corpus, the documents are split in two halves (corpus order), a pack is built of
each half and one of the whole corpus (the union), all at ``--ratio`` with the default
options, and the same questions are answered from:

- ``union``: the union's pack at its stored positions (what ``query`` does today);
- ``union+compact``: the same pack with compacted positions (``--positions compact``);
- ``A+B``: the two half packs composed (``kvcompile.compose``, compacted), and
  ``A+B+original``: composed at their own spacing.

The half packs were compiled without seeing each other (a union build compiles the second
half after the first), which is what composition costs; compaction is a load-time choice.
Gain kept (gold-answer NLL) pooled over questions and corpora, and each method's paired
difference from ``union`` ± its standard error, as in ``bench/quant.py``.

    python bench/compose.py --corpora squad:2,squad:14 --ratio 0.25
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quant import nlls_only  # noqa: E402

import kvcompile  # noqa: E402
from kvcompile.builder import BuildOptions, tokenize  # noqa: E402
from kvcompile.corpus import read_corpus  # noqa: E402
from kvcompile.data.synthetic import write_corpus  # noqa: E402
from kvcompile.evaluation import answercache, stats  # noqa: E402
from kvcompile.evaluation.datasets import load_dataset  # noqa: E402
from kvcompile.evaluation.methods import SessionMethod, prefill_method  # noqa: E402
from kvcompile.evaluation.run import linearised  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.pipeline import build  # noqa: E402
from kvcompile.recipe import load_recipe  # noqa: E402


def halves(folder: Path, out: Path) -> tuple[Path, Path]:
    """``folder``'s documents split in two folders, the first half of the corpus order in ``a``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    parts = (out / "a", out / "b")
    for i, f in enumerate(files):
        dst = parts[i >= len(files) // 2] / f.relative_to(folder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    return parts


def run_corpus(spec: str, lm, recipe, ratio: float, n_questions: int, tmp: Path, log) -> dict:
    evalset = load_dataset(spec, questions=n_questions)
    folder = tmp / spec.replace(":", "_")
    write_corpus(evalset, folder / "all")
    a_dir, b_dir = halves(folder / "all", folder)
    documents, _ = read_corpus([a_dir, b_dir])
    tk = tokenize(documents, recipe, lm)
    cached = partial(answercache.cached, folder=answercache.default_folder(), lm=lm, framing=tk.framing, tally={})
    makers = [
        cached(partial(prefill_method, lm, tk.framing, tk.stream(), "full", "full", 1.0), kind="full",
               context_ids=tk.stream()),
        cached(partial(prefill_method, lm, tk.framing, tk.prefix_ids, "none", "none", 0.0), kind="none",
               context_ids=tk.prefix_ids),
    ]
    packs, build_s = {}, {}
    for name, folders in (("union", [a_dir, b_dir]), ("A", [a_dir]), ("B", [b_dir])):
        packs[name] = folder / f"{name}.kvpack"
        t0 = time.perf_counter()
        build(folders, packs[name], lm, recipe, BuildOptions(ratio=ratio))
        build_s[name] = time.perf_counter() - t0
        log(f"  built {name} in {build_s[name]:.0f} s")
    union = kvcompile.load(packs["union"])
    pair = [kvcompile.load(packs["A"]), kvcompile.load(packs["B"])]
    variants = {
        "union": lambda: union.session(lm, "original"),
        "union+compact": lambda: union.session(lm, "compact"),
        "A+B": lambda: kvcompile.compose(pair, lm, "compact"),
        "A+B+original": lambda: kvcompile.compose(pair, lm, "original"),
    }
    for name, make in variants.items():
        makers.append(lambda name=name, make=make: SessionMethod(make(), name, "pack", ratio))
    t0 = time.perf_counter()
    results = nlls_only(makers, evalset.questions[:n_questions])
    log(f"  {len(makers)} methods x {n_questions} questions in {time.perf_counter() - t0:.0f} s")
    return {"spec": spec, "tokens": tk.total, "questions": n_questions, "build_s": build_s, "results": results}


def report(runs: list[dict], meta: dict) -> tuple[list[dict], str]:
    names = [r.name for r in runs[0]["results"] if r.kind == "pack"]
    rows = []
    for name in names:
        z = [linearised(run["results"], next(r for r in run["results"] if r.name == name)) for run in runs]
        ref = [linearised(run["results"], next(r for r in run["results"] if r.name == "union")) for run in runs]
        gain = stats.pooled(z)
        diff = stats.pooled([[a - b for a, b in zip(x, y)] for x, y in zip(z, ref)]) if name != "union" else None
        rows.append({"method": name, "gain_kept": gain.mean, "se": gain.se,
                     "minus_union": diff.mean if diff else None, "minus_union_se": diff.se if diff else None})
    lines = ["# Composed packs and compacted positions (issue 14)", "",
             f"{meta['model']} on {meta['device']}, {meta['date']}; {len(runs)} corpora "
             f"({', '.join(r['spec'] for r in runs)}), {sum(r['questions'] for r in runs)} questions, every pack at "
             f"ratio {meta['ratio']:g}. Gain kept: the share of the full context's gold-answer NLL gain over no "
             "context, pooled over questions and corpora, ± its standard error; the paired column is the "
             f"per-question difference from `union` ± its standard error. Reproduce: `{meta['command']}`.", "",
             "| method | gain kept | minus union (paired) |", "|---|---|---|"]
    for r in rows:
        paired = f"{r['minus_union']:+.3f} ± {r['minus_union_se']:.3f}" if r["minus_union"] is not None else "–"
        lines.append(f"| {r['method']} | {r['gain_kept']:.2f} ± {r['se']:.2f} | {paired} |")
    lines += ["", "Build times (s): " + "; ".join(f"{run['spec']}: " + ", ".join(
        f"{k} {v:.0f}" for k, v in run["build_s"].items()) for run in runs), ""]
    return rows, "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--corpora", default="squad:2,squad:14")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "compose")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu", progress=False)
    meta = {"model": lm.name, "device": f"CPU ({args.threads} thread)", "date": time.strftime("%Y-%m-%d"),
            "ratio": args.ratio, "command": "python bench/compose.py " + " ".join(argv if argv is not None
                                                                                  else sys.argv[1:])}
    runs = []
    with tempfile.TemporaryDirectory(prefix="compose-") as tmp:
        for spec in (c.strip() for c in args.corpora.split(",") if c.strip()):
            log(f"{spec}:")
            runs.append(run_corpus(spec, lm, load_recipe("qa"), args.ratio, args.questions, Path(tmp), log))
            rows, md = report(runs, meta)
            args.out.mkdir(parents=True, exist_ok=True)
            data = {**meta, "rows": rows, "corpora": [{**{k: v for k, v in r.items() if k != "results"},
                                                       "methods": [m.__dict__ for m in r["results"]]} for r in runs]}
            (args.out / "compose.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
            (args.out / "compose.md").write_text(md, encoding="utf-8")
            log(f"wrote {args.out}/compose.{{md,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
