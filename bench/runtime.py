#!/usr/bin/env python
"""CPU proxies of kvcompile's runtime: aten op counts and wall times, against a baseline revision.

``make bench-runtime`` (and ``make bench``) runs ``bench/runtime.py --out docs/benchmarks/runtime``.
On a tiny random Llama (4 layers, hidden 512, 16 query / 8 KV heads, head_dim 64, saved with
``save_pretrained`` and loaded with ``kvcompile.models.load_model(path, device="cpu")``) and
a ~2k-token SQuAD corpus, with 1 torch thread:

1. **ops per decode step**: one token's forward after the question, over a pack's cache
   (``session.cache()``, kvcompile's attention) vs over a transformers ``DynamicCache``
   holding the full context (plain ``model(...)``, ``sdpa``). Target: pack <= 1.2x dense.
2. **ops of a build** (``kvcompile.pipeline.build``, recipe ``qa``, ratio 0.25, chunk size
   512) vs a bare prefill of the same token stream (one ``sdpa`` forward, no cache).
   Target: <= 3x.
3. **wall times**: decode tokens/s from the pack (a greedy loop over ``session.cache()``,
   EOS ignored) and build seconds, for this working tree and a baseline revision (a
   ``git worktree`` of ``--baseline``, default ``git merge-base HEAD origin/main``, else
   105509b), each measured in its own subprocess with ``PYTHONPATH`` at that tree,
   interleaved A, B, A, B, ... (``--repeats`` each, median). Target: no regression > 10%.

An *op* is one ``aten::`` event in ``torch.profiler.profile(activities=[CPU]).events()``:
every ATen operator call the dispatcher records, nested calls included (an ``aten::linear``
that calls ``aten::t`` and ``aten::addmm`` counts 3). The top-level count (aten events with
no aten ancestor) is reported beside it.

Writes ``runtime.json`` (raw numbers, machine, commands) and ``runtime.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = "105509b"
QUESTION = "In what country is Normandy located?"
MODEL_SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=64)
T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


# ============================================================================= worker side
# Runs in a subprocess whose PYTHONPATH puts the tree under test first. It must work with
# kvcompile 0.1.0 (the baseline) and with the rewritten internals, so it uses the public API
# and feature-detects the rest.


@contextlib.contextmanager
def _pack_attention(model):
    from kvcompile import attention

    if hasattr(attention, "pack_attention"):
        with attention.pack_attention(model):
            yield
        return
    previous = model.config._attn_implementation
    attention.use_pack_attention(model)
    try:
        yield
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


def _forward(model, x, cache):
    import torch

    if not isinstance(x, torch.Tensor):
        x = torch.tensor([x], dtype=torch.long)
    if cache is None:
        return model(x, use_cache=False, logits_to_keep=1).logits
    try:
        from kvcompile.cache import forward
    except ImportError:
        return model(x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return forward(model, x, cache, logits_to_keep=1).logits


def _sdpa(model) -> None:
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")


def _pack_cache(session, room: int):
    try:
        return session.cache(capacity=room)
    except TypeError:  # kvcompile 0.1.0
        return session.cache()


def _count(prof) -> dict:
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = 0
    for e in events:
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        top += parent is None
    by_name = Counter(e.name for e in events)
    # every forward pass of the model embeds its input ids once
    return {"aten_ops": len(events), "top_level_aten_ops": top, "forward_passes": by_name.get("aten::embedding", 0),
            "by_name": dict(by_name.most_common(12))}


def _profile(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return _count(prof)


def _stream_ids(lm, recipe, corpus: str) -> tuple[list[int], object]:
    """The token stream a pack of ``corpus`` holds, and the framing."""
    from kvcompile.corpus import read_corpus

    docs, _ = read_corpus([corpus])
    try:
        from kvcompile.builder import tokenize

        tk = tokenize(docs, recipe, lm)
        return list(tk.stream()), tk.framing
    except Exception:
        from kvcompile.framing import document_text, frame

        framing = frame(lm.tokenizer)
        ids = list(framing.prefix_ids)
        for d in docs:
            ids += lm.tokenizer(document_text(d.path, d.text), add_special_tokens=False)["input_ids"]
        return ids, framing


def _build(lm, recipe, corpus: str, out: Path) -> float:
    from kvcompile.builder import BuildOptions
    from kvcompile.pipeline import build

    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    build([corpus], out, lm, recipe, BuildOptions(ratio=0.25, chunk_size=512))
    return time.perf_counter() - t0


def _session(lm, path: Path):
    import kvcompile

    return kvcompile.load(path).session(lm)


def _decode(lm, session, n: int) -> float:
    """Seconds for ``n`` greedy steps over the pack after the question (EOS ignored)."""
    model = lm.model
    ids = session.question_ids(QUESTION)
    with _pack_attention(model):
        cache = _pack_cache(session, len(ids) + n + 1)
        nxt = int(_forward(model, ids, cache)[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(n):
            nxt = int(_forward(model, [nxt], cache)[0, -1].argmax())
        return time.perf_counter() - t0


def worker(mode: str, model_dir: str, corpus: str, out_json: str, tmp: str, decode_tokens: int) -> None:
    import torch

    torch.set_num_threads(1)
    import kvcompile
    from kvcompile.models import load_model
    from kvcompile.recipe import load_recipe

    tmp_dir = Path(tmp)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    lm = load_model(model_dir, device="cpu", progress=False)
    lm.model.requires_grad_(False)
    recipe = load_recipe("qa")
    res: dict = {"kvcompile_path": str(Path(kvcompile.__file__).parent), "torch_threads": torch.get_num_threads()}
    pack_path = tmp_dir / "runtime.kvpack"
    with torch.no_grad():
        if mode == "ops":
            stream, framing = _stream_ids(lm, recipe, corpus)
            q_ids = framing.question_ids(lm.tokenizer, QUESTION)
            res["stream_tokens"] = len(stream)
            # 1. a decode step over the dense full context (plain transformers, sdpa)
            _sdpa(lm.model)
            from transformers import DynamicCache

            dense = DynamicCache()
            nxt = int(_forward(lm.model, stream + q_ids, dense)[0, -1].argmax())
            for _ in range(2):  # warm
                nxt = int(_forward(lm.model, [nxt], dense)[0, -1].argmax())
            res["dense_step"] = _profile(lambda: _forward(lm.model, [nxt], dense))
            del dense
            # 2. bare prefill
            _forward(lm.model, stream[:64], None)
            res["bare_prefill"] = _profile(lambda: _forward(lm.model, stream, None))
            # 3. build (after an unprofiled warm build), and a decode step over its pack
            _build(lm, recipe, corpus, pack_path)
            res["build"] = _profile(lambda: _build(lm, recipe, corpus, pack_path))
            import kvcompile.builder as builder

            if hasattr(builder, "SCORE_CALL_BYTES"):  # the ops a GPU would launch: its scorer grouping
                cpu_bytes = builder.SCORE_CALL_BYTES["cpu"]
                builder.SCORE_CALL_BYTES["cpu"] = builder.SCORE_CALL_BYTES["cuda"]
                try:
                    res["build_gpu_policy"] = _profile(lambda: _build(lm, recipe, corpus, pack_path))
                finally:
                    builder.SCORE_CALL_BYTES["cpu"] = cpu_bytes
            session = _session(lm, pack_path)
            ids = session.question_ids(QUESTION)
            with _pack_attention(lm.model):
                cache = _pack_cache(session, len(ids) + 8)
                nxt = int(_forward(lm.model, ids, cache)[0, -1].argmax())
                for _ in range(2):  # warm
                    nxt = int(_forward(lm.model, [nxt], cache)[0, -1].argmax())
                res["pack_step"] = _profile(lambda: _forward(lm.model, [nxt], cache))
                res["pack_prefix_tokens"] = _prefix_tokens(cache)
        else:  # wall
            _build(lm, recipe, corpus, pack_path)  # warm-up
            res["build_s"] = _build(lm, recipe, corpus, pack_path)
            session = _session(lm, pack_path)
            _decode(lm, session, 4)  # warm-up
            dt = _decode(lm, session, decode_tokens)
            res.update(decode_s=dt, decode_tokens=decode_tokens, decode_tok_s=decode_tokens / dt)
    pack_path.unlink(missing_ok=True)
    Path(out_json).write_text(json.dumps(res, indent=1))


def _prefix_tokens(cache) -> int | None:
    try:
        return int(cache.prefix_tokens())
    except Exception:
        return None


# ============================================================================= parent side


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def subject(rev: str, limit: int = 70) -> str:
    text = git("log", "-1", "--format=%s", rev)
    return text if len(text) <= limit else text[: limit - 3].rsplit(" ", 1)[0] + "..."


def resolve_baseline(rev: str | None) -> str:
    candidates = [rev] if rev else []
    if not rev:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            candidates.append(git("merge-base", "HEAD", "origin/main"))
        candidates += [DEFAULT_BASELINE, "HEAD"]
    for c in candidates:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            return git("rev-parse", "--verify", f"{c}^{{commit}}")
    raise SystemExit(f"baseline revision {rev!r} not found")


def make_model(path: Path) -> Path:
    """The tiny random Llama with kvcompile's default tokenizer, written with save_pretrained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from kvcompile.models import load_model

        tok = load_model(device="cpu", progress=False).tokenizer
    except Exception:
        from kvcompile.models import _tokenizer_for

        tok = _tokenizer_for(None)
    if not tok.chat_template:
        from kvcompile.models import _CHATML_TEMPLATE

        tok.chat_template = _CHATML_TEMPLATE
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **MODEL_SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_corpus(folder: Path, tokens: int = 2000, docs: int = 3) -> str:
    """About ``tokens`` tokens (whitespace words x 1.3) of SQuAD paragraphs in ``docs`` files."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from kvcompile.data.squad import squad_article

        paragraphs = [" ".join(t.split()) for _, t in squad_article("Normans").documents]
        source = "SQuAD v2 dev, article Normans"
    except Exception:
        paragraphs = [p.read_text() for p in sorted((REPO / "docs" / "example-corpus").rglob("*.md"))]
        source = "docs/example-corpus"
    chosen, n = [], 0
    for p in paragraphs:
        if n >= tokens:
            break
        chosen.append(p)
        n += round(len(p.split()) * 1.3)
    per = -(-len(chosen) // docs)
    for d in range(docs):
        part = chosen[d * per:(d + 1) * per]
        if part:
            (folder / f"doc-{d}.txt").write_text("\n\n".join(part) + "\n", encoding="utf-8")
    return f"{source}: {len(chosen)} paragraphs in {docs} documents"


def run_worker(tree: Path, mode: str, model_dir: Path, corpus: Path, tmp: Path, decode_tokens: int,
               label: str) -> dict:
    out = tmp / f"{label}-{mode}-{time.monotonic_ns()}.json"
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--model-dir", str(model_dir),
           "--corpus", str(corpus), "--result", str(out), "--tmp", str(tmp / f"w-{label}"),
           "--decode-tokens", str(decode_tokens)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
    if p.returncode != 0 or not out.exists():
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        return {"error": f"worker exited {p.returncode}", "stderr_tail": tail}
    res = json.loads(out.read_text())
    res["process_s"] = time.perf_counter() - t0
    return res


def machine_info() -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def ratio(a, b):
    return a / b if a is not None and b else None


def check(value, ok, goal) -> dict:
    return {"value": value, "goal": goal, "result": "n/a" if ok is None else ("PASS" if ok else "FAIL")}


def compute_targets(data: dict) -> dict:
    cur = data["ops"].get("current", {})
    t = {}
    if "error" not in cur:
        r1 = ratio(cur["pack_step"]["aten_ops"], cur["dense_step"]["aten_ops"])
        r2 = ratio(cur["build"]["aten_ops"], cur["bare_prefill"]["aten_ops"])
        t["decode_step_ops"] = check(r1, None if r1 is None else r1 <= 1.2, "pack step ops / dense step ops <= 1.2")
        t["build_ops"] = check(r2, None if r2 is None else r2 <= 3, "build ops / bare prefill ops <= 3")
    w = data["wall"]
    dc, db = w["current"].get("decode_tok_s"), w["baseline"].get("decode_tok_s")
    bc, bb = w["current"].get("build_s"), w["baseline"].get("build_s")
    r3, r4 = ratio(dc, db), ratio(bc, bb)
    t["decode_wall"] = check(r3, None if r3 is None else r3 >= 0.9, "decode tok/s current / baseline >= 0.9")
    t["build_wall"] = check(r4, None if r4 is None else r4 <= 1.1, "build s current / baseline <= 1.1")
    return t


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(data: dict) -> str:
    m, c = data["machine"], data["config"]
    lines = [
        "# Runtime proxies on CPU: op counts and wall times",
        "",
        "Generated by `bench/runtime.py` (`make bench-runtime`, also part of `make bench`); raw numbers in "
        "[runtime.json](runtime.json).",
        "",
        f"**Machine**: {m['processor']}, {m['cpu_count']} cores, {m['platform']}; Python {m['python']}, torch "
        f"{m['torch']}, transformers {m['transformers']}; 1 torch thread; {m['date']}"
        + (f"; load average {', '.join(f'{x:.2f}' for x in m['loadavg_start'])} at the start"
           if m.get("loadavg_start") else "") + ". Wall times on a shared machine are noisy: runs are "
        "interleaved so that noise hits both trees.",
        "",
        f"**Trees**: *current* = {c['current']}; *baseline* = {c['baseline']}.",
        "",
        f"**Model**: random Llama ({', '.join(f'{k}={v}' for k, v in MODEL_SHAPE.items())}, vocabulary "
        f"{c.get('vocab_size')}, float32), `save_pretrained` then `load_model(path, device=\"cpu\")`. "
        f"**Corpus**: {c['corpus']}; stream {data['ops'].get('current', {}).get('stream_tokens', '?')} tokens. "
        "**Build**: recipe `qa`, ratio 0.25, chunk size 512.",
        "",
        "**Op** = one `aten::` event in `torch.profiler.profile(activities=[ProfilerActivity.CPU]).events()`: every "
        "ATen operator call the dispatcher records, nested calls included (`aten::linear` calling `aten::t` and "
        "`aten::addmm` counts 3). *Top-level* counts only aten events with no aten ancestor (the calls made from "
        "Python).",
        "",
        "## Targets",
        "",
        "| target | value | result |",
        "|---|---|---|",
    ]
    labels = {"decode_step_ops": "ops per decode step, pack vs dense `DynamicCache`",
              "build_ops": "ops of a build vs a bare prefill",
              "decode_wall": "CPU decode tokens/s from the pack, current vs baseline",
              "build_wall": "CPU build time, current vs baseline"}
    for name, r in data["targets"].items():
        lines.append(f"| {labels[name]} | {fmt(r['value'], 3)} ({r['goal']}) | **{r['result']}** |")
    lines += ["", "## Op counts", "",
              "| tree | dense decode step | pack decode step | pack / dense | bare prefill | build | build / prefill |",
              "|---|---|---|---|---|---|---|"]
    for tree in ("current", "baseline"):
        o = data["ops"].get(tree)
        if not o:
            continue
        if "error" in o:
            lines.append(f"| {tree} | error: {o['error']} ||||||")
            continue

        def cell(key, o=o):
            return f"{o[key]['aten_ops']} ({o[key]['top_level_aten_ops']} top-level)"

        step_ratio = ratio(o["pack_step"]["aten_ops"], o["dense_step"]["aten_ops"])
        build_ratio = ratio(o["build"]["aten_ops"], o["bare_prefill"]["aten_ops"])
        lines.append(f"| {tree} | {cell('dense_step')} | {cell('pack_step')} | {fmt(step_ratio)} | "
                     f"{cell('bare_prefill')} | {cell('build')} | {fmt(build_ratio)} |")
    cur = data["ops"].get("current", {})
    if "build" in cur and cur["build"].get("forward_passes"):
        f = cur["build"]["forward_passes"]
        per = cur["build"]["aten_ops"] / f
        lines += ["", f"The build (current) runs {f} forward passes (`aten::embedding` events: the framing, then one "
                  f"per chunk of each document), so even with free scoring and selection its op count would be at "
                  f"least {f}x a bare prefill's (each pass costs about the same ops whatever its length): it "
                  f"spends {per:.0f} ops per pass, {per / cur['bare_prefill']['aten_ops']:.2f}x a prefill's "
                  f"{cur['bare_prefill']['aten_ops']}."]
    if "build_gpu_policy" in cur:
        g = cur["build_gpu_policy"]["aten_ops"]
        lines += ["", f"On CPU the scorer runs a few heads per call, so that its attention matrix stays in cache "
                  f"(`kvcompile.builder.SCORE_CALL_BYTES`); a GPU scores every layer in one call. The same build "
                  f"with the GPU's grouping issues {g} aten ops ({g / cur['bare_prefill']['aten_ops']:.2f}x the "
                  f"bare prefill, {g / cur['build']['forward_passes']:.0f} per forward pass, "
                  f"{g / cur['build']['forward_passes'] / cur['bare_prefill']['aten_ops']:.2f}x a prefill's): "
                  "the count that stands for a GPU's launches."]
    if "pack_step" in cur:
        lines += ["", "Most frequent ops in one pack decode step (current): "
                  + ", ".join(f"`{k}` {v}" for k, v in cur["pack_step"]["by_name"].items()) + ".",
                  "", "Most frequent ops in one dense decode step (current): "
                  + ", ".join(f"`{k}` {v}" for k, v in cur["dense_step"]["by_name"].items()) + ".",
                  "", "Most frequent ops in the build (current): "
                  + ", ".join(f"`{k}` {v}" for k, v in cur["build"]["by_name"].items()) + "."]
    w = data["wall"]
    lines += ["", "## Wall times (median of the interleaved runs)", "",
              "| tree | decode tokens/s from the pack | build s | runs |", "|---|---|---|---|"]
    for tree in ("current", "baseline"):
        s = w[tree]
        runs = ", ".join(f"{r.get('decode_tok_s', 0):.1f} tok/s / {r.get('build_s', 0):.2f} s" if "error" not in r
                         else f"error ({r['error']})" for r in w["runs"][tree])
        lines.append(f"| {tree} | {fmt(s.get('decode_tok_s'), 1)} | {fmt(s.get('build_s'))} | {runs} |")
    errors = [(tree, r) for tree in ("current", "baseline") for r in w["runs"][tree] if "error" in r]
    errors += [(tree, o) for tree, o in data["ops"].items() if "error" in o]
    if errors:
        lines += ["", "## Errors", ""]
        for tree, r in errors:
            lines += [f"- {tree}: {r['error']}", "", "```", r.get("stderr_tail", ""), "```"]
    lines += ["", "## How to reproduce", "", "```", *data["commands"], "```", "",
              f"Total run time {fmt(data.get('total_seconds', 0) / 60, 1)} min.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "runtime")
    ap.add_argument("--baseline", default=None, help="git revision to compare with (default: merge-base with "
                    f"origin/main, else {DEFAULT_BASELINE})")
    ap.add_argument("--repeats", type=int, default=3, help="wall-time runs per tree, interleaved")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--no-baseline", action="store_true", help="measure the current tree only")
    # worker mode (internal)
    ap.add_argument("--worker", choices=["ops", "wall"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        worker(args.worker, args.model_dir, args.corpus, args.result, args.tmp, args.decode_tokens)
        return 0

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    base_rev = None if args.no_baseline else resolve_baseline(args.baseline)
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    current_label = f"this working tree (HEAD {head[:10]}{' + uncommitted changes' if dirty else ''})"
    data = {"command": ["bench/runtime.py", *(argv if argv is not None else sys.argv[1:])],
            "machine": machine_info(),
            "config": {"current": current_label, "current_commit": head, "current_dirty": dirty,
                       "baseline": f"commit {base_rev[:10]} ({subject(base_rev)})" if base_rev else
                       "none (--no-baseline)", "baseline_commit": base_rev,
                       "model_shape": MODEL_SHAPE, "repeats": args.repeats, "decode_tokens": args.decode_tokens,
                       "build": {"recipe": "qa", "ratio": 0.25, "chunk_size": 512}},
            "ops": {}, "wall": {"runs": {"current": [], "baseline": []}, "current": {}, "baseline": {}},
            "commands": ["make bench-runtime",
                         "# or: .venv/bin/python bench/runtime.py --out docs/benchmarks/runtime [--baseline REV] "
                         "[--repeats 3]"]}
    tmp = Path(tempfile.mkdtemp(prefix="kvcompile-runtime-"))
    worktree = None
    try:
        log("making the tiny model and the corpus")
        model_dir = make_model(tmp / "model")
        data["config"]["vocab_size"] = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        corpus = tmp / "corpus"
        data["config"]["corpus"] = make_corpus(corpus)
        trees = {"current": REPO}
        if base_rev:
            worktree = tmp / "baseline"
            git("worktree", "add", "--detach", str(worktree), base_rev)
            trees["baseline"] = worktree
            log(f"baseline {base_rev[:10]} checked out in {worktree}")
        for label, tree in trees.items():
            log(f"op counts: {label}")
            data["ops"][label] = run_worker(tree, "ops", model_dir, corpus, tmp, args.decode_tokens, label)
            if "error" in data["ops"][label]:
                log(f"  {label} FAILED: {data['ops'][label]['error']}\n{data['ops'][label]['stderr_tail']}")
            else:
                o = data["ops"][label]
                log(f"  dense step {o['dense_step']['aten_ops']}, pack step {o['pack_step']['aten_ops']}, "
                    f"bare prefill {o['bare_prefill']['aten_ops']}, build {o['build']['aten_ops']} aten ops")
        for i in range(args.repeats):
            for label, tree in trees.items():
                r = run_worker(tree, "wall", model_dir, corpus, tmp, args.decode_tokens, label)
                data["wall"]["runs"][label].append(r)
                if "error" in r:
                    log(f"wall {label} run {i + 1}: FAILED: {r['error']}\n{r['stderr_tail']}")
                else:
                    log(f"wall {label} run {i + 1}: decode {r['decode_tok_s']:.1f} tok/s, build {r['build_s']:.2f}s")
        for label in ("current", "baseline"):
            ok = [r for r in data["wall"]["runs"][label] if "error" not in r]
            if ok:
                data["wall"][label] = {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in ok),
                                       "build_s": statistics.median(r["build_s"] for r in ok), "runs": len(ok)}
    finally:
        if worktree is not None:
            with contextlib.suppress(subprocess.CalledProcessError):
                git("worktree", "remove", "--force", str(worktree))
        shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):
        data["machine"]["loadavg_end"] = list(os.getloadavg())
    data["targets"] = compute_targets(data)
    data["total_seconds"] = time.perf_counter() - T_START
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "runtime.md").write_text(markdown(data))
    log("targets: " + ", ".join(f"{k} {v['result']} ({fmt(v['value'], 3)})" for k, v in data["targets"].items()))
    log(f"wrote {args.out / 'runtime.md'} and runtime.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
