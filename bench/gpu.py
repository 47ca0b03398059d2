#!/usr/bin/env python
"""GPU benchmark (issue 9): a randomly initialised Llama-3.1-8B-shaped model on real text.

``make bench-gpu`` (on a CUDA machine) or ``bench/gpu.sh`` (on the offline device
machine; see bench/README-gpu.md) runs::

    bench/gpu.py --tokenizer .device/tokenizer --text .device/squad.txt --out docs/benchmarks/gpu

Protocol, per corpus size (default 32k then 100k tokens), one after another in one
process, each timed region between ``torch.cuda.synchronize()`` calls, after a warm-up
(a small forward, a small build, a question and a few decode steps):

1. **bare prefill**: one plain transformers forward (``sdpa``, no cache, ``logits_to_keep=1``)
   of the pack's token stream (framing prefix + corpus); median of ``--repeats``;
2. **full-context TTFT**: prefill of framing + corpus + question into a ``DynamicCache``
   (``sdpa``) and the first token's argmax; then **decode full**: ``--decode-tokens``
   greedy steps over that cache (EOS ignored);
3. **RAG-like TTFT**: the same for framing + the first ``ratio`` x corpus tokens + question;
4. **build**: ``kvcompile.pipeline.build`` with the ``qa`` recipe at ``--ratio`` (1/32),
   wall time and ``BuildReport.seconds``;
5. **pack load**: ``kvcompile.load`` (verified) + ``pack.session(lm)`` (placing the KV on the device);
6. **TTFT from the pack**: ``session.ask`` timings (median over ``--questions`` after an
   untimed warm-up); **decode pack**: the same greedy loop as 2 over ``session.cache()``
   (EOS ignored, so both decode numbers count the same tokens; ``session.ask``'s own
   tokens/s is kept too, but a random model may stop early on EOS); **sparse decode**: the
   same loop with ``--sparse auto`` (RocketKV's hybrid sparse attention, kvcompile/sparse.py)
   and the bytes of the prefix one step reads;
7. **attention bandwidth**: bytes of KV read per decode attention call on layer 0 of the
   loaded pack (q_len 1) / its time (CUDA events): :func:`attention_bandwidth`.

Peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each phase; the
weights are included) is recorded per phase. ``gpu.json`` (raw numbers, versions,
command line) and ``gpu.md`` (table, targets) are written after every size, so a run
cut short keeps what it measured; a size whose estimated cost (scaled from the previous
size) would exceed ``--budget-s`` is skipped with a note, and so is any phase once the
budget is spent.

The model: ``--shape 8b`` (default; Llama-3.1-8B: 32 layers, hidden 4096, 32 query / 8
KV heads, head_dim 128, MLP 14336, llama3 RoPE scaling, theta 500000, 131072 positions)
or ``--shape tiny`` (2 layers, hidden 256) for a CPU smoke test
(``--shape tiny --tokens 2048 --device cpu``). Weights are random (seed fixed), built
directly on the device in bf16 (fp32 on CPU); the vocabulary is kvcompile's default
model's tokenizer; the fingerprint is a fixed fake. Timings of a random model are those
of a real one of the same shape; its answers are noise.

``--prepare DIR`` writes what the offline device machine needs (the default model's
tokenizer, SQuAD paragraphs as text); ``make gpu-assets`` also downloads the wheels.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("kvcompile") is None:  # not installed: use the checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kvcompile.attention import pack_attention  # noqa: E402
from kvcompile.cache import forward as kv_forward  # noqa: E402

T_START = time.perf_counter()

# Llama-3.1-8B's shape (config.json of meta-llama/Llama-3.1-8B), vocabulary aside.
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=32),
}
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
MAX_POSITIONS = 131072

# SQuAD v2 dev questions (a random model's answers are noise: they set the question length).
QUESTIONS = [
    "Which NFL team represented the AFC at Super Bowl 50?",
    "In what country is Normandy located?",
    "What is the name of the process described in the documents?",
    "When were the Normans in Normandy?",
]
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GiB = 2**30

# Cost of a phase vs corpus tokens, for the time guard: ~n^1.55 for full prefills (on the 8B shape
# attention is ~40% of a 32k prefill, so 32k -> 100k costs ~5.6x), ~n^1.2 for a build (its
# attention spans the kept 1/32 only), ~n for the rest (conservative for decode).
_EXPONENT = {"bare_prefill": 1.55, "full_context": 1.55, "rag": 1.55, "build": 1.2}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- assets


def default_tokenizer():
    """kvcompile's default model's tokenizer, as its model loader gives it (converting the GGUF once)."""
    from kvcompile.models import load_model

    return load_model(device="cpu", progress=False).tokenizer


def load_tokenizer(path: str | None):
    """The tokenizer saved at ``path``, or kvcompile's default model's, ready for a long random model."""
    if path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    else:
        tok = default_tokenizer()
    if not getattr(tok, "chat_template", None):
        tok.chat_template = _CHATML_TEMPLATE
    tok.model_max_length = 10**9  # the random model's window is MAX_POSITIONS; no "too long" warnings
    return tok


def load_paragraphs(path: str | None) -> list[str]:
    """SQuAD v2 dev paragraphs: from a text file (paragraphs separated by blank lines), or the data wheel."""
    if path:
        text = Path(path).read_text(encoding="utf-8")
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    from kvcompile.data.squad import squad_article, squad_articles

    out = []
    for i in range(len(squad_articles())):
        out += [" ".join(text.split()) for _, text in squad_article(i).documents]
    return out


def prepare(dest: Path) -> None:
    """Write the default model's tokenizer and the SQuAD text for a machine without either."""
    dest.mkdir(parents=True, exist_ok=True)
    tok = default_tokenizer()  # saved as loaded: the same files as the converted model's
    tok_dir = dest / "tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    tok.save_pretrained(tok_dir)
    paragraphs = load_paragraphs(None)
    (dest / "squad.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    # Where kvcompile looks for the default model's converted files (relative to KVCOMPILE_CACHE):
    # bench/gpu.sh puts the tokenizer there so that tests' make_tiny_model works without the GGUF.
    from kvcompile import models

    rel = models._converted_dir(models._ALIASES[models.DEFAULT_MODEL].sha256).relative_to(models.cache_dir())
    (dest / "default-model-cache-dir").write_text(str(rel) + "\n")
    n = sum(len(ids) for ids in tok(paragraphs, add_special_tokens=False)["input_ids"])
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    log(f"prepared {dest}: tokenizer, {len(paragraphs)} paragraphs ({n} tokens) in squad.txt, "
        f"{size / 2**20:.1f} MiB in all")


# ----------------------------------------------------------------------------- model


def make_config(shape: str, tok):
    from transformers import AutoConfig

    common = dict(SHAPES[shape], vocab_size=len(tok), max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    try:  # transformers 5: rope_parameters
        cfg = AutoConfig.for_model("llama", rope_parameters=dict(ROPE), **common)
        rp = getattr(cfg, "rope_parameters", None) or {}
        if rp.get("rope_type") == "llama3" and float(rp.get("rope_theta", 0)) == ROPE["rope_theta"]:
            return cfg
    except (TypeError, ValueError):
        pass
    legacy = {k: v for k, v in ROPE.items() if k != "rope_theta"}  # transformers 4 spelling
    return AutoConfig.for_model("llama", rope_scaling=legacy, rope_theta=ROPE["rope_theta"], **common)


def make_model(shape: str, tok, device: torch.device, dtype: torch.dtype, seed: int):
    """A random model of ``shape`` built directly on ``device``, as a kvcompile LoadedModel."""
    from transformers import AutoModelForCausalLM

    from kvcompile.models import LoadedModel

    cfg = make_config(shape, tok)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.requires_grad_(False)
    fingerprint = hashlib.sha256(f"kvcompile-bench-gpu:random-llama:{shape}:seed{seed}:{dtype}".encode()).hexdigest()
    return LoadedModel(model=model, tokenizer=tok, name=f"random-llama-{shape}", fingerprint=fingerprint,
                       max_positions=MAX_POSITIONS)


# ----------------------------------------------------------------------------- corpus


class Corpus:
    """A corpus of about ``n_tokens`` tokens written as ``docs`` .txt files, and its token stream."""

    def __init__(self, paragraphs: list[str], lengths: list[int], lm, recipe, n_tokens: int, docs: int,
                 folder: Path, ratio: float):
        from kvcompile.framing import frame

        prefix = len(frame(lm.tokenizer).prefix_ids)
        want = max(16, n_tokens - prefix - 8 * docs)
        chosen, total, i, cycled = [], 0, 0, False
        while total < want:
            if i == len(paragraphs):
                i, cycled = 0, True  # more tokens asked for than the text holds: repeat it
            chosen.append(paragraphs[i])
            total += lengths[i] + 1
            i += 1
        if total > want and len(chosen) > 1 and total - want > (lengths[(i - 1) % len(paragraphs)] + 1) / 2:
            chosen.pop()  # nearer to the target without the last paragraph
        per = math.ceil(len(chosen) / docs)
        folder.mkdir(parents=True, exist_ok=True)
        for d in range(docs):
            part = chosen[d * per:(d + 1) * per]
            if part:
                (folder / f"squad-{d:02d}.txt").write_text("\n\n".join(part) + "\n", encoding="utf-8")
        self.target, self.folder, self.paragraphs, self.cycled = n_tokens, folder, len(chosen), cycled
        self.prefix_ids, self.doc_ids, self.framing = self._tokenize(lm, recipe)
        self.corpus_ids = [t for d in self.doc_ids for t in d]
        self.stream = self.prefix_ids + self.corpus_ids
        self.questions = [self.framing.question_ids(lm.tokenizer, q) for q in QUESTIONS]
        n_rag = max(1, round(ratio * len(self.corpus_ids)))
        self.rag_stream = self.prefix_ids + self.corpus_ids[:n_rag]

    def _tokenize(self, lm, recipe):
        """The stream a pack holds, as kvcompile frames and tokenises it."""
        from kvcompile.corpus import read_corpus

        docs, _ = read_corpus([str(self.folder)])
        try:
            from kvcompile.builder import tokenize

            tk = tokenize(docs, recipe, lm)
            return list(tk.prefix_ids), [list(d) for d in tk.doc_ids], tk.framing
        except Exception:  # builder internals moved: the framing module's documented layout
            from kvcompile.framing import document_text, frame

            framing = frame(lm.tokenizer)
            ids = [lm.tokenizer(document_text(d.path, d.text), add_special_tokens=False)["input_ids"] for d in docs]
            return list(framing.prefix_ids), ids, framing


# ----------------------------------------------------------------------------- timing helpers


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak(dev: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------- forward passes


def set_sdpa(model) -> None:
    """Plain transformers attention for the dense baselines."""
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")


def forward(model, ids: list[int] | torch.Tensor, cache, dev: torch.device):
    """``model(ids)`` over ``cache`` (None: no cache kept); logits of the last position."""
    x = ids if isinstance(ids, torch.Tensor) else torch.tensor([ids], dtype=torch.long, device=dev)
    if cache is None:
        return model(x, use_cache=False, logits_to_keep=1).logits
    return kv_forward(model, x, cache, logits_to_keep=1).logits  # names the cache argument as transformers does


def dynamic_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def greedy_steps(model, cache, first: int, n: int, dev: torch.device) -> float:
    """``n`` greedy decode steps over ``cache`` after token ``first``, EOS ignored; seconds.

    Like ``kvcompile.session.greedy``: one forward per token and the argmax read on the
    host each step (what a server checking for EOS does).
    """
    nxt = first
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = forward(model, torch.tensor([[nxt]], dtype=torch.long, device=dev), cache, dev)
        nxt = int(logits[0, -1].argmax())
    sync(dev)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- phases


class Phases:
    """Runs the phases of one size, recording times, peaks, errors and skips."""

    def __init__(self, res: dict, dev: torch.device, deadline: float, estimates: dict[str, float], save=None):
        self.res, self.dev, self.deadline, self.estimates = res, dev, deadline, estimates
        self.save = save or (lambda: None)
        self.res.setdefault("phases", {})
        self.res.setdefault("notes", [])

    def run(self, name: str, fn, *, needs: tuple[str, ...] = ()):
        """Run ``fn() -> dict`` as phase ``name``; None if skipped or failed."""
        for dep in needs:
            if self.res["phases"].get(dep, {}).get("status") != "ok":
                self.skip(name, f"needs {dep}, which did not run")
                return None
        left = self.deadline - time.perf_counter()
        est = self.estimates.get(name)
        if left <= 0 or (est is not None and est > left):
            why = "time budget spent" if left <= 0 else f"estimated {est:.0f}s > {left:.0f}s left in the budget"
            self.skip(name, why)
            return None
        free_memory(self.dev)
        reset_peak(self.dev)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                out = fn()
        except Exception as e:  # record and go on: one broken phase must not lose the others
            free_memory(self.dev)
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            self.res["phases"][name] = {"status": "error", "error": msg, "traceback": traceback.format_exc()[-4000:],
                                        "phase_seconds": time.perf_counter() - t0}
            self.res["notes"].append(f"{name} failed: {msg}")
            log(f"  {name} FAILED: {msg}")
            self.save()
            return None
        out = dict(out or {})
        out.update(status="ok", phase_seconds=time.perf_counter() - t0, peak_bytes=peak(self.dev))
        self.res["phases"][name] = out
        self.save()
        return out

    def skip(self, name: str, why: str) -> None:
        self.res["phases"][name] = {"status": "skipped", "why": why}
        self.res["notes"].append(f"{name} skipped: {why}")
        log(f"  {name} skipped: {why}")
        self.save()


def bare_prefill(lm, ids, repeats: int) -> dict:
    model, dev = lm.model, lm.device
    set_sdpa(model)
    runs = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        forward(model, ids, None, dev)
        sync(dev)
        runs.append(time.perf_counter() - t0)
    return {"runs": runs, "seconds": median(runs), "tokens": len(ids)}


def full_context(lm, ids: list[int], decode_tokens: int) -> dict:
    """Prefill into a DynamicCache + first token (TTFT), then greedy decode over that cache."""
    model, dev = lm.model, lm.device
    set_sdpa(model)
    cache = dynamic_cache(model)
    sync(dev)
    t0 = time.perf_counter()
    first = int(forward(model, ids, cache, dev)[0, -1].argmax())
    ttft = time.perf_counter() - t0
    prefill_peak = peak(dev)
    reset_peak(dev)
    dt = greedy_steps(model, cache, first, decode_tokens, dev)
    del cache
    return {"ttft": ttft, "tokens": len(ids), "prefill_peak_bytes": prefill_peak, "decode_seconds": dt,
            "decode_tokens": decode_tokens, "decode_tokens_per_s": decode_tokens / dt if dt > 0 else None,
            "decode_peak_bytes": peak(dev)}


def rag_ttft(lm, ids: list[int], repeats: int) -> dict:
    model, dev = lm.model, lm.device
    set_sdpa(model)
    runs = []
    for _ in range(repeats):
        cache = dynamic_cache(model)
        sync(dev)
        t0 = time.perf_counter()
        int(forward(model, ids, cache, dev)[0, -1].argmax())
        runs.append(time.perf_counter() - t0)
        del cache
    return {"runs": runs, "ttft": median(runs), "tokens": len(ids)}


def build_pack(lm, folder: Path, out: Path, ratio: float, chunk_size: int | None, quant: str = "none") -> dict:
    from kvcompile.builder import BuildOptions
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    options = BuildOptions(ratio=ratio, quant=quant)
    if chunk_size is not None:
        options.chunk_size = chunk_size
    recipe = load_recipe("qa")
    dev = lm.device
    sync(dev)
    t0 = time.perf_counter()
    report = build([str(folder)], out, lm, recipe, options)
    sync(dev)
    wall = time.perf_counter() - t0
    return {"seconds": wall, "report_seconds": dict(report.seconds), "bytes": report.bytes,
            "cache_tokens": report.cache_tokens, "kept_tokens": report.kept_tokens,
            "full_tokens": report.full_tokens, "kept_share": report.kept_tokens / max(1, report.full_tokens),
            "chunk_size": options.chunk_size, "ratio": ratio}


def load_pack(lm, path: Path, holder: dict) -> dict:
    import kvcompile

    dev = lm.device
    sync(dev)
    t0 = time.perf_counter()
    pack = kvcompile.load(path)
    t1 = time.perf_counter()
    session = pack.session(lm)
    sync(dev)
    t2 = time.perf_counter()
    holder["session"] = session
    return {"seconds": t2 - t0, "read_verify": t1 - t0, "session": t2 - t1,
            "session_load_seconds": getattr(session, "load_seconds", None), "device_kv_bytes": device_bytes(session)}


def device_bytes(session) -> int:
    """Bytes of the placed pack on the device: dense rows, or a quantised pack's encoded tensors."""
    return sum(layer.nbytes if hasattr(layer, "nbytes") else layer.keys.nbytes + layer.values.nbytes
               for layer in session.kv)


def pack_ask(session, lm, decode_tokens: int, n_questions: int) -> dict:
    dev = lm.device
    session.ask(QUESTIONS[-1], max_new_tokens=2)  # warm-up
    rows = []
    for q in QUESTIONS[:n_questions]:
        sync(dev)
        t0 = time.perf_counter()
        a = session.ask(q, max_new_tokens=decode_tokens)
        sync(dev)
        rows.append({"question": q, "wall": time.perf_counter() - t0, "tokens": a.tokens, **a.timings})
    rates = [r["tokens_per_s"] for r in rows if r.get("tokens", 0) > 1]
    return {"questions": rows, "ttft": median([r.get("ttft") for r in rows]),
            "ask_tokens_per_s": median(rates) if rates else None,
            "ask_tokens": [r["tokens"] for r in rows]}


def pack_decode(session, lm, decode_tokens: int) -> dict:
    """TTFT and greedy decode over ``session.cache()`` with the loop used for the full cache."""
    model, dev = lm.model, lm.device
    ids = session.question_ids(QUESTIONS[0])
    with pack_attention(model):
        cache = session.cache(capacity=len(ids) + decode_tokens + 1)  # room up front, as Session.stream makes
        sync(dev)
        t0 = time.perf_counter()
        first = int(forward(model, ids, cache, dev)[0, -1].argmax())
        ttft = time.perf_counter() - t0
        dt = greedy_steps(model, cache, first, decode_tokens, dev)
    return {"ttft": ttft, "decode_seconds": dt, "decode_tokens": decode_tokens,
            "decode_tokens_per_s": decode_tokens / dt if dt > 0 else None}


def sparse_decode(session, lm, decode_tokens: int) -> dict:
    """:func:`pack_decode` with RocketKV's sparse decode (``--sparse auto``, kvcompile/sparse.py),
    and what one step reads of the prefix; the session is left dense again."""
    session.sparsify()
    try:
        return {**pack_decode(session, lm, decode_tokens), **session.sparse_report()}
    finally:
        session.sparse = session.pages = None


def attention_bandwidth(session, lm, iters: int = 200, kernel_time: bool = False) -> dict:
    """Decode attention bandwidth on layer 0 of the loaded pack: KV bytes read per call / seconds per call.

    One new token (q_len 1) is appended to a fresh cache's layer 0 and the attention is
    called ``iters`` times back to back between two CUDA events. Measured through
    ``kvcompile.attention.kvcompile_attention`` (what transformers calls: the Triton
    kernel on CUDA where there is one, else the reference) and, where present, the
    kernel ``kvcompile.kernels.attention.ragged_attention`` called directly; for each,
    the wall time per call (launch overhead included: one call is microseconds) and, with
    ``kernel_time``, the device time of its kernels (torch.profiler, CUDA activity; run
    last, since an active profiler can slow later launches). Integrators: this is the one
    place to adjust when the attention entry point or the prefix layout changes.
    """
    from kvcompile import attention as A

    model, dev, dtype = lm.model, lm.device, lm.dtype
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    scaling = head_dim**-0.5
    entry = A.kvcompile_attention
    cache = session.cache()
    layer = cache.layers[0]
    g = torch.Generator(device=dev).manual_seed(0)
    k_new, v_new = (torch.randn(1, kv_heads, 1, head_dim, generator=g, device=dev).to(dtype) for _ in range(2))
    layer.update(k_new, v_new, 0)
    q = torch.randn(1, heads, 1, head_dim, generator=g, device=dev).to(dtype)
    prefix = layer.prefix
    encoded = not isinstance(prefix.keys, torch.Tensor)  # a quantised pack: decoded per call, then the kernel
    kv_bytes = prefix.nbytes if encoded else sum(t.numel() * t.element_size() for t in (prefix.keys, prefix.values))
    rows = prefix.rows
    new_bytes = 2 * k_new.numel() * k_new.element_size()
    io_bytes = 2 * q.numel() * q.element_size()  # the query in, the output out
    calls = {"kvcompile_attention": lambda: entry(None, q, layer, layer, None, scaling=scaling)}
    calls_note = "not CUDA: the kernel is not called directly"
    if A.uses_kernel(dev):
        from kvcompile.kernels.attention import ragged_attention as kernel

        def dense(p):
            return kernel(q, p.keys, p.values, p.offsets, p.max_len, layer.new_keys, layer.new_values, scaling)

        if not encoded:
            calls["kernel"] = lambda: dense(prefix)
        else:  # a quantised pack: the kernel over its codes against decoding the layer first
            calls["decode_then_kernel"] = lambda: dense(prefix.materialise())
            if prefix.attends_encoded:
                calls["kernel_over_codes"] = lambda: prefix.attend(q, layer.new_keys, layer.new_values, scaling)
        calls_note = None
    out = {"status": "ok", "layer": 0, "prefix_rows": rows, "kv_bytes": kv_bytes,
           "bytes_per_call": kv_bytes + new_bytes + io_bytes, "iters": iters,
           "path": "triton kernel" if A.uses_kernel(dev) else "reference", "timings": {}}
    if calls_note:
        out["note"] = calls_note
    for name, call in calls.items():
        try:
            for _ in range(5):
                call()
            out["timings"][name] = _time_calls(call, iters, dev, out["bytes_per_call"], kernel_time)
        except Exception as e:
            out["timings"][name] = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    best = [t["GB_per_s"] for t in out["timings"].values() if isinstance(t.get("GB_per_s"), float)]
    out["GB_per_s"] = max(best) if best else None
    return out


def _time_calls(call, iters: int, dev: torch.device, nbytes: int, kernel_time: bool) -> dict:
    """Seconds per call: wall (CUDA events around ``iters`` back-to-back calls: includes launch
    overhead) and, on CUDA, the device time of the kernels the calls launched (profiler)."""
    res = {}
    if dev.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        res["eager_s"] = (time.perf_counter() - t0) / iters
    else:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        start.record()
        for _ in range(iters):
            call()
        end.record()
        torch.cuda.synchronize(dev)
        res["eager_s"] = start.elapsed_time(end) / 1e3 / iters
    if dev.type == "cuda" and kernel_time:
        try:  # kernel time alone, from CUPTI: no launch overhead, no host work
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(iters):
                    call()
                torch.cuda.synchronize(dev)
            events = prof.key_averages()
            us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
                     for e in events)
            res["kernels"] = sorted({e.key for e in events})[:8]
            if us > 0:
                res["kernel_s"] = us / 1e6 / iters
        except Exception as e:
            res["kernel_time"] = f"not measured: {type(e).__name__}: {str(e)[:200]}"
    s = res.get("kernel_s") or res["eager_s"]
    res["seconds_per_call"] = s
    res["GB_per_s"] = nbytes / s / 1e9 if s > 0 else None
    res["eager_GB_per_s"] = nbytes / res["eager_s"] / 1e9 if res["eager_s"] > 0 else None
    return res


# ----------------------------------------------------------------------------- one size


def run_size(lm, corpus: Corpus, args, tmp: Path, deadline: float, estimates: dict[str, float], res: dict,
             save) -> dict:
    """Every phase at one corpus size, into ``res``; ``save()`` after each phase."""
    dev = lm.device
    res.update({"target_tokens": corpus.target, "stream_tokens": len(corpus.stream),
                "corpus_tokens": len(corpus.corpus_ids), "prefix_tokens": len(corpus.prefix_ids),
                "documents": len(corpus.doc_ids), "paragraphs": corpus.paragraphs,
                "question_tokens": len(corpus.questions[0]),
                "rag_tokens": len(corpus.rag_stream) + len(corpus.questions[0]), "text_repeated": corpus.cycled})
    ph = Phases(res, dev, deadline, estimates, save)
    log(f"size {corpus.target}: stream {len(corpus.stream)} tokens ({len(corpus.doc_ids)} documents, "
        f"{corpus.paragraphs} paragraphs)")
    q_ids = corpus.questions[0]
    r = ph.run("bare_prefill", lambda: bare_prefill(lm, corpus.stream, args.repeats))
    if r:
        log(f"  bare prefill {r['seconds']:.3f}s")
    r = ph.run("full_context", lambda: full_context(lm, corpus.stream + q_ids, args.decode_tokens))
    if r:
        log(f"  full-context TTFT {r['ttft']:.3f}s, decode {r['decode_tokens_per_s']:.1f} tok/s")
    r = ph.run("rag", lambda: rag_ttft(lm, corpus.rag_stream + q_ids, args.repeats))
    if r:
        log(f"  RAG-like TTFT {r['ttft']:.4f}s ({r['tokens']} tokens)")
    pack_path = tmp / f"bench-{corpus.target}.kvpack"
    r = ph.run("build", lambda: build_pack(lm, corpus.folder, pack_path, args.ratio, args.chunk_size))
    if r:
        log(f"  build {r['seconds']:.3f}s ({r['bytes'] / 2**20:.1f} MiB, kept {r['kept_share']:.4f})")
    holder: dict = {}
    r = ph.run("pack_load", lambda: load_pack(lm, pack_path, holder), needs=("build",))
    if r:
        log(f"  pack load {r['seconds']:.3f}s (read+verify {r['read_verify']:.3f}s, session {r['session']:.3f}s)")
    session = holder.get("session")
    r = ph.run("pack_ask", lambda: pack_ask(session, lm, args.decode_tokens, args.questions), needs=("pack_load",))
    if r:
        log(f"  TTFT from pack {r['ttft']:.4f}s; ask tokens {r['ask_tokens']}")
    r = ph.run("pack_decode", lambda: pack_decode(session, lm, args.decode_tokens), needs=("pack_load",))
    if r:
        log(f"  pack decode {r['decode_tokens_per_s']:.1f} tok/s (loop TTFT {r['ttft']:.4f}s)")
    r = ph.run("pack_decode_sparse", lambda: sparse_decode(session, lm, args.decode_tokens), needs=("pack_load",))
    if r:
        log(f"  sparse decode (auto) {r['decode_tokens_per_s']:.1f} tok/s, "
            f"{r['bytes_per_step'] / r['dense_bytes_per_step']:.0%} of the prefix's bytes per step")
    r = ph.run("attention_bandwidth", lambda: attention_bandwidth(session, lm, args.bandwidth_iters),
               needs=("pack_load",))
    if r:
        log(f"  attention bandwidth: {fmt_bw(r.get('GB_per_s'))} ({r.get('path')}; "
            f"{r.get('kv_bytes', 0) / 2**20:.2f} MiB of KV on layer 0)")
    holder.clear()
    session = None  # noqa: F841 (drop the placed KV before the next phase)
    for quant in args.quants:
        r = ph.run(f"quant_{quant}", lambda quant=quant: quantised_pack(lm, corpus, args, tmp, quant))
        if r:
            log(f"  {quant}: decode {fmt(r['decode']['decode_tokens_per_s'])} tok/s, "
                f"{r['device_kv_bytes'] / 2**20:.1f} MiB of KV on the device, "
                f"attention {fmt_bw(r['attention'].get('GB_per_s'))}")
    if pack_path.exists():
        res["pack_path"] = str(pack_path)  # for the kernel-time pass at the end (kernel_times)
    free_memory(dev)
    res["complete"] = True
    return res


def quantised_pack(lm, corpus: Corpus, args, tmp: Path, quant: str) -> dict:
    """Build, load and decode from a ``--quant`` pack at the same ratio: what stays on the device
    (encoded), decode tokens/s, and layer 0's attention over the encoded bytes: the kernel
    that reads the codes, against decoding the layer first and running the dense kernel."""
    path = tmp / f"bench-{corpus.target}-{quant}.kvpack"
    built = build_pack(lm, corpus.folder, path, args.ratio, args.chunk_size, quant)
    holder: dict = {}
    loaded = load_pack(lm, path, holder)
    session = holder["session"]
    out = {"build": built, "load": loaded, "device_kv_bytes": loaded["device_kv_bytes"],
           "decode": pack_decode(session, lm, args.decode_tokens),
           "attention": attention_bandwidth(session, lm, args.bandwidth_iters)}
    path.unlink(missing_ok=True)
    return out


def kernel_times(lm, data: dict, args, deadline: float, save) -> None:
    """Last: attention kernel time (profiler) on each size's pack, merged into its attention_bandwidth."""
    if lm.device.type != "cuda":
        return
    for res in data["results"]:
        path = res.get("pack_path")
        bw = res.get("phases", {}).get("attention_bandwidth", {})
        if not path or bw.get("status") != "ok":
            continue
        ph = Phases(res, lm.device, deadline, {}, save)
        holder: dict = {}

        def measure(path=path, holder=holder):
            load_pack(lm, Path(path), holder)
            return attention_bandwidth(holder["session"], lm, args.bandwidth_iters, kernel_time=True)

        r = ph.run("attention_kernel_time", measure)
        holder.clear()
        Path(path).unlink(missing_ok=True)
        res.pop("pack_path", None)
        if not r:
            continue
        for name, tm in r.get("timings", {}).items():
            if tm.get("kernel_s") and name in bw.get("timings", {}):
                bw["timings"][name].update(kernel_s=tm["kernel_s"], kernels=tm.get("kernels"),
                                           seconds_per_call=tm["kernel_s"], GB_per_s=tm["GB_per_s"])
            elif tm.get("kernel_time") and name in bw.get("timings", {}):
                bw["timings"][name]["kernel_time"] = tm["kernel_time"]
        best = [t["GB_per_s"] for t in bw["timings"].values() if isinstance(t.get("GB_per_s"), float)]
        bw["GB_per_s"] = max(best) if best else None
        log(f"  {res['target_tokens']} tokens: attention kernel time -> {fmt_bw(bw['GB_per_s'])}")
        save()


def summarize(res: dict) -> dict:
    p = res["phases"]

    def get(phase, key):
        d = p.get(phase, {})
        return d.get(key) if d.get("status") == "ok" else None

    bare, build = get("bare_prefill", "seconds"), get("build", "seconds")
    peaks = {name: d.get("peak_bytes") for name, d in p.items() if d.get("status") == "ok"}
    full_peak = max([x for x in (get("full_context", "prefill_peak_bytes"), get("full_context", "decode_peak_bytes"))
                     if x is not None], default=None)
    pack_peak = max([x for x in (peaks.get("pack_load"), peaks.get("pack_ask"), peaks.get("pack_decode"))
                     if x is not None], default=None)
    return {
        "bare_prefill_s": bare,
        "full_ttft_s": get("full_context", "ttft"),
        "rag_ttft_s": get("rag", "ttft"),
        "build_s": build,
        "build_over_prefill": build / bare if build and bare else None,
        "build_report_total_s": (get("build", "report_seconds") or {}).get("total"),
        "pack_load_s": get("pack_load", "seconds"),
        "pack_ttft_s": get("pack_ask", "ttft"),
        "pack_ttft_loop_s": get("pack_decode", "ttft"),
        "decode_full_tok_s": get("full_context", "decode_tokens_per_s"),
        "decode_pack_tok_s": get("pack_decode", "decode_tokens_per_s"),
        "decode_pack_ask_tok_s": get("pack_ask", "ask_tokens_per_s"),
        "peak_full_bytes": full_peak,
        "peak_pack_bytes": pack_peak,
        "peak_build_bytes": peaks.get("build"),
        "peak_bytes": peaks,
        "attn_GB_per_s": get("attention_bandwidth", "GB_per_s"),
        "attn_path": get("attention_bandwidth", "path"),
    }


def targets(res: dict) -> dict:
    s = res["summary"]

    def check(ok, value, goal):
        return {"result": "n/a" if ok is None else ("PASS" if ok else "FAIL"), "value": value, "goal": goal}

    dp, df = s["decode_pack_tok_s"], s["decode_full_tok_s"]
    tp, tf = s["pack_ttft_s"], s["full_ttft_s"]
    bp = s["build_over_prefill"]
    return {
        "decode_pack_ge_full": check(None if dp is None or df is None else dp >= df,
                                     None if dp is None or df is None else dp / df, "decode pack / decode full >= 1"),
        "pack_ttft_le_tenth_full": check(None if tp is None or tf is None else tp <= tf / 10,
                                         None if tp is None or tf is None else tp / tf, "pack TTFT / full TTFT <= 0.1"),
        "build_le_1_5x_prefill": check(None if bp is None else bp <= 1.5, bp, "build / bare prefill <= 1.5"),
    }


# ----------------------------------------------------------------------------- reports


def machine_info(dev: torch.device) -> dict:
    import transformers

    import kvcompile

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "kvcompile": kvcompile.__version__,
            "kvcompile_path": str(Path(kvcompile.__file__).parent),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": str(dev)}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(device_name=torch.cuda.get_device_name(dev), device_memory_bytes=props.total_memory,
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["torch_threads"] = torch.get_num_threads()
    for key, cmd in (("git_commit", ["git", "rev-parse", "HEAD"]), ("git_dirty", ["git", "status", "--porcelain"])):
        try:
            text = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            info[key] = text if key == "git_commit" else bool(text)
        except Exception:
            info[key] = None
    return info


def fmt_s(x, digits=3):
    if x is None:
        return "–"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.{digits if x < 10 else 1}f} s"


def fmt(x, digits=1, suffix=""):
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


def fmt_bw(x):
    return "n/a" if x is None else f"{x:.3g} GB/s"


def fmt_gib(x):
    return "–" if x is None else f"{x / GiB:.1f}"


def markdown(data: dict) -> str:
    m, c = data["machine"], data["config"]
    lines = [
        "# GPU benchmark: kvcompile on a Llama-3.1-8B-shaped model" if c["shape"] == "8b"
        else f"# GPU benchmark (shape {c['shape']})",
        "",
        "Generated by `bench/gpu.py` (`make bench-gpu`, or `bench/gpu.sh` on the offline device machine: "
        "bench/README-gpu.md); raw numbers in [gpu.json](gpu.json). "
        f"Command: `{' '.join(data['command'])}`.",
        "",
        f"**Machine**: {m.get('device_name')} ({m['device']}"
        + (f", {m['device_memory_bytes'] / GiB:.0f} GiB, CUDA {m.get('cuda')}" if m.get("device_memory_bytes") else "")
        + f"); torch {m['torch']}, transformers {m['transformers']}, triton {m.get('triton') or '–'}, "
        f"Python {m['python']}; kvcompile {m['kvcompile']} at commit {(m.get('git_commit') or '?')[:10]}"
        + (" (with uncommitted changes)" if m.get("git_dirty") else "") + f"; {m['date']}.",
        "",
        f"**Model**: randomly initialised (seed {c['seed']}) Llama, shape `{c['shape']}` "
        f"({', '.join(f'{k}={v}' for k, v in c['model_shape'].items())}; llama3 RoPE, theta 500000, "
        f"{MAX_POSITIONS} positions), {c['dtype']}, vocabulary {c['vocab_size']} (kvcompile's default tokenizer); "
        f"weights {fmt_gib(c.get('weight_bytes'))} GiB. **Corpus**: SQuAD v2 dev paragraphs concatenated into "
        f"{c['docs']} .txt documents per size. **Pack**: recipe `qa`, ratio {c['ratio']:.5g}"
        f" (1/{1 / c['ratio']:.0f}), chunk size {c.get('chunk_size') or 'default'}. Decode: {c['decode_tokens']} "
        "greedy tokens, EOS ignored.",
        "",
        "| corpus (stream tokens) | bare prefill | full-context TTFT | RAG-like TTFT | build (x prefill) | pack load "
        "| TTFT from pack | decode full | decode pack | peak mem full / build / pack (GiB) | attn bandwidth |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in data["results"]:
        if res.get("skipped") or "summary" not in res:
            why = res.get("skipped") or res.get("error") or "not measured"
            lines.append(f"| {res['target_tokens']} | skipped: {why} |||||||||")
            continue
        s = res["summary"]
        bw = s["attn_GB_per_s"]
        lines.append(
            f"| {res['target_tokens']} ({res['stream_tokens']}) | {fmt_s(s['bare_prefill_s'])} "
            f"| {fmt_s(s['full_ttft_s'])} "
            f"| {fmt_s(s['rag_ttft_s'])} | {fmt_s(s['build_s'])} ({fmt(s['build_over_prefill'], 2, 'x')}) "
            f"| {fmt_s(s['pack_load_s'])} | {fmt_s(s['pack_ttft_s'])} | {fmt(s['decode_full_tok_s'], 1, ' tok/s')} "
            f"| {fmt(s['decode_pack_tok_s'], 1, ' tok/s')} | {fmt_gib(s['peak_full_bytes'])} / "
            f"{fmt_gib(s['peak_build_bytes'])} / {fmt_gib(s['peak_pack_bytes'])} "
            f"| {fmt_bw(bw)} |")
    lines.append("")
    t = data.get("targets")
    if t:
        lines += [f"## Targets at {t['size']} tokens", "", "| target | value | result |", "|---|---|---|"]
        for name, label in (("decode_pack_ge_full", "decode from the pack >= decode over the full cache"),
                            ("pack_ttft_le_tenth_full", "TTFT from the pack <= 1/10 of the full-context TTFT"),
                            ("build_le_1_5x_prefill", "build <= 1.5x a bare prefill")):
            r = t[name]
            lines.append(f"| {label} | {fmt(r['value'], 3)} ({r['goal']}) | **{r['result']}** |")
        lines.append("")
    lines += ["## Details", ""]
    for res in data["results"]:
        if res.get("skipped") or "summary" not in res:
            why = res.get("skipped") or res.get("error") or "not measured"
            lines += [f"- {res['target_tokens']} tokens: skipped ({why}).", ""]
            continue
        s, p = res["summary"], res["phases"]
        lines.append(f"### {res['target_tokens']} tokens")
        lines.append("")
        lines.append(f"Stream {res['stream_tokens']} tokens (framing {res['prefix_tokens']} + corpus "
                     f"{res['corpus_tokens']}, {res['documents']} documents, {res['paragraphs']} paragraphs"
                     + (", text repeated to reach the size" if res.get("text_repeated") else "")
                     + f"); question {res['question_tokens']} tokens; RAG-like prompt {res['rag_tokens']} tokens.")
        b = p.get("build", {})
        if b.get("status") == "ok":
            rs = b["report_seconds"]
            lines.append(f"Build: {fmt_s(b['seconds'])} wall; BuildReport.seconds: "
                         + ", ".join(f"{k} {fmt_s(v)}" for k, v in rs.items())
                         + f"; pack {b['bytes'] / 2**20:.1f} MiB, kept {b['kept_share']:.4f} of the KV.")
        a = p.get("pack_ask", {})
        if a.get("status") == "ok":
            lines.append(f"`session.ask` ({c['decode_tokens']} max new tokens): TTFT {fmt_s(a['ttft'])} (median), "
                         f"tokens {a['ask_tokens']}, its tokens/s {fmt(a['ask_tokens_per_s'], 1)}; the decode loop "
                         f"over `session.cache()`: TTFT {fmt_s(s['pack_ttft_loop_s'])}.")
        bw = p.get("attention_bandwidth", {})
        if bw.get("status") == "ok":
            parts = []
            for name, tm in bw.get("timings", {}).items():
                if "seconds_per_call" in tm:
                    parts.append(f"{name}: {tm['eager_s'] * 1e6:.1f} us per call with launch overhead"
                                 + (f", {tm['kernel_s'] * 1e6:.1f} us of kernel time" if tm.get("kernel_s") else "")
                                 + f" -> {fmt_bw(tm['GB_per_s'])}")
                else:
                    parts.append(f"{name}: {tm.get('error')}")
            lines.append(f"Attention bandwidth ({bw['path']}): layer 0 holds {bw['prefix_rows']} KV rows "
                         f"({bw['kv_bytes'] / 2**20:.2f} MiB K+V), {bw['bytes_per_call'] / 2**20:.2f} MiB read per "
                         "call; " + "; ".join(parts) + ". The bandwidth uses the kernel time (profiler) where "
                         "measured, "
                         "else the wall time per call.")
        elif bw:
            lines.append(f"Attention bandwidth: n/a ({bw.get('why') or bw.get('error') or bw.get('status')}).")
        mem = ", ".join(f"{k} {fmt_gib(v)}" for k, v in s["peak_bytes"].items() if v is not None)
        if mem:
            lines.append(f"Peak GPU memory by phase (GiB, weights included): {mem}.")
        quant = {k[len("quant_"):]: v for k, v in res.get("phases", {}).items()
                 if k.startswith("quant_") and v.get("status") == "ok"}
        if quant:
            fp16 = res["phases"].get("pack_load", {})
            lines += ["", "| pack | KV on the device (MiB) | decode tok/s | layer-0 attention (GB/s of encoded KV) "
                      "| layer-0 attention, us per call: over codes / decoded first |", "|---|---|---|---|---|"]
            base = res["phases"].get("pack_decode", {}).get("decode_tokens_per_s")
            bw = res["phases"].get("attention_bandwidth", {})
            kv = fp16.get("device_kv_bytes")
            lines.append(f"| fp16 | {fmt(kv / 2**20, 2) if kv else '-'} | {fmt(base)} | {fmt_bw(bw.get('GB_per_s'))} "
                         "| - |")
            for name, q in quant.items():
                us = [q["attention"].get("timings", {}).get(k, {}).get("seconds_per_call")
                      for k in ("kernel_over_codes", "decode_then_kernel")]
                lines.append(f"| {name} | {fmt(q['device_kv_bytes'] / 2**20, 2)} | "
                             f"{fmt(q['decode'].get('decode_tokens_per_s'))} | "
                             f"{fmt_bw(q['attention'].get('GB_per_s'))} | "
                             + " / ".join(fmt(u * 1e6, 1) if u else "-" for u in us) + " |")
        for note in res.get("notes", []):
            lines.append(f"- {note}")
        lines.append("")
    lines += [
        "## How it was measured",
        "",
        "- Bare prefill: one plain transformers forward (`sdpa`, no cache, `logits_to_keep=1`) of the pack's stream "
        f"(framing prefix + corpus); median of {c['repeats']}.",
        "- Full-context TTFT: framing + corpus + question prefilled into a `DynamicCache` (`sdpa`), then the first "
        "token's argmax. Decode full: greedy steps over that cache (one forward per token, argmax read each step).",
        "- RAG-like TTFT: the same over framing + the first ratio x corpus tokens + question "
        f"(median of {c['repeats']}).",
        "- Build: `kvcompile.pipeline.build` (recipe `qa`), wall time with the device synchronised; the split is "
        "`BuildReport.seconds`.",
        "- Pack load: `kvcompile.load` (checksums verified) + `pack.session(lm)` (KV placed on the device, "
        "RoPE applied).",
        "- TTFT from the pack: `session.ask` timings (`ttft`), median over the questions after a warm-up question. "
        "Decode pack: the same greedy loop as decode full, over `session.cache()` with kvcompile's attention.",
        "- Attention bandwidth: `attention_bandwidth()` in bench/gpu.py (K+V bytes of layer 0's prefix + the new "
        "token + query/output, per call, over the time per call).",
        "- Every timed region is bracketed by `torch.cuda.synchronize()`; peak memory is "
        "`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` at each phase's start.",
        "",
        f"Total run time {fmt(data.get('total_seconds'), 0)} s (budget {c['budget_s']:.0f} s).",
    ]
    for note in data.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    return "\n".join(lines)


def write_reports(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data["total_seconds"] = time.perf_counter() - T_START
    for res in data["results"]:
        if "phases" in res:
            res["summary"] = summarize(res)
    measured = [r for r in data["results"] if "summary" in r]
    at = next((r for r in measured if r["target_tokens"] == 32768), measured[0] if measured else None)
    data["targets"] = {"size": at["target_tokens"], **targets(at)} if at else None
    tmp = out / ".gpu.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, out / "gpu.json")
    (out / "gpu.md").write_text(markdown(data))


# ----------------------------------------------------------------------------- main


def parse_tokens(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def parse_ratio(text: str) -> float:
    if "/" in text:
        a, b = text.split("/", 1)
        return float(a) / float(b)
    return float(text)


def warm_up(lm, paragraphs, lengths, recipe, args, tmp: Path) -> dict:
    """One small run of every phase (kernel compilation, allocator, cuBLAS plans) before timing."""
    dev = lm.device
    t0 = time.perf_counter()
    notes = []
    n = min(3000, max(600, args.tokens[0] // 4))
    small = Corpus(paragraphs, lengths, lm, recipe, n, 2, tmp / "warm", args.ratio)
    q = small.questions[0]
    with torch.no_grad():
        try:
            bare_prefill(lm, small.stream, 1)
            full_context(lm, small.stream + q, 4)
        except Exception as e:
            notes.append(f"warm-up of the dense phases failed: {type(e).__name__}: {str(e)[:300]}")
            log(f"  warm-up of the dense phases FAILED: {traceback.format_exc()}")
        try:
            path = tmp / "warm.kvpack"
            build_pack(lm, small.folder, path, args.ratio, args.chunk_size)
            holder: dict = {}
            load_pack(lm, path, holder)
            pack_ask(holder["session"], lm, 4, 1)
            pack_decode(holder["session"], lm, 4)
            holder.clear()
            path.unlink(missing_ok=True)
        except Exception as e:
            notes.append(f"warm-up of the kvcompile phases failed: {type(e).__name__}: {str(e)[:300]}")
            log(f"  warm-up of the kvcompile phases FAILED: {traceback.format_exc()}")
    shutil.rmtree(small.folder, ignore_errors=True)
    free_memory(dev)
    sync(dev)
    return {"seconds": time.perf_counter() - t0, "notes": notes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--tokens", type=parse_tokens, default=parse_tokens("32768,100000"),
                    help="corpus sizes in tokens, measured in this order (default 32768,100000)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--tokenizer", default=None, help="a saved tokenizer (default: kvcompile's default model's)")
    ap.add_argument("--text", default=None, help="paragraphs separated by blank lines (default: the SQuAD data wheel)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "gpu")
    ap.add_argument("--ratio", type=parse_ratio, default=1 / 32)
    ap.add_argument("--chunk-size", type=int, default=None, help="build chunk size (default: BuildOptions')")
    ap.add_argument("--docs", type=int, default=4, help="documents per corpus")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--questions", type=int, default=3, help="questions asked of each pack (TTFT median)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of bare prefill and RAG-like TTFT (median)")
    ap.add_argument("--bandwidth-iters", type=int, default=200)
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="wall-clock budget for the whole run; later sizes/phases that would exceed it are skipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quants", type=lambda t: [q for q in t.split(",") if q], default=["int4", "kvmix"],
                    help="quantised packs to build and decode from at each size, after the fp16 pack ('' for none)")
    ap.add_argument("--prepare", type=Path, default=None, metavar="DIR",
                    help="write DIR/tokenizer and DIR/squad.txt for an offline machine, and exit")
    args = ap.parse_args(argv)

    if args.prepare is not None:
        prepare(args.prepare)
        return 0

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    deadline = T_START + args.budget_s
    from kvcompile.recipe import load_recipe

    tok = load_tokenizer(args.tokenizer)
    paragraphs = load_paragraphs(args.text)
    lengths = [len(ids) for ids in tok(paragraphs, add_special_tokens=False)["input_ids"]]
    log(f"{len(paragraphs)} paragraphs, {sum(lengths)} tokens of text; tokenizer vocabulary {len(tok)}")

    t0 = time.perf_counter()
    lm = make_model(args.shape, tok, dev, dtype, args.seed)
    sync(dev)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    log(f"random {args.shape} model on {dev} ({dtype}): {weight_bytes / GiB:.2f} GiB of weights in "
        f"{time.perf_counter() - t0:.1f}s")
    data = {
        "command": [Path(sys.executable).name] + sys.argv if argv is None else ["bench/gpu.py", *argv],
        "machine": machine_info(dev),
        "config": {"shape": args.shape, "model_shape": SHAPES[args.shape], "dtype": str(dtype).removeprefix("torch."),
                   "vocab_size": len(tok), "seed": args.seed, "tokens": args.tokens, "ratio": args.ratio,
                   "chunk_size": args.chunk_size, "docs": args.docs, "decode_tokens": args.decode_tokens,
                   "questions": args.questions, "repeats": args.repeats, "budget_s": args.budget_s,
                   "weight_bytes": weight_bytes, "model_init_seconds": time.perf_counter() - t0,
                   "tokenizer": args.tokenizer or "kvcompile default model", "text": args.text or "SQuAD data wheel"},
        "results": [],
        "notes": [],
    }
    recipe = load_recipe("qa")
    with tempfile.TemporaryDirectory(prefix="kvcompile-bench-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        warm = warm_up(lm, paragraphs, lengths, recipe, args, tmp)
        data["config"]["warm_up_seconds"] = warm["seconds"]
        data["notes"] += warm["notes"]
        log(f"warm-up done in {warm['seconds']:.1f}s")
        write_reports(data, args.out)
        previous = None
        for n in args.tokens:
            estimates: dict[str, float] = {}
            if previous is not None:
                scale = n / previous["stream_tokens"]
                for name, d in previous["phases"].items():
                    if d.get("status") == "ok":
                        estimates[name] = d["phase_seconds"] * scale ** _EXPONENT.get(name, 1.0)
                total = sum(estimates.values())
                left = deadline - time.perf_counter()
                if total > left:
                    why = (f"estimated {total:.0f}s (scaled from {previous['target_tokens']} tokens) > "
                           f"{left:.0f}s left of the {args.budget_s:.0f}s budget")
                    log(f"size {n} skipped: {why}")
                    data["results"].append({"target_tokens": n, "skipped": why})
                    write_reports(data, args.out)
                    continue
            res: dict = {"target_tokens": n}
            data["results"].append(res)
            try:
                corpus = Corpus(paragraphs, lengths, lm, recipe, n, args.docs, tmp / f"corpus-{n}", args.ratio)
                run_size(lm, corpus, args, tmp, deadline, estimates, res, lambda: write_reports(data, args.out))
            except Exception as e:  # e.g. the corpus: record, go on with the next size
                res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                res["traceback"] = traceback.format_exc()[-4000:]
                log(f"size {n} FAILED: {traceback.format_exc()}")
                write_reports(data, args.out)
                continue
            except KeyboardInterrupt:  # `timeout --signal=INT`: keep what was measured
                res.setdefault("notes", []).append("interrupted (time limit) during this size")
                data["notes"].append(f"interrupted during size {n}")
                write_reports(data, args.out)
                log(f"interrupted during size {n}; wrote what was measured")
                return 130
            shutil.rmtree(corpus.folder, ignore_errors=True)
            write_reports(data, args.out)
            previous = res
        kernel_times(lm, data, args, deadline, lambda: write_reports(data, args.out))
    write_reports(data, args.out)
    t = data.get("targets") or {}
    log("targets at {}: {}".format(t.get("size"), ", ".join(f"{k} {v['result']}" for k, v in t.items()
                                                            if isinstance(v, dict))))
    log(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'} in {data['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
