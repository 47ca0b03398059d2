#!/usr/bin/env python
"""kvcompile benchmark: build time, pack size, query latency and answer quality.

``make bench`` runs ``bench/run.py --out docs/benchmarks``. For every (model, corpus) it
measures, in one process and one after another:

1. bare prefill: one ordinary SDPA forward over the pack's token stream (framing prefix +
   documents), ``logits_to_keep=1``: the floor that any build pays;
2. builds with the ``qa`` recipe: ratio 1.0 (the exact full-context pack: the reference
   for quality), and at each ratio the default task-aware scorer and the ``stride``
   baseline; build seconds, pack bytes, kept share;
3. latency: time to first token (TTFT) from a pack versus re-prefilling corpus + question
   with no cache; pack load time; decode tokens/s;
4. quality: gold-answer NLL with no documents, with the full context (the ratio-1.0
   pack) and with each pack; ``gain_kept`` per method and ratio; plus generated answers
   from the ~0.25 pack for a handful of questions (contains-accuracy, a sanity column).

Writes ``build-query.json`` (raw numbers, machine info), ``build-query.md`` (tables and
observations) and ``build-query.png`` (gain kept vs kept ratio). ``--report-only`` redoes
the markdown and plot from an existing JSON. Results are written after every (model,
corpus), so an interrupted run leaves what it had measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvcompile.evaluation.metrics import contains  # noqa: E402
from kvcompile.quality import gain_kept_diff_ci  # noqa: E402

T_START = time.perf_counter()

DEFAULT_MODELS = "smollm2-135m,qwen2.5-coder-0.5b"
DEFAULT_CORPORA = "example,squad:Normans"
DEFAULT_RATIOS = "0.5,0.25,0.1"


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- helpers


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def machine_info(load_start) -> dict:
    import torch
    import transformers

    import kvcompile

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvcompile": kvcompile.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": list(load_start),
    }


# ----------------------------------------------------------------------------- corpora


def load_corpus(spec: str, tmp: Path):
    """``example`` or ``squad:TITLE`` -> (paths, questions, description)."""
    from kvcompile.data.qa import read_qa_jsonl

    if spec == "example":
        folder = REPO / "docs" / "example-corpus"
        return [str(folder)], read_qa_jsonl(folder / "questions.jsonl"), "docs/example-corpus (product docs, 40 QA)"
    if spec.startswith("squad:"):
        from kvcompile.data.squad import squad_article
        from kvcompile.data.synthetic import write_corpus

        evalset = squad_article(spec.split(":", 1)[1])
        folder = tmp / re.sub(r"[^A-Za-z0-9_.-]", "_", spec)
        write_corpus(evalset, folder)
        return [str(folder)], list(evalset.questions), (
            f"{evalset.name}: {len(evalset.documents)} paragraphs, {len(evalset.questions)} answerable questions")
    raise SystemExit(f"unknown corpus {spec!r}: use 'example' or 'squad:TITLE'")


# ----------------------------------------------------------------------------- measurements


def sdpa_forward(lm, ids: list[int]):
    """One ordinary forward (SDPA attention, no pack) of ``ids``: (seconds, last logits)."""
    import torch

    x = torch.tensor([ids], dtype=torch.long, device=lm.device)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = lm.model(x, logits_to_keep=1).logits[0, -1].float()
        dt = time.perf_counter() - t0
    return dt, logits


def build_one(paths, out: Path, lm, recipe, options) -> dict:
    import kvcompile
    from kvcompile.pipeline import build
    from kvcompile.scorers import make_scorer

    report = build(paths, out, lm, recipe, options)
    pack = kvcompile.load(out)
    cfg = lm.config
    heads = cfg.num_hidden_layers * cfg.num_key_value_heads
    if hasattr(options, "make_scorer"):
        scorer = options.make_scorer()
    else:  # compile_corpus gives the stride scorer the build ratio; record what the scorer used.
        params = {"ratio": options.ratio or 0.25} if options.scorer == "stride" else {}
        scorer = make_scorer(options.scorer, **{**params, **options.scorer_params})
    return {
        "path": str(out),
        "ratio": options.ratio,
        "scorer": options.scorer,
        "scorer_params": scorer.params(),
        "options": options.to_json(),
        "seconds": report.seconds,
        "bytes": report.bytes,
        "sizes": pack.sizes(),
        "cache_tokens": report.cache_tokens,
        "kept_tokens": report.kept_tokens,
        "full_tokens": report.full_tokens,
        "kept_share": report.kept_tokens / report.full_tokens,
        "kept_per_head": report.kept_tokens / heads,
    }


def open_session(path, lm):
    import kvcompile
    from kvcompile.session import Session

    t0 = time.perf_counter()
    pack = kvcompile.load(path)
    t1 = time.perf_counter()
    session = Session(pack, lm)
    t2 = time.perf_counter()
    return session, {"read_verify": t1 - t0, "session": session.load_seconds, "total": t2 - t0}


def pack_latency(session, questions, max_new_tokens: int) -> dict:
    """TTFT and decode speed over ``questions`` (after one untimed warm-up question)."""
    list(session.stream(questions[0].question, max_new_tokens=1))  # warm-up
    rows = []
    for qa in questions:
        timings: dict = {}
        text = "".join(session.stream(qa.question, max_new_tokens=max_new_tokens, timings=timings))
        rows.append({"id": qa.id, "text": text, **timings})
    rates = [r["tokens_per_s"] for r in rows if r.get("tokens", 0) > 1]
    decode_tokens = sum(max(0, r["tokens"] - 1) for r in rows)
    decode_s = sum(r["decode"] for r in rows if r.get("tokens", 0) > 1)
    return {
        "questions": rows,
        "ttft_median": median([r["ttft"] for r in rows]),
        "tokens_per_s_median": median(rates),
        "tokens_per_s_pooled": decode_tokens / decode_s if decode_s > 0 else None,
        "max_new_tokens": max_new_tokens,
    }


def answers(session, questions, max_new_tokens: int) -> dict:
    rows = []
    for qa in questions:
        a = session.ask(qa.question, max_new_tokens=max_new_tokens)
        rows.append({"id": qa.id, "question": qa.question, "gold": list(qa.answers), "answer": a.text,
                     "correct": bool(contains(a.text, qa.answers))})
    return {"rows": rows, "correct": sum(r["correct"] for r in rows), "n": len(rows),
            "max_new_tokens": max_new_tokens}


def run_pair(model_name: str, lm, corpus: str, args, tmp: Path, n_questions: int, ratios: list[float]) -> dict:
    from kvcompile.builder import BuildOptions, tokenize
    from kvcompile.corpus import read_corpus
    from kvcompile.quality import gain_kept, none_nll, pack_nll
    from kvcompile.recipe import load_recipe

    t_pair = time.perf_counter()
    paths, all_qas, desc = load_corpus(corpus, tmp)
    qas = all_qas[:n_questions]
    recipe = load_recipe("qa")
    docs, skipped = read_corpus(paths)
    tk = tokenize(docs, recipe, lm)
    stream = tk.stream()
    cfg = lm.config
    res: dict = {
        "model": model_name, "corpus": corpus, "corpus_description": desc, "documents": len(docs),
        "skipped": [s.path for s in skipped], "cache_tokens": len(stream), "corpus_tokens": tk.corpus_tokens,
        "task_prompt_tokens": len(tk.probe_ids), "layers": cfg.num_hidden_layers,
        "kv_heads": cfg.num_key_value_heads, "n_questions": len(qas),
        "question_ids": [q.id for q in qas],
        "question_docs": sorted({q.doc for q in qas if q.doc}),
    }
    log(f"{model_name} / {corpus}: {len(docs)} documents, {len(stream)} tokens, {len(qas)} questions")

    # 1. bare prefill ---------------------------------------------------------------
    sdpa_forward(lm, stream[:32])  # warm-up
    runs = []
    for i in range(args.prefill_runs):
        dt, _ = sdpa_forward(lm, stream)
        runs.append(dt)
        log(f"  bare prefill run {i + 1}/{args.prefill_runs}: {dt:.1f}s")
    res["bare_prefill"] = {"runs": runs, "median": median(runs)}

    # 2. builds -------------------------------------------------------------------------
    packs = tmp / f"packs-{re.sub(r'[^A-Za-z0-9]', '_', model_name + '-' + corpus)}"
    packs.mkdir(parents=True, exist_ok=True)
    plan = [("full", 1.0, BuildOptions(ratio=1.0))]
    for r in ratios:
        plan.append(("task_aware", r, BuildOptions(ratio=r)))
        plan.append(("stride", r, BuildOptions(ratio=r, scorer="stride")))
    builds = []
    for method, r, opts in plan:
        info = build_one(paths, packs / f"{method}-{r}.kvpack", lm, recipe, opts)
        info["method"] = method
        builds.append(info)
        s = info["seconds"]
        log(f"  build {method:10s} ratio {r:<5}: {s['total']:.1f}s (prefill {s.get('prefill', 0):.1f}, "
            f"score {s.get('score', 0):.1f}), {info['bytes'] / 2**20:.2f} MiB, kept {info['kept_share']:.3f}")
    res["builds"] = builds
    full_build = builds[0]

    # 3 + 4 on the full pack: reference NLLs, latency, exactness check, answers -------------
    session, load = open_session(full_build["path"], lm)
    full_build["load_seconds"] = load
    t0 = time.perf_counter()
    nll_none = none_nll(session, qas)
    nll_full = pack_nll(session, qas)
    log(f"  NLL none {mean(nll_none):.3f}, full {mean(nll_full):.3f} ({time.perf_counter() - t0:.1f}s)")
    res["nll"] = {"none": nll_none, "full": nll_full}

    lat_qs = qas[: args.latency_questions]
    full_build["latency"] = pack_latency(session, lat_qs, args.decode_tokens)
    log(f"  full pack: load {load['total']:.2f}s, TTFT {full_build['latency']['ttft_median']:.3f}s, "
        f"decode {full_build['latency']['tokens_per_s_median'] or 0:.1f} tok/s")

    # re-prefill: the first token of a no-cache answer; compare with the full pack's logits.
    reprefill = []
    for qa in qas[: args.reprefill_questions]:
        q_ids = session.question_ids(qa.question)
        dt, logits = sdpa_forward(lm, stream + q_ids)
        pack_logits = session.first_token_logits(qa.question)
        reprefill.append({"id": qa.id, "tokens": len(stream) + len(q_ids), "seconds": dt,
                          "max_abs_logit_diff_vs_full_pack": float((logits - pack_logits).abs().max()),
                          "same_first_token": int(logits.argmax()) == int(pack_logits.argmax())})
        log(f"  re-prefill {qa.id}: {dt:.1f}s, |logit diff| vs full pack "
            f"{reprefill[-1]['max_abs_logit_diff_vs_full_pack']:.2e}")
    res["reprefill"] = {"questions": reprefill, "ttft_median": median([r["seconds"] for r in reprefill])}

    ans_qs = qas[: args.answer_questions]
    res["answers_full"] = answers(session, ans_qs, args.answer_tokens)
    del session
    gc.collect()

    # 3 + 4 on the compressed packs ---------------------------------------------------
    answer_ratio = min(ratios, key=lambda r: abs(r - 0.25))
    for info in builds[1:]:
        session, load = open_session(info["path"], lm)
        info["load_seconds"] = load
        t0 = time.perf_counter()
        nll = pack_nll(session, qas)
        info["nll"] = nll
        info["nll_mean"] = mean(nll)
        info["gain_kept"] = gain_kept(nll_none, nll_full, nll)
        msg = f"  {info['method']:10s} ratio {info['ratio']:<5}: NLL {mean(nll):.3f}, gain kept {info['gain_kept']:.3f}"
        msg += f" ({time.perf_counter() - t0:.1f}s)"
        if info["method"] == "task_aware":
            info["latency"] = pack_latency(session, lat_qs, args.decode_tokens)
            msg += f"; TTFT {info['latency']['ttft_median']:.3f}s, load {load['total']:.2f}s"
            if info["ratio"] == answer_ratio:
                info["answers"] = answers(session, ans_qs, args.answer_tokens)
                res["answers_pack"] = {"ratio": answer_ratio, **info["answers"]}
                msg += f", answers {info['answers']['correct']}/{info['answers']['n']}"
        log(msg)
        del session
        gc.collect()

    res["nll_mean"] = {"none": mean(nll_none), "full": mean(nll_full)}
    res["seconds"] = time.perf_counter() - t_pair
    shutil.rmtree(packs, ignore_errors=True)
    log(f"{model_name} / {corpus} done in {res['seconds']:.0f}s")
    return res


# ----------------------------------------------------------------------------- reports


def fmt(x, digits=2, none="–"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return f"{x:.{digits}f}"


def markdown(data: dict) -> str:
    m = data["machine"]
    cfg = data["config"]
    lines = [
        "# Benchmark: build, size, latency and quality",
        "",
        "Generated by `bench/run.py` (`make bench`); raw numbers in [build-query.json](build-query.json).",
        "",
        "## What was measured, and how",
        "",
        "For each model and corpus, in one process and one after another:",
        "",
        f"- **Bare prefill**: one ordinary forward pass (SDPA attention, no pack, `logits_to_keep=1`, "
        f"`torch.no_grad()`) over exactly the token stream a pack holds (framing prefix + documents); "
        f"{'median of ' + str(cfg['prefill_runs']) + ' runs' if cfg['prefill_runs'] > 1 else 'one run'} "
        "after a short warm-up. It is the floor any build pays.",
        "- **Builds** with the `qa` recipe: ratio 1.0 (the full-context pack, exact up to the default fp16 "
        "storage of K and V: see the logit check under each table; the quality reference), and at "
        "each ratio the default task-aware scorer (default parameters) and the `stride` baseline (every k-th token). "
        "Build seconds are `BuildReport.seconds['total']` (read, chunked prefill, scoring, selection, encoding, "
        "atomic write); pack size is the file size; \"vs fp16 full\" divides it by the fp16 KV cache of the whole "
        "stream (`Pack.sizes()['ratio_vs_full_fp16']`).",
        f"- **Latency**: time to first token (TTFT) from a pack (`Session.stream` timings; pack load + key "
        f"rotation measured separately as *pack load*), median over {cfg['latency_questions']} questions after one "
        f"untimed warm-up question, versus re-prefilling framing + corpus + question with no cache (one SDPA forward, "
        f"`logits_to_keep=1`), median over {cfg['reprefill_questions']} question(s) (each re-prefill costs a full "
        f"prefill, so only {cfg['reprefill_questions']}; the questions differ by a few tokens only). Decode speed: "
        f"greedy, up to {cfg['decode_tokens']} new tokens from the pack, median of the per-question tokens/s.",
        "- **Quality**: mean negative log-likelihood (NLL) per token of the first gold answer, with the pack's "
        "framing and no documents (*none*), with the whole corpus (*full*, read from the ratio-1.0 pack) and with "
        "each pack. *Gain kept* = (NLL_none − NLL_method) / (NLL_none − NLL_full), pooled over the questions "
        "(`kvcompile.quality.gain_kept`): 1 = as good as the full context, 0 = no better than no documents. "
        "Questions: the first N of each corpus, in file order.",
        f"- **Answers** (a sanity column): greedy answers (up to {cfg['answer_tokens']} tokens) from the full pack and "
        f"the ~0.25 task-aware pack for the first {cfg['answer_questions']} questions, counted correct when a gold "
        "answer is contained in the answer after SQuAD normalisation (lowercase, no punctuation or articles).",
        "",
        f"**Machine**: {m['platform']}, {m['cpu_count']} CPU cores, "
        f"{'CUDA' if m['cuda'] else 'no GPU'}; Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}, kvcompile {m['kvcompile']}; models in float32 on CPU; {m['date']}. The machine was "
        f"shared with other processes: load average {', '.join(fmt(x) for x in m['loadavg_start'])} (1, 5, 15 min) "
        f"at the start and {', '.join(fmt(x) for x in m.get('loadavg_end', []) or [])} at the end, on "
        f"{m['cpu_count']} cores, so absolute times are inflated and noisy; ratios measured side by side "
        "(build/prefill, TTFT speed-up) are the more reliable numbers.",
        "",
        f"torch ran with {cfg.get('threads', m['torch_threads'])} thread(s) (`--threads`)"
        + (": on this shared, oversubscribed CPU two OpenMP threads stall on every small op (measured before the "
           "run: a 5-token forward over a 4.5k-token pack took 1.6-3.6 s with 2 threads, 0.6 s with 1; a 1024-token "
           "prefill 17.9 s vs 13.1 s), so everything here, prefill included, is single-threaded."
           if cfg.get("threads") == 1 else "."),
        "",
        f"Total run time: {fmt(data.get('total_seconds', 0) / 60, 1)} min.",
    ]
    for name, r in (cfg.get("reduced") or {}).items():
        lines += ["", f"To keep the run short, `{name}` was measured on a reduced matrix: corpora "
                  f"{', '.join(r['corpora'])}; ratios {', '.join(map(str, r['ratios']))}; the first "
                  f"{r['questions']} questions (others: every corpus, ratios {', '.join(map(str, cfg['ratios']))}, "
                  f"{cfg['questions']} questions). `--reduced-models ''` runs the full matrix."]
    lines.append("")

    for res in data["results"]:
        lines += pair_markdown(res)
    lines += ["## Gain kept vs kept ratio", "", "![gain kept vs kept ratio](build-query.png)", ""]
    lines += observations(data)
    lines += ["", "How to reproduce: `make bench` (or `.venv/bin/python bench/run.py --out docs/benchmarks`; "
              "`--quick` for a smoke test; `--help` for the options).", ""]
    return "\n".join(lines)


def ci_text(res: dict, ratio) -> str:
    ci = diff_ci(res, ratio)
    return f"{ci[0]:+.2f} to {ci[1]:+.2f}" if ci else "–"


def pair_markdown(res: dict) -> list[str]:
    builds = res["builds"]
    full = builds[0]
    prefill = res["bare_prefill"]["median"]
    by = {(b["method"], b["ratio"]): b for b in builds}
    ratios = [b["ratio"] for b in builds if b["method"] == "task_aware"]
    lines = [
        f"## {res['model']} on {res['corpus']}",
        "",
        f"{res['corpus_description']}. Stream: {res['cache_tokens']} tokens ({res['documents']} documents); "
        f"task prompt {res['task_prompt_tokens']} tokens; {res['layers']} layers x {res['kv_heads']} KV heads; "
        f"{res['n_questions']} questions"
        + (f" (from {len(res['question_docs'])} of the {res['documents']} documents)"
           if res.get("question_docs") else "")
        + f"; fp16 full cache {full['sizes']['full_fp16'] / 2**20:.2f} MiB. "
        f"Pair measured in {res['seconds'] / 60:.1f} min.",
        "",
        "| ratio | kept tokens (per KV head) | pack MiB | vs fp16 full | build s | bare prefill s | build/prefill "
        "| gain kept (task-aware) | gain kept (stride) | task-aware − stride, 90% CI |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| 1.0 (full) | {full['kept_per_head']:.0f} / {res['cache_tokens']} | {full['bytes'] / 2**20:.2f} | "
        f"{full['sizes']['ratio_vs_full_fp16']:.3f} | {full['seconds']['total']:.1f} | {prefill:.1f} | "
        f"{full['seconds']['total'] / prefill:.2f} | 1 (reference) | 1 (reference) | |",
    ]
    for r in ratios:
        ta, st = by[("task_aware", r)], by.get(("stride", r))
        lines.append(
            f"| {r} | {ta['kept_per_head']:.0f} / {res['cache_tokens']} | {ta['bytes'] / 2**20:.2f} | "
            f"{ta['sizes']['ratio_vs_full_fp16']:.3f} | {ta['seconds']['total']:.1f} | {prefill:.1f} | "
            f"{ta['seconds']['total'] / prefill:.2f} | {fmt(ta.get('gain_kept'), 3)} | "
            f"{fmt(st.get('gain_kept') if st else None, 3)} | {ci_text(res, r)} |")
    ta_params = next((b["scorer_params"] for b in builds if b["method"] == "task_aware"), None)
    if ta_params is not None:
        lines += ["", "Task-aware scorer parameters (the defaults): "
                  + (", ".join(f"`{k}={v}`" for k, v in ta_params.items()) or "none") + "."]
    lines += ["", "Build time by stage (s) and the stride builds:", "",
              "| pack | read | prefill | score+select | write | total |", "|---|---|---|---|---|---|"]
    for b in builds:
        s = b["seconds"]
        lines.append(f"| {b['method']} {b['ratio']} | {fmt(s.get('read'), 1)} | {fmt(s.get('prefill'), 1)} | "
                     f"{fmt(s.get('score'), 1)} | {fmt(s.get('write'), 1)} | {fmt(s.get('total'), 1)} |")
    nm = res["nll_mean"]
    lines += ["", f"Mean gold-answer NLL (nats/token): none {nm['none']:.3f}, full {nm['full']:.3f}; "
              + "; ".join(f"{r}: task-aware {fmt(by[('task_aware', r)].get('nll_mean'), 3)}, stride "
                          f"{fmt(by[('stride', r)].get('nll_mean'), 3)}" for r in ratios) + "."]
    rp = res["reprefill"]
    diffs = [q["max_abs_logit_diff_vs_full_pack"] for q in rp["questions"]]
    if diffs:
        lines.append(f"Full (ratio 1.0, fp16 codec) pack vs re-prefill, first answer token: max |logit diff| "
                     f"{max(diffs):.2e}, same token in {sum(q['same_first_token'] for q in rp['questions'])}/"
                     f"{len(diffs)}.")
    lines += ["", "| pack | pack load s | TTFT pack s | TTFT re-prefill s | speed-up | decode tok/s |",
              "|---|---|---|---|---|---|"]
    re_ttft = rp["ttft_median"]
    for b in [full] + [by[("task_aware", r)] for r in ratios]:
        lat = b.get("latency")
        if not lat:
            continue
        name = "full 1.0" if b["method"] == "full" else f"task-aware {b['ratio']}"
        lines.append(f"| {name} | {b['load_seconds']['total']:.2f} | {lat['ttft_median']:.3f} | {fmt(re_ttft, 1)} | "
                     f"{fmt(re_ttft / lat['ttft_median'] if re_ttft else None, 0)}x | "
                     f"{fmt(lat['tokens_per_s_median'], 1)} |")
    af, ap = res.get("answers_full"), res.get("answers_pack")
    if af and ap:
        lines += ["", f"Answers contain a gold answer: full pack {af['correct']}/{af['n']}, task-aware "
                  f"{ap['ratio']} pack {ap['correct']}/{ap['n']}.", ""]
        lines += ["| question | gold | full pack | task-aware " + str(ap["ratio"]) + " |", "|---|---|---|---|"]
        for f, p in zip(af["rows"], ap["rows"]):
            cell = lambda row: ("✓ " if row["correct"] else "✗ ") + row["answer"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {f['question']} | {f['gold'][0]} | {cell(f)} | {cell(p)} |")
    lines.append("")
    return lines


def span(xs, scale=1.0, unit="", digits=0) -> str:
    lo, hi = f"{min(xs) * scale:.{digits}f}", f"{max(xs) * scale:.{digits}f}"
    return f"{lo}{unit}" if lo == hi else f"{lo}{unit} to {hi}{unit}"


def diff_ci(res: dict, ratio) -> tuple | None:
    by = {(b["method"], b["ratio"]): b for b in res["builds"]}
    ta, st = by.get(("task_aware", ratio)), by.get(("stride", ratio))
    if not ta or not st or "nll" not in ta or "nll" not in st:
        return None
    return gain_kept_diff_ci(res["nll"]["none"], res["nll"]["full"], ta["nll"], st["nll"])


def observations(data: dict) -> list[str]:
    """Sentences computed from the numbers (so a rerun keeps them true)."""
    out = ["## Observations", ""]
    wins, losses, ties = [], [], []
    overheads, full_overheads, speedups, score_shares, loads, ttft_by_ratio = [], [], [], [], [], {}
    gains, answers_txt = [], []
    for res in data["results"]:
        by = {(b["method"], b["ratio"]): b for b in res["builds"]}
        tag = f"{res['model']} / {res['corpus']}"
        prefill = res["bare_prefill"]["median"]
        for b in res["builds"]:
            (full_overheads if b["method"] == "full" else overheads).append(b["seconds"]["total"] / prefill)
            if b["method"] == "task_aware" and b["seconds"].get("total"):
                score_shares.append(b["seconds"].get("score", 0) / b["seconds"]["total"])
        nm = res["nll_mean"]
        gains.append(f"{tag} {nm['none'] - nm['full']:.2f} ({nm['none']:.2f} -> {nm['full']:.2f}, "
                     f"{res['n_questions']} questions)")
        for (method, r), b in sorted(by.items(), key=lambda kv: -kv[0][1]):
            if method != "task_aware":
                continue
            st = by.get(("stride", r))
            g, gs = b.get("gain_kept"), st.get("gain_kept") if st else None
            if g is None or gs is None or math.isnan(g) or math.isnan(gs):
                continue
            ci = diff_ci(res, r)
            item = f"{tag} at {r} ({g:.2f} vs {gs:.2f}" + (f", 90% CI of the difference {ci[0]:+.2f} to "
                                                            f"{ci[1]:+.2f}" if ci else "") + ")"
            if ci is None:
                (wins if g > gs + 0.05 else losses if g < gs - 0.05 else ties).append(item)
            else:
                (wins if ci[0] > 0 else losses if ci[1] < 0 else ties).append(item)
        re_ttft = res["reprefill"]["ttft_median"]
        for b in res["builds"]:
            if b.get("latency") and re_ttft:
                speedups.append(re_ttft / b["latency"]["ttft_median"])
                loads.append(b["load_seconds"]["total"] / b["latency"]["ttft_median"])
                ttft_by_ratio.setdefault(tag, []).append((b["ratio"], b["latency"]["ttft_median"]))
        af, ap = res.get("answers_full"), res.get("answers_pack")
        if af and ap:
            answers_txt.append(f"{tag} {af['correct']}/{af['n']} from the full pack, {ap['correct']}/{ap['n']} "
                               f"from the {ap['ratio']} pack")
    total = len(wins) + len(losses) + len(ties)
    paras = []
    if total:
        p = [f"**Quality.** Compared at the same kept share (paired bootstrap over the questions), task-aware "
             f"selection keeps significantly more of the full context's gain than the stride baseline in "
             f"{len(wins)} of {total} (model, corpus, ratio) cases"
             + (f": {'; '.join(wins)}" if wins else "") + "."]
        if losses:
            p.append(f"It keeps significantly less in {len(losses)}: {'; '.join(losses)}.")
        if ties:
            p.append(f"The two cannot be told apart at this sample size in {len(ties)}: {'; '.join(ties)}.")
        p.append("The full context's gain, the denominator of gain kept, is (NLL none - full, nats/token): "
                 + "; ".join(gains) + "; where it is small, gain kept swings widely (a pack can even do worse "
                 "than no documents: a negative value).")
        if answers_txt:
            p.append("Generated answers, a sanity check on the first questions only (answer contains a gold "
                     "answer): "
                     + "; ".join(answers_txt) + ".")
        paras.append(" ".join(p))
    if overheads:
        paras.append(
            f"**Build cost.** A compressed build takes {span(overheads, 1, 'x', 1)} the time of a bare prefill of "
            f"the same tokens, the ratio-1.0 build {span(full_overheads, 1, 'x', 2)}: the model's forward passes "
            "dominate. The rest is what a build does beyond one forward: it runs chunk by chunk (2048 tokens), "
            "appends the task prompt to every chunk that needs scoring, attends over the kept KV through "
            "kvcompile's ragged per-KV-head attention (plain PyTorch, one SDPA call per head with an explicit "
            "mask) instead of one fused SDPA call, recomputes the probe rows' attention in float32 to score, "
            "selects, and writes a checksummed, partly zstd-compressed file"
            + (f"; scoring and selection are {span(score_shares, 100, '%')} of a task-aware build"
               if score_shares else "")
            + ". The stride baseline pays the same prefill, so its build is hardly cheaper.")
    if speedups:
        paras.append(
            f"**Latency.** Answering from a pack starts {span(speedups, 1, 'x')} sooner than re-prefilling the "
            "corpus with the question: the pack runs only the question's tokens against the cached KV, while a "
            "re-prefill runs the whole corpus again. TTFT from the pack still grows with what the pack holds "
            "(full -> smallest ratio): "
            + "; ".join(f"{tag} " + " -> ".join(f"{t:.2f}s" for _, t in sorted(v, key=lambda x: -x[0]))
                        for tag, v in ttft_by_ratio.items())
            + f"; decode speeds up likewise. Loading a pack (verify checksums, decode, rotate keys) costs "
            f"{span(loads, 1, 'x', 1)} one TTFT, once per session.")
    out.append("\n\n".join(paras) if paras else "No results.")
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, res in enumerate(data["results"]):
        c = colors[i % len(colors)]
        for method, style, marker in (("task_aware", "-", "o"), ("stride", "--", "x")):
            pts = sorted((b["kept_share"], b["gain_kept"]) for b in res["builds"]
                         if b["method"] == method and b.get("gain_kept") is not None)
            if not pts:
                continue
            label = f"{res['model']} / {res['corpus']} ({'task-aware' if method == 'task_aware' else 'stride'})"
            ax.plot([p[0] for p in pts] + [1.0], [p[1] for p in pts] + [1.0], style, color=c, marker=marker,
                    label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("kept share of the KV cache")
    ax.set_ylabel("gain kept (1 = full context, 0 = no documents)")
    ax.set_title("kvcompile: task-aware vs stride selection")
    ax.set_xlim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "build-query.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    os.replace(tmp, out / "build-query.json")
    if data["results"]:
        (out / "build-query.md").write_text(markdown(data))
        plot(data, out / "build-query.png")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="docs/benchmarks", help="output folder (default docs/benchmarks)")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated model aliases (default {DEFAULT_MODELS})")
    p.add_argument("--corpora", default=DEFAULT_CORPORA,
                   help=f"comma-separated: 'example' and/or 'squad:TITLE' (default {DEFAULT_CORPORA})")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help=f"comma-separated kept ratios (default {DEFAULT_RATIOS})")
    p.add_argument("--questions", type=int, default=40, help="first N questions of each corpus (default 40)")
    p.add_argument("--reduced-models", default="qwen2.5-coder-0.5b",
                   help="models measured on a reduced matrix, to keep the run short (default\n"
                        "qwen2.5-coder-0.5b; '' for none): only --reduced-corpora, --reduced-ratios,\n"
                        "--reduced-questions")
    p.add_argument("--reduced-corpora", default="example", help="corpora of the reduced models (default example)")
    p.add_argument("--reduced-ratios", default="0.25", help="ratios of the reduced models (default 0.25)")
    p.add_argument("--reduced-questions", type=int, default=20, help="questions of the reduced models (default 20)")
    p.add_argument("--prefill-runs", type=int, default=1, help="bare prefill runs, median (default 1)")
    p.add_argument("--latency-questions", type=int, default=5, help="questions for pack TTFT (default 5)")
    p.add_argument("--reprefill-questions", type=int, default=2,
                   help="questions for the re-prefill TTFT, each a full prefill (default 2)")
    p.add_argument("--decode-tokens", type=int, default=16, help="max new tokens for decode speed (default 16)")
    p.add_argument("--answer-questions", type=int, default=5, help="questions answered in text (default 5)")
    p.add_argument("--answer-tokens", type=int, default=24, help="max new tokens per answer (default 24)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared, oversubscribed CPU, OpenMP threads stall on\n"
                        "every small op; 0 keeps torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke test: first model, first corpus, 8 questions")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from OUT/build-query.json")
    args = p.parse_args(argv)
    out = Path(args.out)

    if args.report_only:
        data = json.loads((out / "build-query.json").read_text())
        write_reports(data, out)
        log(f"rewrote {out / 'build-query.md'} and {out / 'build-query.png'}")
        return 0

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    if args.quick:
        args.models, args.corpora, args.questions = args.models[:1], args.corpora[:1], 8
    reduced = {}
    for m in filter(None, (t.strip() for t in args.reduced_models.split(","))):
        if m in args.models and not args.quick:
            reduced[m] = {
                "corpora": [c.strip() for c in args.reduced_corpora.split(",") if c.strip() in args.corpora],
                "ratios": [float(r) for r in args.reduced_ratios.split(",") if r.strip()],
                "questions": args.reduced_questions,
            }

    load_start = os.getloadavg()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from kvcompile.models import load_model

    data = {
        "machine": machine_info(load_start),
        "config": {"models": args.models, "corpora": args.corpora, "ratios": args.ratios,
                   "questions": args.questions, "reduced": reduced, "quick": args.quick,
                   "prefill_runs": args.prefill_runs, "latency_questions": args.latency_questions,
                   "reprefill_questions": args.reprefill_questions, "decode_tokens": args.decode_tokens,
                   "answer_questions": args.answer_questions, "answer_tokens": args.answer_tokens,
                   "threads": torch.get_num_threads(), "recipe": "qa", "dtype": "float32", "device": "cpu"},
        "results": [],
    }
    log(f"kvcompile bench: models {args.models}, corpora {args.corpora}, ratios {args.ratios}, "
        f"load average {load_start[0]:.2f}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="kvcompile-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for model_name in args.models:
            t0 = time.perf_counter()
            lm = load_model(model_name, dtype="float32", device="cpu", progress=False)
            model_load = time.perf_counter() - t0
            log(f"loaded {model_name} in {model_load:.1f}s")
            plan = reduced.get(model_name, {"corpora": args.corpora, "ratios": args.ratios,
                                            "questions": args.questions})
            for corpus in plan["corpora"]:
                res = run_pair(model_name, lm, corpus, args, tmp, plan["questions"], plan["ratios"])
                res["model_load_seconds"] = model_load
                data["results"].append(res)
                data["total_seconds"] = time.perf_counter() - T_START
                data["machine"]["loadavg_end"] = list(os.getloadavg())
                write_reports(data, out)
            del lm
            gc.collect()
    data["total_seconds"] = time.perf_counter() - T_START
    data["machine"]["loadavg_end"] = list(os.getloadavg())
    write_reports(data, out)
    log(f"done in {data['total_seconds'] / 60:.1f} min: {out / 'build-query.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
