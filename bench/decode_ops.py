#!/usr/bin/env python
"""Host work per decode step on the CUDA code path, counted on a CPU: aten ops and kernel launches.

A GPU decode step of a small batch is bound by what the host issues: every aten op and every
Triton launch costs microseconds of CPU whatever the device does. This runs kvcompile's CUDA
attention path on CPU tensors (``TRITON_INTERPRET=1``, ``uses_kernel`` forced on) and counts,
for one decode token's forward after the question:

- ``aten::`` events (``torch.profiler``, CPU activity; nested calls included), and
- Triton kernel launches, by kernel,

over a tiny random Llama (4 layers, hidden 512, 16 query / 8 KV heads, head_dim 64; the shape
of ``bench/runtime.py``) and a ~2k-token corpus, for two packs at ratio 0.25:

- ``fp16``: the ragged rows, attended by ``ragged_attention``;
- ``int4``: integer codes attended directly (``quant_attention``: dequantise and rotate in the kernel);
- ``fp16+sparse``: the fp16 pack with sparse decode (``--sparse auto``, kvcompile/sparse.py):
  ``page_logits``, the choice of rows in PyTorch, then ``gathered_attention``.

The interpreter's own work inside a launch (it copies tensor arguments for numpy) is not
counted: each launch runs under a ``record_function`` marker and aten events below it are
dropped. The fallback that decodes a layer before attending (RVQ, interleaved rotaries) is
not counted: off CUDA it decodes with the PyTorch references, not the kernels it uses on a GPU.
Counts do not depend on the machine's speed, only on the code path. Writes
``decode-ops.json`` and ``decode-ops.md`` (``make bench``; a minute on 2 cores).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run in numpy on CPU tensors

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from kvcompile.kernels import attention, dequant, quant_attention, rope, rvq, sparse  # noqa: E402
from runtime import QUESTION, make_corpus, make_model  # noqa: E402

import kvcompile  # noqa: E402
import kvcompile.cache  # noqa: E402
from kvcompile.builder import BuildOptions  # noqa: E402
from kvcompile.cache import forward  # noqa: E402
from kvcompile.encoded import EncodedKV  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.pipeline import build  # noqa: E402
from kvcompile.recipe import load_recipe  # noqa: E402

KERNELS = {attention: ("_ragged_attention_kernel", "_combine_kernel"), quant_attention: ("_quant_attention_kernel",),
           dequant: ("_dequant_kernel",), rope: ("_rope_kernel",), rvq: ("_rvq_kernel",),
           sparse: ("_page_logits_kernel", "_gathered_attention_kernel")}


class _Counted:
    """A kernel whose launches (``kernel[grid](...)``) are counted."""

    def __init__(self, kernel, name: str, launches: Counter):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches[self.name] += 1
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with torch.profiler.record_function(LAUNCH):
                return launch(*args, **kwargs)
        return run


LAUNCH = "triton launch"


def count(prof) -> dict:
    """aten events outside kernel launches: all, and top level (no aten ancestor)."""
    events, top = [], 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None and parent.name != LAUNCH:
            nested |= parent.name.startswith("aten::")
            parent = parent.cpu_parent
        if parent is None:  # not inside a launch
            events.append(e)
            top += not nested
    return {"aten_ops": len(events), "top_level_aten_ops": top}


def one_step(session, lm) -> dict:
    """Ops and launches of one decode token's forward, after the question was prefilled."""
    from torch.profiler import ProfilerActivity, profile

    cache = session.cache(capacity=64)
    ids = lm.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    with kvcompile.attention.pack_attention(lm.model), torch.no_grad():
        forward(lm.model, torch.tensor([ids]), cache, logits_to_keep=1)
        launches: Counter = Counter()
        saved = {(m, n): getattr(m, n) for m, names in KERNELS.items() for n in names}
        for (m, n), k in saved.items():
            setattr(m, n, _Counted(k, n.strip("_"), launches))
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                forward(lm.model, torch.tensor([[ids[-1]]]), cache, logits_to_keep=1)
        finally:
            for (m, n), k in saved.items():
                setattr(m, n, k)
    out = count(prof)
    out["launches"] = dict(launches)
    out["launches_total"] = sum(launches.values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "runtime")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="decode-ops-") as tmp:
        tmp = Path(tmp)
        lm = load_model(str(make_model(tmp / "model")), device="cpu", progress=False)
        source = make_corpus(tmp / "corpus")
        packs = {}
        for quant in ("none", "int4"):
            packs[quant] = tmp / f"{quant}.kvpack"
            build([tmp / "corpus"], packs[quant], lm, load_recipe("qa"),
                  BuildOptions(ratio=0.25, chunk_size=512, quant=quant))
        kvcompile.cache.uses_kernel = lambda device: True  # the CUDA path, on CPU tensors
        kvcompile.attention.uses_kernel = kvcompile.cache.uses_kernel
        results["fp16"] = one_step(kvcompile.load(packs["none"]).session(lm), lm)
        results["fp16+sparse"] = one_step(kvcompile.load(packs["none"]).session(lm).sparsify(), lm)
        session = kvcompile.load(packs["int4"]).session(lm)
        assert all(isinstance(layer, EncodedKV) and layer.attends_encoded for layer in session.kv)
        results["int4"] = one_step(session, lm)
    data = {"date": time.strftime("%Y-%m-%d"), "model": "tiny random Llama, 4 layers, 16/8 heads, head_dim 64",
            "corpus": f"~2k tokens ({source}), ratio 0.25", "command": "python bench/decode_ops.py", "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode-ops.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    lines = ["# Host work per decode step on the CUDA path (counted on a CPU)", "",
             f"{data['model']}; {data['corpus']}; {data['date']}. One decode token's forward after the question, "
             "kvcompile's CUDA attention path run on CPU tensors in Triton's interpreter. Reproduce: "
             f"`{data['command']}`. What each column means: `bench/decode_ops.py`'s docstring.", "",
             "| pack | aten ops (top level) | kernel launches | launches by kernel |", "|---|---|---|---|"]
    for name, r in results.items():
        by = ", ".join(f"{k} {v}" for k, v in sorted(r["launches"].items()))
        lines.append(f"| {name} | {r['aten_ops']} ({r['top_level_aten_ops']}) | {r['launches_total']} | {by} |")
    (args.out / "decode-ops.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
