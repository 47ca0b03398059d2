"""Streaming compilation (issue 14): memory and time against corpus length, and what streaming costs.

``memory``: SQuAD v2 dev articles 0, 1, ... (every paragraph a document) until the corpus
reaches each size, compiled at ``--ratio`` with the default model (8k window: every size
streams). Each size runs in its own process, so that its peak resident set size
(``getrusage``) is its own; the report gives that, the heap the build added at its peak
(``kvcompile.memory.PeakMemory``), build seconds, the longest kept head against the
window, and the gold-answer NLL gain over no context on questions spread over the
corpus (the full context does not fit the window, so gain kept cannot be normalised),
with one generated answer.

``quality``: a union of SQuAD articles that fits a long-window model
(``qwen2.5-coder-0.5b``, 32k) compiled whole (``--no-stream``) and streamed
(``--stream``) at each ratio, and at ratio 1.0 as the full context (a ratio-1.0 pack
equals the full context exactly; loading it is cheaper than one prefill per question).
Gain kept pooled over the questions, and the paired difference streamed - whole.

``passes``: what a streamed build's first pass buys (``--stream-scorer``). One tuning corpus
compiled by a model whose window is cut to ``--window`` (so that it streams, with a room
well under the corpus) in three ways: the task-aware scorer on every chunk (the streamed
default), LagKV while streaming then the task-aware scorer over its survivors, and LagKV
alone; and whole at the model's own window, as the reference. Gain kept against the full
context (the uncut window; full and no-context NLLs from the benchmarks' answer cache),
paired differences, build seconds and the tokens each build prefilled.

    python bench/streaming.py memory --sizes 8000,30000,60000 --ratio 0.1
    python bench/streaming.py quality --articles 0,1,2,3 --ratios 0.25,0.1
    python bench/streaming.py passes --corpus squad:8 --window 2048 --ratios 0.25,0.1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import kvcompile  # noqa: E402
from kvcompile.builder import BuildOptions, tokenize  # noqa: E402
from kvcompile.corpus import read_corpus  # noqa: E402
from kvcompile.data.qa import EvalSet  # noqa: E402
from kvcompile.data.squad import squad_article, squad_articles  # noqa: E402
from kvcompile.data.synthetic import write_corpus  # noqa: E402
from kvcompile.evaluation import stats  # noqa: E402
from kvcompile.evaluation.methods import prefill_method  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.pipeline import build  # noqa: E402
from kvcompile.recipe import load_recipe  # noqa: E402

OUT = REPO / "docs" / "benchmarks" / "streaming"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def squad_union(articles: list[int], lm, tokens: int | None = None) -> EvalSet:
    """SQuAD articles' paragraphs in order, cut after the paragraph that reaches ``tokens``
    (with ``lm``'s tokenizer; None: all of them), and the questions on the paragraphs kept."""
    docs, questions, total = [], [], 0
    for index in articles:
        if tokens is not None and total >= tokens:
            break
        article = squad_article(index)
        for path, text in article.documents:
            if tokens is not None and total >= tokens:
                break
            docs.append((path, text))
            total += len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        kept = {p for p, _ in docs}
        questions += [q for q in article.questions if q.doc in kept]
    return EvalSet(f"squad:{','.join(map(str, articles))}", docs, questions)


def spread(questions: list, n: int) -> list:
    """``n`` questions evenly over the list (all of them if fewer)."""
    if len(questions) <= n:
        return list(questions)
    return [questions[round(i * (len(questions) - 1) / (n - 1))] for i in range(n)] if n > 1 else questions[:1]


# -- memory: one size per process -----------------------------------------------------------


def one_size(args) -> dict:
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu", progress=False)
    evalset = squad_union(list(range(len(squad_articles()))), lm, args.tokens)
    recipe = load_recipe("qa")
    with tempfile.TemporaryDirectory(prefix="stream-") as tmp:
        folder = Path(tmp) / "corpus"
        write_corpus(evalset, folder)
        (folder / "questions.jsonl").unlink()
        rss_loaded = _rss_now()
        t0 = time.perf_counter()
        report = build([folder], Path(tmp) / "p.kvpack", lm, recipe, BuildOptions(ratio=args.ratio))
        seconds = time.perf_counter() - t0
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        pack = kvcompile.load(Path(tmp) / "p.kvpack")
        session = pack.session(lm)
        documents, _ = read_corpus([folder])
        tk = tokenize(documents, recipe, lm)
        none = prefill_method(lm, tk.framing, tk.prefix_ids, "none", "none", 0.0)
        qas = spread(evalset.questions, args.questions)
        gains = [none.answer_nll(qa) - session.answer_nll(qa.question, qa.answers[0]) for qa in qas]
        sample = qas[0]
        answer = "".join(session.stream(sample.question, 24)).strip()
    mean, se = stats.mean_se(gains)
    return {"target_tokens": args.tokens, "tokens": report.cache_tokens, "documents": report.documents,
            "streamed": report.streamed, "ratio": args.ratio, "build_s": seconds,
            "seconds": report.seconds, "rss_after_load": rss_loaded, "peak_rss": peak_rss,
            "heap_added": report.peak_memory, "kept_tokens": report.kept_tokens,
            "longest_head": max(max(k) for k in pack.kept), "question_start": session.start,
            "window": lm.max_positions, "questions": len(qas), "nll_gain": mean, "nll_gain_se": se,
            "sample": {"question": sample.question, "gold": sample.answers[0], "answer": answer}}


def _cpu(threads: int) -> str:
    return f"CPU ({threads} torch thread{'s' if threads > 1 else ''})"


def _rss_now() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def memory(args) -> int:
    if args.report_only:  # the tables and plot again from memory.json
        write_memory(json.loads((OUT / "memory.json").read_text())["rows"], args)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        log(f"{size} tokens:")
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "one", "--tokens", str(size), "--ratio", str(args.ratio), "--model",
                   args.model, "--questions", str(args.questions), "--threads", str(args.threads), "--json", f.name]
            subprocess.run(cmd, check=True)
            rows.append(json.loads(Path(f.name).read_text()))
        r = rows[-1]
        log(f"  {r['tokens']} tokens in {r['build_s']:.0f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB, "
            f"gain {r['nll_gain']:.2f} nats")
        write_memory(rows, args)
    return 0


def write_memory(rows: list[dict], args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "device": _cpu(args.threads),
            "command": f"python bench/streaming.py memory --sizes {args.sizes} --ratio {args.ratio}"}
    (OUT / "memory.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    rows = sorted(rows, key=lambda r: r["tokens"])  # sizes may run in any order (the largest first, to see it)
    base = rows[0]
    mib = 2**20
    lines = ["# Streaming compilation: memory and time against corpus length (issue 14)", "",
             f"{meta['model']} (window {base['window']}), {meta['device']}, {meta['date']}; SQuAD v2 dev articles "
             f"0, 1, ... (a document per paragraph) cut at each size, ratio {args.ratio:g}, default options "
             "(every size is longer than the window, so every build streams). Each size in its own process. "
             f"Reproduce: `{meta['command']}`.", "",
             "| corpus tokens | documents | build s | s per 1k tokens | peak RSS | RSS x smallest | heap added "
             "by the build | longest head / window | NLL gain over no context (nats) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        heap = f"{r['heap_added'] / mib:.0f} MiB" if r["heap_added"] is not None else "–"
        lines.append(
            f"| {r['tokens']} | {r['documents']} | {r['build_s']:.0f} | {1000 * r['build_s'] / r['tokens']:.2f} | "
            f"{r['peak_rss'] / mib:.0f} MiB | {r['peak_rss'] / base['peak_rss']:.2f} | {heap} | "
            f"{r['longest_head']} / {r['window']} | {r['nll_gain']:.2f} ± {r['nll_gain_se']:.2f} "
            f"({r['questions']} q) |")
    lines += ["", "Answers (24 tokens at most, greedy):", ""]
    for r in rows:
        s = r["sample"]
        lines.append(f"- {r['tokens']} tokens: *{s['question']}* -> \"{s['answer']}\" (gold: \"{s['gold']}\")")
    lines += ["", "![memory and time against corpus length](memory.png)", ""]
    (OUT / "memory.md").write_text("\n".join(lines), encoding="utf-8")
    _plot(rows)


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["tokens"] / 1000 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [r["peak_rss"] / 2**20 for r in rows], "o-", label="peak RSS (process)")
    if all(r["heap_added"] is not None for r in rows):
        a.plot(x, [r["heap_added"] / 2**20 for r in rows], "s-", label="heap added by the build")
    a.set_xlabel("corpus tokens (k)")
    a.set_ylabel("MiB")
    a.set_ylim(bottom=0)
    a.legend()
    a.set_title("memory")
    b.plot(x, [r["build_s"] for r in rows], "o-")
    b.set_xlabel("corpus tokens (k)")
    b.set_ylabel("build seconds")
    b.set_ylim(bottom=0)
    b.set_title("build time")
    fig.tight_layout()
    fig.savefig(OUT / "memory.png", dpi=100)


# -- one compile forward: what the context costs ---------------------------------------------


def chunk_memory(args) -> int:
    """Heap added by one compile forward (a chunk after a context of N rows per head, every
    layer), with the cache's padded prefix copies kept for every layer or transient (one
    layer's at a time, as the compiler runs it), at each context length."""
    from kvcompile.attention import pack_attention
    from kvcompile.cache import PackCache, forward
    from kvcompile.memory import PeakMemory
    from kvcompile.ragged import RaggedKV

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu", progress=False)
    cap = lm.capability
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(lm.tokenizer), (1, args.chunk), generator=g)
    rows = []
    for n in (int(x) for x in args.contexts.split(",")):
        ctx = [RaggedKV.from_dense(torch.randn(cap.num_kv_heads, n, cap.head_dim, generator=g),
                                   torch.randn(cap.num_kv_heads, n, cap.head_dim, generator=g), torch.arange(n))
               for _ in range(cap.num_layers)]
        peaks = {}
        for transient in (False, True):
            with torch.no_grad(), pack_attention(lm.model), PeakMemory("cpu") as m:
                cache = PackCache(ctx, start=n, capacity=args.chunk, transient=transient)
                forward(lm.model, ids, cache, logits_to_keep=1)
                del cache
            peaks["transient" if transient else "kept"] = m.peak
        rows.append({"context": n, "chunk": args.chunk, **peaks})
        log(f"  context {n}: {peaks['kept'] / 2**20:.0f} MiB kept, {peaks['transient'] / 2**20:.0f} MiB transient")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "chunk-memory.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n")
    lines = ["| context rows per head | chunk | heap added, prefix copies kept | transient (one layer's) |",
             "|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['chunk']} | {r['kept'] / 2**20:.0f} MiB | {r['transient'] / 2**20:.0f} MiB |"
              for r in rows]
    (OUT / "chunk-memory.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


# -- quality: streamed against whole, on a union that fits -----------------------------------


def quality(args) -> int:
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu", progress=False)
    articles = [int(a) for a in args.articles.split(",")]
    evalset = squad_union(articles, lm)
    recipe = load_recipe("qa")
    ratios = [float(r) for r in args.ratios.split(",")]
    qas = spread(evalset.questions, args.questions)
    nll: dict[str, list[float]] = {}
    build_s = {}
    with tempfile.TemporaryDirectory(prefix="stream-q-") as tmp:
        folder = Path(tmp) / "corpus"
        write_corpus(evalset, folder)
        (folder / "questions.jsonl").unlink()
        documents, _ = read_corpus([folder])
        tk = tokenize(documents, recipe, lm)
        log(f"{evalset.name}: {tk.total} tokens, {len(documents)} documents, {len(qas)} questions")
        previous = _previous(args, evalset.name, [qa.id for qa in qas])
        nll.update(previous.get("nll", {}))
        build_s.update(previous.get("build_s", {}))
        if nll:
            log(f"  reusing {', '.join(nll)} from {OUT / 'quality.json'}")
        if "none" not in nll:
            none = prefill_method(lm, tk.framing, tk.prefix_ids, "none", "none", 0.0)
            nll["none"] = [none.answer_nll(qa) for qa in qas]
            del none
        variants = [("full", 1.0, False)] + [(f"{kind}@{r:g}", r, kind == "streamed")
                                              for r in ratios for kind in ("whole", "streamed")]
        for name, ratio, stream in variants:
            if name in nll:
                continue
            path = Path(tmp) / f"{name}.kvpack"
            t0 = time.perf_counter()
            build([folder], path, lm, recipe, BuildOptions(ratio=ratio, stream=stream))
            build_s[name] = time.perf_counter() - t0
            session = kvcompile.load(path).session(lm)
            nll[name] = [session.answer_nll(qa.question, qa.answers[0]) for qa in qas]
            log(f"  {name}: built in {build_s[name]:.0f} s, mean NLL {sum(nll[name]) / len(qas):.3f}")
            del session
            write_quality(evalset.name, tk.total, len(documents), qas, nll, build_s, ratios, args)
    return 0


def _previous(args, corpus: str, ids: list) -> dict:
    """An earlier run's quality.json on the same model, corpus and questions (its NLLs are reused:
    the full pack alone is hours on 2 cores), else {}."""
    path = OUT / "quality.json"
    if args.fresh or not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data if (data.get("model"), data.get("corpus"), data.get("ids")) == (args.model, corpus, ids) else {}


def _write_json(stem: str, args, meta: dict, data: dict, qas) -> dict:
    """``OUT/<stem>.json``: ``meta`` with the date and device, ``data``, and the question ids.
    Returns the full ``meta``."""
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, **meta, "questions": len(qas), "date": time.strftime("%Y-%m-%d"),
            "device": _cpu(args.threads)}
    (OUT / f"{stem}.json").write_text(json.dumps({**meta, **data, "ids": [qa.id for qa in qas]}, indent=1) + "\n",
                                      encoding="utf-8")
    return meta


def write_quality(name, tokens, documents, qas, nll, build_s, ratios, args) -> None:
    meta = _write_json("quality", args, {
        "corpus": name, "tokens": tokens, "documents": documents,
        "command": f"python bench/streaming.py quality --articles {args.articles} --ratios {args.ratios} "
                   f"--questions {args.questions}"}, {"build_s": build_s, "nll": nll}, qas)
    lines = ["# Streamed against whole compilation (issue 14)", "",
             f"{meta['model']}, {meta['device']}, {meta['date']}; SQuAD v2 dev articles {args.articles} as one "
             f"corpus ({tokens} tokens, {documents} documents), {len(qas)} questions spread over it. `full` is the "
             "pack at ratio 1.0 (equal to the full context); `whole` compiles at the corpus's own positions, "
             "`streamed` (`--stream`) at compacted ones, each chunk after the compacted kept tokens; both are "
             "queried at compacted positions (the default). Gain kept: the share of the full context's "
             "gold-answer NLL gain over no context, per question linearised and pooled, ± standard error; "
             f"the paired column is streamed - whole. Reproduce: `{meta['command']}`.", "",
             "| ratio | whole: gain kept | streamed: gain kept | streamed - whole (paired) "
             "| build s whole / streamed |",
             "|---|---|---|---|---|"]
    if "full" in nll:
        for r in ratios:
            w, s = nll.get(f"whole@{r:g}"), nll.get(f"streamed@{r:g}")
            if w is None or s is None:
                continue
            gw, gs = (stats.gain_estimate(nll["none"], nll["full"], x) for x in (w, s))
            d = stats.paired(nll["none"], nll["full"], s, w)
            lines.append(f"| {r:g} | {gw.format()} | {gs.format()} | {d.format(signed=True, digits=3)} | "
                         f"{build_s[f'whole@{r:g}']:.0f} / {build_s[f'streamed@{r:g}']:.0f} |")
    (OUT / "quality.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- passes: the stream scorer's first pass against the task-aware stream ---------------------

PASSES = {  # name: BuildOptions overrides, and whether the build runs in the cut window
    "whole": ({}, False),
    "streamed": ({"stream": True, "stream_scorer": "none"}, True),  # the task-aware scorer on every chunk
    "lagkv>task_aware": ({"stream": True}, True),  # the streamed default: --stream-scorer lagkv
    # the final selection with a chained build's pool (documents competing, or each its share)
    "lagkv>task_aware[pool41]": ({"stream": True, "scorer_params": {"pool": 41}}, True),
    "lagkv>task_aware[pool41,document]": ({"stream": True, "scorer_params": {"pool": 41}, "budgets": "document"},
                                          True),
    "lagkv": ({"stream": True, "scorer": "lagkv"}, True),
}


def passes(args) -> int:
    from functools import partial

    from peers import corpus_of  # the peers benchmark's corpus and questions, so its cached answers match

    from kvcompile.builder import _Compiler
    from kvcompile.evaluation import answercache

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu", progress=False)
    recipe = load_recipe("qa")
    ratios = [float(r) for r in args.ratios.split(",")]
    prefilled = []  # tokens per forward of the build running
    real_prefill = _Compiler.prefill
    _Compiler.prefill = lambda self, ids, cache: (prefilled.append(ids.numel()), real_prefill(self, ids, cache))[1]
    with tempfile.TemporaryDirectory(prefix="stream-p-") as tmp:
        evalset, folder, qas, tk = corpus_of(args.corpus, args.questions, Path(tmp), lm, recipe)
        log(f"{args.corpus}: {tk.total} tokens, {len(tk.doc_ids)} documents, {len(qas)} questions; "
            f"window cut to {args.window} for the streamed builds")
        cached = partial(answercache.cached, folder=answercache.default_folder(), lm=lm, framing=tk.framing)
        context = tk.stream()
        nll = {kind: [m.answer_nll(qa) for qa in qas] for kind, m in (
            ("full", cached(partial(prefill_method, lm, tk.framing, context, "full", "full", 1.0), kind="full",
                            context_ids=context)()),
            ("none", cached(partial(prefill_method, lm, tk.framing, tk.prefix_ids, "none", "none", 0.0),
                            kind="none", context_ids=tk.prefix_ids)()))}
        window, builds = lm.max_positions, {}
        for r in ratios:
            for name, (overrides, cut) in PASSES.items():
                if args.methods and name not in args.methods.split(","):
                    continue
                label = f"{name}@{r:g}"
                path = Path(tmp) / f"{name}-{r:g}.kvpack"
                lm.max_positions = args.window if cut else window
                prefilled.clear()
                t0 = time.perf_counter()
                report = build([folder], path, lm, recipe, BuildOptions(ratio=r, **overrides))
                seconds = time.perf_counter() - t0
                lm.max_positions = window
                session = kvcompile.load(path).session(lm)
                nll[label] = [session.answer_nll(qa.question, qa.answers[0]) for qa in qas]
                builds[label] = {"seconds": seconds, "forwards": len(prefilled), "tokens": sum(prefilled),
                                 "streamed": report.streamed, "kept": report.kept_tokens / report.full_tokens}
                log(f"  {label}: {seconds:.0f} s, {len(prefilled)} forwards of {sum(prefilled)} tokens, "
                    f"gain kept {stats.gain_estimate(nll['none'], nll['full'], nll[label]).format()}")
                del session
                write_passes(args, evalset.name, tk, qas, nll, builds, ratios)
    return 0


def write_passes(args, name, tk, qas, nll, builds, ratios) -> None:
    """Add this corpus to ``passes.json`` (runs of other corpora with the same model, window and
    ratios stay; one of the same corpus is replaced) and write ``passes.md`` from all of them."""
    path = OUT / "passes.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    same = {k: runs.get(k) for k in ("model", "window", "ratios")} == {
        "model": args.model, "window": args.window, "ratios": args.ratios}
    corpora = runs.get("corpora", {}) if same else {}
    ids = [qa.id for qa in qas]
    old = corpora.get(args.corpus)
    if old is not None and old["ids"] == ids:  # a run of some methods adds to (or replaces) the earlier run's
        nll, builds = {**old["nll"], **nll}, {**old["builds"], **builds}
    corpora[args.corpus] = {"name": name, "tokens": tk.total, "documents": len(tk.doc_ids), "builds": builds,
                            "nll": nll, "ids": ids}
    meta = {"model": args.model, "window": args.window, "ratios": args.ratios, "date": time.strftime("%Y-%m-%d"),
            "device": _cpu(args.threads),
            "command": " + ".join(f"python bench/streaming.py passes --corpus {c} --window {args.window} --ratios "
                                  f"{args.ratios} --questions {len(run['ids'])}" for c, run in corpora.items())}
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "corpora": corpora}, indent=1) + "\n", encoding="utf-8")

    def z(run, label):  # per-question linearised gain kept (stats.linearised_gain)
        return stats.linearised_gain(run["nll"]["none"], run["nll"]["full"], run["nll"][label])

    n_q = sum(len(run["ids"]) for run in corpora.values())
    sizes = ", ".join(f"{c}: {run['tokens']} tokens, {run['documents']} documents" for c, run in corpora.items())
    lines = ["# A first pass while streaming: LagKV, then the task prompt (issue 14)", "",
             f"{args.model}, {meta['device']}, {meta['date']}; {len(corpora)} corpora "
             f"({sizes}), "
             f"{n_q} questions. The streamed builds ran with the model's window cut to {args.window} positions (so "
             "every chunk is compiled after a compacted context the window bounds, a room of about a third of "
             "these corpora); `whole` at the model's own window. `streamed`: the task-aware scorer on every chunk "
             "alone (`--stream-scorer none`, the streamed default before); `lagkv>task_aware`: the streamed default "
             "now (LagKV compresses the stream to the room, then one forward of the task prompt selects the budget "
             "among its survivors, documents competing, with a whole build's pool of 5); `[pool41]`: that "
             "selection with a chained build's pool of 41; `[document]`: each document keeps its share; `lagkv`: "
             "LagKV alone. Every pack is queried "
             "compacted, with the uncut window. Gain kept: the share of the full context's gold-answer NLL gain "
             "over no context, ± standard error (delta method, pooled over corpora, each corpus normalised by its "
             "own full-context gain); paired columns: per-question difference ± standard error. Build seconds and "
             "tokens prefilled: summed over corpora, measured side by side on a shared 2-core machine. "
             f"Reproduce: `{meta['command']}`.", "",
             "| ratio | method | questions | gain kept | minus streamed (paired) | minus whole (paired) "
             "| minus lagkv (paired) | build s | tokens prefilled |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        for method in PASSES:
            label = f"{method}@{r:g}"
            runs_here = [run for run in corpora.values() if label in run["nll"]]
            if not runs_here:
                continue
            g = stats.pooled(z(run, label) for run in runs_here)
            cells = []
            for other in ("streamed", "whole", "lagkv"):
                ref = f"{other}@{r:g}"
                both = [run for run in runs_here if ref in run["nll"]]
                cells.append("–" if other == method or not both else stats.pooled(
                    [a - b for a, b in zip(z(run, label), z(run, ref))] for run in both).format(signed=True))
            seconds = sum(run["builds"][label]["seconds"] for run in runs_here)
            tokens = sum(run["builds"][label]["tokens"] for run in runs_here)
            lines.append(f"| {r:g} | {method} | {g.questions} | {g.format()} | {' | '.join(cells)} | {seconds:.0f} | "
                         f"{tokens} |")
    (OUT / "passes.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--sizes", default="8000,30000,60000")
    m.add_argument("--ratio", type=float, default=0.1)
    m.add_argument("--model", default="default")
    m.add_argument("--questions", type=int, default=30)
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--report-only", action="store_true", help="Write memory.md and memory.png from memory.json.")
    o = sub.add_parser("one")
    o.add_argument("--tokens", type=int, required=True)
    o.add_argument("--ratio", type=float, required=True)
    o.add_argument("--model", required=True)
    o.add_argument("--questions", type=int, default=30)
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--json", type=Path, required=True)
    c = sub.add_parser("chunk")
    c.add_argument("--contexts", default="900,3400,7000")
    c.add_argument("--chunk", type=int, default=2048)
    c.add_argument("--model", default="default")
    c.add_argument("--threads", type=int, default=1)
    q = sub.add_parser("quality")
    q.add_argument("--articles", default="0,1,2,3")
    q.add_argument("--ratios", default="0.25,0.1")
    q.add_argument("--model", default="qwen2.5-coder-0.5b")
    q.add_argument("--questions", type=int, default=40)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--fresh", action="store_true", help="Measure every variant again (default: reuse quality.json's).")
    p = sub.add_parser("passes")
    p.add_argument("--corpus", default="squad:8")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--ratios", default="0.25,0.1")
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--questions", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="", help="only these (comma-separated names); added to an earlier run")
    args = ap.parse_args(argv)
    if args.cmd == "one":
        args.json.write_text(json.dumps(one_size(args)), encoding="utf-8")
        return 0
    return {"memory": memory, "chunk": chunk_memory, "quality": quality, "passes": passes}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
