"""Segments chosen per question (issue 15): ``query --select`` against RAG at the same budget,
and its boundary repair against reading the same text in one pass.

Per corpus: an ``independent`` pack at ``--ratio``; per question, the segments ``--select``
chooses (BM25 over the pack's index), then the gold answer's NLL from

- ``select``: their KV, side by side after the framing (no repair);
- ``rag`` (``--rag``): BM25 over 128-token chunks of the corpus, the best chunks up to the
  selection's budget (framing included) prefilled after the framing (``kvcompile eval``'s rag
  at the selection's budget): the same retriever and the same tokens, paid per question;
- ``sequential`` (``--sequential``): the documents ``select`` chose, their tokens prefilled
  in one pass after the framing (what the KV would be had they been compiled together);
- ``select+ape[T,S]``: their KV with APE's repair, for each ``--ape`` setting;
- ``select[chained]`` (``--chained``): the same documents' KV from a ``chained`` pack (each
  compiled after every document before it), attended without the ones not chosen: what
  selecting from a pack whose segments do not stand alone loses;

and the full context and no context (cached), for gain kept, pooled over corpora, with the
paired difference against ``--reference``. Time to first token (median per method):
choosing and placing the segments plus the question's forward, against retrieval plus the
prefill of the retrieved text (rag) or the prefill of the chosen text (sequential).

    python bench/selection.py                        # against RAG: squad:2,8,14 x 30 questions (make bench-select)
    python bench/selection.py --boundary             # boundary repair: squad:2,8 (make bench-boundary)
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
sys.path.insert(0, str(REPO / "bench"))

from peers import corpus_of  # noqa: E402

from kvcompile.builder import BuildOptions  # noqa: E402
from kvcompile.cache import forward  # noqa: E402
from kvcompile.evaluation import answercache, stats  # noqa: E402
from kvcompile.evaluation.methods import RagMethod, prefill_method  # noqa: E402
from kvcompile.evaluation.run import MethodResult, fill_gain_kept, linearised  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.pack import load  # noqa: E402
from kvcompile.pipeline import build  # noqa: E402
from kvcompile.recipe import load_recipe  # noqa: E402
from kvcompile.repair import Ape  # noqa: E402
from kvcompile.retrieval import Selector  # noqa: E402
from kvcompile.session import _nll, answer_ids  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@torch.no_grad()
def prefill_answer(lm, ids: list[int], answer: str) -> tuple[float, float]:
    """``(seconds to first token, gold-answer NLL)`` of a prompt read in one pass: the prefill of
    ``ids`` (context and question) is timed, then the answer is scored over its cache."""
    cache = DynamicCache(config=lm.config)
    t0 = time.perf_counter()
    first = forward(lm.model, torch.tensor([ids], device=lm.device), cache, logits_to_keep=1).logits[0, -1:]
    seconds = time.perf_counter() - t0
    a = answer_ids(lm, answer)
    rest = forward(lm.model, torch.tensor([a[:-1]], device=lm.device), cache).logits[0] if len(a) > 1 else first[:0]
    return seconds, _nll(torch.cat([first, rest]), a)


def run_corpus(spec: str, lm, recipe, ratio: float, budget: float, apes: list[str], n: int, tmp: Path,
               rag: bool, sequential: bool, chained: bool) -> dict:
    evalset, folder, qas, tk = corpus_of(spec, n, tmp, lm, recipe)
    path = tmp / f"{folder.name}.kvpack"
    t0 = time.perf_counter()
    build([folder], path, lm, recipe, BuildOptions(ratio=ratio, context="independent"))
    log(f"  {spec}: {tk.total} tokens, built independent at {ratio:g} in {time.perf_counter() - t0:.0f} s")
    pack = load(path)
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
    if chained:
        chained_path = tmp / f"{folder.name}-chained.kvpack"
        build([folder], chained_path, lm, recipe, BuildOptions(ratio=ratio, context="chained"))
        selectors["select[chained]"] = Selector(load(chained_path), lm, budget)
    # The selection's budget in prompt tokens, framing included, as `kvcompile eval --select` gives rag.
    retriever = RagMethod(lm, tk.framing, tk.doc_ids, round(len(tk.prefix_ids) + selectors["select"].budget),
                          128) if rag else None
    names = [*(["rag"] if rag else []), *(["sequential"] if sequential else []), *selectors]
    rows = {name: [] for name in names}
    ttft = {name: [] for name in names}
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
        texts = {}
        if sequential:
            docs = sorted(i for s in rows["select"][-1]["segments"] for i in segment_docs[s])
            texts["sequential"] = (0.0, list(tk.prefix_ids) + [t for i in docs for t in tk.doc_ids[i]])
        if retriever is not None:
            t0 = time.perf_counter()
            context = retriever.context(qa)
            texts["rag"] = (time.perf_counter() - t0, context)
        for name, (retrieval_s, context) in texts.items():
            seconds, nll = prefill_answer(lm, context + q_ids, qa.answers[0])
            ttft[name].append(retrieval_s + seconds)
            rows[name].append({"id": qa.id, "nll": nll, "tokens": len(context)})
    results += [MethodResult(name, "select", None, 0, 0, 0, None, r) for name, r in rows.items()]
    fill_gain_kept(results)
    log("  " + ", ".join(f"{r.name} {r.gain_kept:.3f}" for r in results if r.gain_kept is not None))
    return {"spec": spec, "name": evalset.name, "tokens": tk.total, "questions": len(qas), "results": results,
            "ttft_median_s": {k: statistics.median(v) for k, v in ttft.items()}}


def pooled(runs: list[dict], reference: str) -> list[dict]:
    """Per method, gain kept pooled over corpora, the paired difference from ``reference``,
    and the mean over corpora of its median TTFT."""
    by: dict[str, dict] = {}
    for run in runs:
        z_ref = linearised(run["results"], next(r for r in run["results"] if r.name == reference))
        for r in run["results"]:
            if r.kind in ("full", "none"):
                continue
            z = linearised(run["results"], r)
            e = by.setdefault(r.name, {"z": [], "diff": [], "ttft": []})
            e["z"].append(z)
            e["diff"].append([a - b for a, b in zip(z, z_ref)])
            e["ttft"].append(run["ttft_median_s"][r.name])
    out = []
    for name, e in by.items():
        gain, diff = stats.pooled(e["z"]), stats.pooled(e["diff"])
        mine = name == reference
        out.append({"method": name, "gain_kept": gain.mean, "se": gain.se,
                    "minus_reference": None if mine else diff.mean, "minus_reference_se": None if mine else diff.se,
                    "ttft_median_s": statistics.mean(e["ttft"]), "questions": gain.questions,
                    "corpora": gain.corpora})
    return out


def markdown(meta: dict, rows: list[dict], runs: list[dict]) -> str:
    ref = meta["reference"]
    ttft_ref = next(r["ttft_median_s"] for r in rows if r["method"] == ref)
    lines = [f"# {meta['title']} ({meta['model']}, {meta['device']})", "",
             f"`{meta['command']}`, {meta['date']}. Corpora: "
             + ", ".join(f"{r['name']} ({r['tokens']} tokens, {r['questions']} questions)" for r in runs)
             + f"; `independent` packs at ratio {meta['ratio']:g}, `--select {meta['budget']:g}`.", "",
             f"| method | gain kept | minus {ref} (paired) | TTFT (median, s) | TTFT / {ref}'s |",
             "|---|---|---|---|---|"]
    for r in rows:
        diff = ("–" if r["minus_reference"] is None
                else f"{r['minus_reference']:+.3f} ± {r['minus_reference_se']:.3f}")
        lines.append(f"| {r['method']} | {r['gain_kept']:.3f} ± {r['se']:.3f} | {diff} | {r['ttft_median_s']:.3f} | "
                     f"{r['ttft_median_s'] / ttft_ref:.2f} |")
    lines += ["", "Per corpus (gain kept; median TTFT in s):", "",
              "| corpus | " + " | ".join(r["method"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for run in runs:
        gains = {m.name: m.gain_kept for m in run["results"]}
        lines.append(f"| {run['spec']} | " + " | ".join(
            f"{gains[r['method']]:.3f} ({run['ttft_median_s'][r['method']]:.2f})" for r in rows) + " |")
    return "\n".join(lines) + "\n"


def write(meta: dict, runs: list[dict], out: Path, study: str) -> None:
    rows = pooled(runs, meta["reference"])
    out.mkdir(parents=True, exist_ok=True)
    data = {**meta, "rows": rows, "corpora": [{**{k: v for k, v in r.items() if k != "results"},
                                               "methods": [{"name": m.name, "gain_kept": m.gain_kept, "rows": m.rows}
                                                           for m in r["results"]]} for r in runs]}
    (out / f"{study}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out / f"{study}.md").write_text(markdown(meta, rows, runs), encoding="utf-8")
    log(f"wrote {out}/{study}.{{md,json}}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--boundary", action="store_true",
                    help="the boundary-repair study: --corpora squad:2,squad:8 --no-rag --sequential --chained, "
                         "four APE settings, against sequential, into docs/benchmarks/boundary (explicit options win)")
    ap.add_argument("--corpora", default=None, help="dataset specs (default: squad:2,squad:8,squad:14)")
    ap.add_argument("--ratio", type=float, default=1.0, help="the independent pack's kept ratio")
    ap.add_argument("--select", type=float, default=0.25, help="the selection's budget (query --select)")
    ap.add_argument("--ape", default=None,
                    help="APE settings T/S separated by ';' (each as query --ape T,S); default none "
                         "(--boundary: 0.9/0.9;0.8/0.8;1/0.9;0.9/1)")
    ap.add_argument("--rag", action=argparse.BooleanOptionalAction, default=None,
                    help="BM25-RAG at the selection's budget (default: on, off with --boundary)")
    ap.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                    help="the chosen documents prefilled in one pass (default: off, on with --boundary)")
    ap.add_argument("--chained", action=argparse.BooleanOptionalAction, default=None,
                    help="select from a chained pack too (default: off, on with --boundary)")
    ap.add_argument("--reference", default=None, help="paired differences against this method "
                    "(default: rag, sequential with --boundary)")
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None,
                    help="default: docs/benchmarks/select (--boundary: docs/benchmarks/boundary)")
    args = ap.parse_args(argv)
    study = "boundary" if args.boundary else "select"
    defaults = {"corpora": "squad:2,squad:8", "ape": "0.9/0.9;0.8/0.8;1/0.9;0.9/1", "rag": False, "sequential": True,
                "chained": True, "reference": "sequential"} if args.boundary else \
        {"corpora": "squad:2,squad:8,squad:14", "ape": "", "rag": True, "sequential": False, "chained": False,
         "reference": "rag"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or REPO / "docs" / "benchmarks" / study
    if args.reference not in ("select", *(["rag"] if args.rag else []), *(["sequential"] if args.sequential else [])):
        ap.error(f"--reference {args.reference!r} is not a method this run measures")
    torch.set_num_threads(args.threads)
    apes = [a.strip().replace("/", ",") for a in args.ape.split(";") if a.strip()]
    lm = load_model(args.model, device="cpu", progress=False)
    recipe = load_recipe("qa")
    title = ("Boundary repair of segments chosen per question" if args.boundary
             else "Segments chosen per question against RAG at the same budget")
    meta = {"title": title, "model": lm.name, "device": f"CPU ({args.threads} thread)",
            "date": time.strftime("%Y-%m-%d"), "ratio": args.ratio, "budget": args.select,
            "reference": args.reference, "command": "python bench/selection.py " + " ".join(argv or sys.argv[1:])}
    runs = []
    with tempfile.TemporaryDirectory(prefix=f"{study}-") as tmp:
        for spec in (c.strip() for c in args.corpora.split(",") if c.strip()):
            runs.append(run_corpus(spec, lm, recipe, args.ratio, args.select, apes, args.questions, Path(tmp),
                                   args.rag, args.sequential, args.chained))
            write(meta, runs, args.out, study)  # after every corpus: a long run leaves its finished part behind
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
