"""Boundary repair for segments chosen per question (issue 15): what attending to independently
compiled segments side by side loses against reading the same text in one pass, and what
APE's temperature and scale (``query --select --ape``, kvcompile/repair.py) win back.

Per corpus: an ``independent`` pack at ``--ratio``; per question, the segments ``--select``
chooses (BM25 over the pack's index), then the gold answer's NLL from

- ``select``: their KV, side by side after the framing (no repair);
- ``sequential``: the same documents' tokens prefilled in one pass after the framing (what
  the KV would be had they been compiled together; a prefill per question);
- ``select+ape[T,S]``: their KV with APE's repair, for each ``--ape`` setting;
- ``select[chained]``: the same documents' KV from a ``chained`` pack (each compiled after
  every document before it), attended without the ones not chosen: what selecting from a
  pack whose segments do not stand alone loses;

and the full context and no context (cached), for gain kept, pooled over corpora, with the
paired difference against ``sequential``. Time to first token (median per method): choosing
and placing the segments plus the question's forward, against the sequential prefill.

    python bench/boundary.py                      # squad:2,squad:8 x 30 questions, Qwen2.5-Coder-0.5B
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

from kvcompile.builder import BuildOptions  # noqa: E402
from kvcompile.evaluation import answercache, stats  # noqa: E402
from kvcompile.evaluation.methods import prefill_method  # noqa: E402
from kvcompile.evaluation.run import MethodResult, fill_gain_kept, linearised  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.pack import load  # noqa: E402
from kvcompile.pipeline import build  # noqa: E402
from kvcompile.recipe import load_recipe  # noqa: E402
from kvcompile.repair import Ape  # noqa: E402
from kvcompile.retrieval import Selector  # noqa: E402
from kvcompile.session import context_answer_nll  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@torch.no_grad()
def first_token_seconds(lm, ids: list[int]) -> float:
    t0 = time.perf_counter()
    lm.model(torch.tensor([ids]), use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0


def run_corpus(spec: str, lm, recipe, ratio: float, budget: float, apes: list[str], n: int, tmp: Path) -> dict:
    evalset, folder, qas, tk = corpus_of(spec, n, tmp, lm, recipe)
    path = tmp / f"{folder.name}.kvpack"
    t0 = time.perf_counter()
    build([folder], path, lm, recipe, BuildOptions(ratio=ratio, context="independent"))
    log(f"  {spec}: {tk.total} tokens, built independent at {ratio:g} in {time.perf_counter() - t0:.0f} s")
    pack = load(path)
    chained_path = tmp / f"{folder.name}-chained.kvpack"
    build([folder], chained_path, lm, recipe, BuildOptions(ratio=ratio, context="chained"))
    segment_docs: dict[int, list[int]] = {}
    for i, d in enumerate(pack.manifest()):
        segment_docs.setdefault(d["segment"], []).append(i)

    cached = partial(answercache.cached, folder=answercache.default_folder(), lm=lm, framing=tk.framing, tally={})
    results = []
    for kind, ids in (("full", tk.stream()), ("none", tk.prefix_ids)):
        method = cached(partial(prefill_method, lm, tk.framing, ids, kind, kind, 1.0 if kind == "full" else 0.0),
                        kind=kind, context_ids=ids)()
        results.append(MethodResult(kind, kind, method.ratio, 0, 0, 0, None,
                                    [{"id": qa.id, "nll": method.answer_nll(qa)} for qa in qas]))
        del method
    selectors = {"select": Selector(pack, lm, budget)}
    selectors.update({f"select+ape[{a}]": Selector(pack, lm, budget, ape=Ape.parse(a)) for a in apes})
    selectors["select[chained]"] = Selector(load(chained_path), lm, budget)
    rows = {name: [] for name in ["sequential", *selectors]}
    ttft = {name: [] for name in rows}
    for qa in qas:
        q_ids = tk.framing.question_ids(lm.tokenizer, qa.question)
        for name, selector in selectors.items():
            t0 = time.perf_counter()
            session, chosen = selector.session(qa.question)
            place_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            session.first_token_logits(qa.question)
            ttft[name].append(place_s + time.perf_counter() - t0)
            rows[name].append({"id": qa.id, "nll": session.answer_nll(qa.question, qa.answers[0]),
                               "segments": chosen.segments, "tokens": chosen.tokens})
        docs = sorted(i for s in rows["select"][-1]["segments"] for i in segment_docs[s])
        context = list(tk.prefix_ids) + [t for i in docs for t in tk.doc_ids[i]]
        ttft["sequential"].append(first_token_seconds(lm, context + q_ids))
        rows["sequential"].append({"id": qa.id, "nll": context_answer_nll(lm, context, q_ids, qa.answers[0]),
                                   "tokens": len(context)})
    results += [MethodResult(name, "select", None, 0, 0, 0, None, r) for name, r in rows.items()]
    fill_gain_kept(results)
    log("  " + ", ".join(f"{r.name} {r.gain_kept:.3f}" for r in results if r.gain_kept is not None))
    return {"spec": spec, "name": evalset.name, "tokens": tk.total, "questions": len(qas), "results": results,
            "ttft_median_s": {k: statistics.median(v) for k, v in ttft.items()}}


def pooled(runs: list[dict]) -> list[dict]:
    by: dict[str, dict] = {}
    for run in runs:
        seq = next(r for r in run["results"] if r.name == "sequential")
        z_seq = linearised(run["results"], seq)
        for r in run["results"]:
            if r.kind in ("full", "none"):
                continue
            z = linearised(run["results"], r)
            e = by.setdefault(r.name, {"z": [], "diff": [], "ttft": []})
            e["z"].append(z)
            e["diff"].append([a - b for a, b in zip(z, z_seq)])
            e["ttft"].append(run["ttft_median_s"][r.name])
    out = []
    for name, e in by.items():
        gain, diff = stats.pooled(e["z"]), stats.pooled(e["diff"])
        out.append({"method": name, "gain_kept": gain.mean, "se": gain.se,
                    "minus_sequential": None if name == "sequential" else diff.mean,
                    "minus_sequential_se": None if name == "sequential" else diff.se,
                    "ttft_median_s": statistics.mean(e["ttft"]), "questions": gain.questions,
                    "corpora": gain.corpora})
    return out


def markdown(meta: dict, rows: list[dict], runs: list[dict]) -> str:
    lines = [f"# Boundary repair of segments chosen per question ({meta['model']}, {meta['device']})", "",
             f"`{meta['command']}`, {meta['date']}. Corpora: "
             + ", ".join(f"{r['name']} ({r['tokens']} tokens, {r['questions']} questions)" for r in runs)
             + f"; `independent` packs at ratio {meta['ratio']:g}, `--select {meta['budget']:g}`.", "",
             "| method | gain kept | minus sequential (paired) | TTFT (median, s) |", "|---|---|---|---|"]
    for r in rows:
        diff = ("–" if r["minus_sequential"] is None
                else f"{r['minus_sequential']:+.3f} ± {r['minus_sequential_se']:.3f}")
        lines.append(f"| {r['method']} | {r['gain_kept']:.3f} ± {r['se']:.3f} | {diff} | {r['ttft_median_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--corpora", default="squad:2,squad:8")
    ap.add_argument("--ratio", type=float, default=1.0, help="the independent pack's kept ratio")
    ap.add_argument("--select", type=float, default=0.25, help="the selection's budget (query --select)")
    ap.add_argument("--ape", default="0.9/0.9;0.8/0.8;1/0.9;0.9/1",
                    help="APE settings T/S separated by ';' (each as query --ape T,S)")
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "boundary")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    apes = [a.strip().replace("/", ",") for a in args.ape.split(";") if a.strip()]
    lm = load_model(args.model, device="cpu", progress=False)
    recipe = load_recipe("qa")
    meta = {"model": lm.name, "device": f"CPU ({args.threads} thread)", "date": time.strftime("%Y-%m-%d"),
            "ratio": args.ratio, "budget": args.select,
            "command": "python bench/boundary.py " + " ".join(argv or sys.argv[1:])}
    runs = []
    with tempfile.TemporaryDirectory(prefix="boundary-") as tmp:
        for spec in (c.strip() for c in args.corpora.split(",") if c.strip()):
            runs.append(run_corpus(spec, lm, recipe, args.ratio, args.select, apes, args.questions, Path(tmp)))
    rows = pooled(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    data = {**meta, "rows": rows, "corpora": [{**{k: v for k, v in r.items() if k != "results"},
                                               "methods": [{"name": m.name, "gain_kept": m.gain_kept, "rows": m.rows}
                                                           for m in r["results"]]} for r in runs]}
    (args.out / "boundary.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (args.out / "boundary.md").write_text(markdown(meta, rows, runs), encoding="utf-8")
    log(f"wrote {args.out}/boundary.{{md,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
