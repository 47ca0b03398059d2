#!/usr/bin/env python
"""Nightly rebuilds: what a one-document edit costs, and what each mode keeps.

``make bench-rebuild`` runs ``bench/rebuild.py --out docs/benchmarks/rebuild``. On a
generated corpus of entity profiles (one document per entity, unique facts, five
questions each) with the default model, for each mode (context ``independent``,
``chained`` or ``whole``, budgets per ``document`` or shared by the ``corpus``), in one
process and one after another:

1. a clean build of the corpus (timed);
2. one document in the middle is edited (a fact changes), and ``build`` runs again
   over the old pack (timed): how many segments it reused and recompiled (with corpus
   budgets: how many only because their budget moved);
3. a clean build of the edited corpus, compared byte for byte with the rebuild;
4. quality of the edited corpus's pack: gold-answer NLL of every question, and the
   share of the full context's gain it keeps (the ratio-1.0 ``chained`` pack is the
   exact full prefill; ``none`` is the framing alone), with the even-stride scorer at
   the same ratio as the floor any scorer must beat, and a paired bootstrap CI of the
   difference between the two modes.

Writes ``rebuild.json`` (raw numbers, machine info) and ``rebuild.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import kvcompile  # noqa: E402
from kvcompile.builder import BuildOptions  # noqa: E402
from kvcompile.data.synthetic import entity_profiles, write_corpus  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.pipeline import build  # noqa: E402
from kvcompile.quality import gain_kept, gain_kept_diff_ci, none_nll, pack_nll  # noqa: E402
from kvcompile.recipe import load_recipe  # noqa: E402

MODES = ("independent", "chained", "independent+corpus", "chained+corpus", "whole")  # context[+budgets]


def mode_options(mode: str, **kw) -> BuildOptions:
    """``context[+budgets]``; budgets left out: ``document``, except under ``whole`` (its default, ``corpus``)."""
    context, _, budgets = mode.partition("+")
    return BuildOptions(context=context, budgets=budgets or ("corpus" if context == "whole" else "document"), **kw)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed_build(corpus: Path, out: Path, lm, recipe, options: BuildOptions) -> dict:
    """One ``build`` call; wall seconds of the call, the build's own stage times, the plan's counts."""
    t0 = time.perf_counter()
    report = build([corpus], out, lm, recipe, options)
    return {"seconds": time.perf_counter() - t0, "compile_s": report.seconds["compile"],
            "survey_s": report.seconds.get("survey", 0.0), "counts": report.plan.counts(), "bytes": report.bytes,
            "tokens": report.cache_tokens, "budgets": [s["budget"] for s in kvcompile.load(out).header["segments"]]}


def edit_one(corpus: Path, documents: list[tuple[str, str]], index: int) -> str:
    """Change one fact of document ``index`` in place (its length changes a little too)."""
    path, text = documents[index]
    edited = text + " In a later interview this person said they had moved to Lisbon."
    (corpus / path).write_text(edited)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model name (default: the embedded default model)")
    ap.add_argument("--documents", type=int, default=45,
                    help="entity profiles (45: about 7.6k tokens, what fits SmolLM2's 8k window with the framing)")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared machine)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "rebuild")
    args = ap.parse_args()
    modes = args.modes.split(",")
    torch.set_num_threads(args.threads)

    lm = load_model(args.model, device="cpu", progress=False)
    recipe = load_recipe("qa")
    evalset = entity_profiles(args.documents, seed=args.seed)
    edited_index = args.documents // 2
    result = {"model": lm.name, "documents": args.documents, "ratio": args.ratio, "seed": args.seed,
              "edited_document": edited_index, "questions": len(evalset.questions), "modes": {},
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                          "torch": torch.__version__, "kvcompile": kvcompile.__version__,
                          "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                          "loadavg_start": list(os.getloadavg())}}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nll = {}
        for mode in modes:
            corpus = tmp / mode / "corpus"
            write_corpus(evalset, corpus)
            options = mode_options(mode, ratio=args.ratio)
            pack = tmp / mode / "corpus.kvpack"
            log(f"{mode}: clean build")
            full = timed_build(corpus, pack, lm, recipe, options)
            edited = edit_one(corpus, evalset.documents, edited_index)
            log(f"{mode}: rebuild after editing {edited}")
            rebuild = timed_build(corpus, pack, lm, recipe, options)
            log(f"{mode}: clean build of the edited corpus")
            clean = timed_build(corpus, tmp / mode / "clean.kvpack", lm, recipe, options)
            identical = pack.read_bytes() == (tmp / mode / "clean.kvpack").read_bytes()
            moved = sum(a != b for i, (a, b) in enumerate(zip(full["budgets"], rebuild["budgets"]))
                        if i != edited_index)
            result["modes"][mode] = {"full": full, "rebuild": rebuild, "clean_edited": clean, "budgets_moved": moved,
                                     "byte_identical": identical,
                                     "rebuild_share_compile": rebuild["compile_s"] / full["compile_s"],
                                     "rebuild_share_command": rebuild["seconds"] / full["seconds"]}
            log(f"{mode}: full {full['seconds']:.1f}s, rebuild {rebuild['seconds']:.1f}s, identical={identical}")

        # Quality, on the edited corpus (the same text in both modes' folders).
        corpus = tmp / modes[0] / "corpus"
        questions = list(evalset.questions)
        reference = tmp / "full.kvpack"
        build([corpus], reference, lm, recipe, BuildOptions(ratio=1.0, context="chained"))
        session = kvcompile.load(reference).session(lm)
        log(f"quality: full and none over {len(questions)} questions")
        nll["full"] = pack_nll(session, questions)
        nll["none"] = none_nll(session, questions)
        packs = {mode: tmp / mode / "corpus.kvpack" for mode in modes}
        for mode in modes:
            packs[f"{mode} stride"] = tmp / mode / "stride.kvpack"
            build([corpus], packs[f"{mode} stride"], lm, recipe, mode_options(mode, ratio=args.ratio, scorer="stride"))
        for name, path in packs.items():
            log(f"quality: {name}")
            nll[name] = pack_nll(kvcompile.load(path).session(lm), questions)
        result["quality"] = {name: gain_kept(nll["none"], nll["full"], v) for name, v in nll.items()
                             if name not in ("none", "full")}
        if {"chained", "independent"} <= set(modes):
            result["quality_ci_chained_minus_independent"] = gain_kept_diff_ci(
                nll["none"], nll["full"], nll["chained"], nll["independent"])
        result["nll"] = nll

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rebuild.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "rebuild.md").write_text(markdown(result))
    log(f"wrote {args.out / 'rebuild.md'}")


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Nightly rebuilds: cost of a one-document edit, quality of each mode",
        "",
        f"`bench/rebuild.py` on {r['model']}, CPU, {m['torch_threads']} torch thread(s), {m['date']} "
        f"(load average at start {', '.join(f'{x:.1f}' for x in m['loadavg_start'])}). Corpus: "
        f"{r['documents']} generated entity profiles (seed {r['seed']}), "
        f"{r['modes']['chained']['full']['tokens']} cache tokens, ratio {r['ratio']}; "
        f"document {r['edited_document']} (the middle one) gets one sentence more.",
        "",
        "| mode | full build | rebuild after one edit | rebuild / full | segments reused / recompiled "
        "| of them, budget moved | byte-identical to a clean build |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, x in r["modes"].items():
        c = x["rebuild"]["counts"]
        lines.append(
            f"| {mode} | {x['full']['seconds']:.1f} s (compile {x['full']['compile_s']:.1f} s) "
            f"| {x['rebuild']['seconds']:.1f} s (compile {x['rebuild']['compile_s']:.1f} s) "
            f"| {x['rebuild_share_command']:.1%} (compile {x['rebuild_share_compile']:.1%}) "
            f"| {c.get('reused', 0)} / {c.get('recompiled', 0)} | {x.get('budgets_moved', 0)} "
            f"| {'yes' if x['byte_identical'] else '**no**'} |")
    q, ci = r["quality"], r.get("quality_ci_chained_minus_independent")
    lines += [
        "",
        "Times are of the whole `build` call with the model already loaded (tokenising, reading the "
        "old pack, surveying the corpus (`+corpus` modes), compiling, writing); `compile` is the prefill and "
        "selection alone. Under corpus budgets a rebuild also recompiles the documents whose budget moved "
        "onto another step of the grid (docs/methods.md); in chained mode every document after the edit "
        "is recompiled anyway; `whole` (one prefill of the corpus, one selection over it) recompiles "
        "every document.",
        "",
        f"## Quality ({r['questions']} questions, share of the full context's NLL gain kept)",
        "",
        "| mode | task-aware | even stride |",
        "|---|---|---|",
    ]
    for mode in r["modes"]:
        lines.append(f"| {mode} | {q[mode]:.3f} | {q[mode + ' stride']:.3f} |")
    if ci:
        lines += ["", f"Chained minus independent (task-aware), paired bootstrap 90% CI over questions: "
                  f"{ci[0]:+.3f} to {ci[1]:+.3f}."]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
