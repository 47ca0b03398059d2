"""The Triton kernels of ``kvcompile.kernels`` against their PyTorch references, on CPU.

The kernels run in Triton's interpreter (``TRITON_INTERPRET=1``: numpy on CPU tensors). Triton 3.x
reads that variable whenever ``@triton.jit`` decorates a function: for our kernels when their
module is imported, and for triton's own library functions that kernels call (``tl.cdiv``,
``tl.max``, ``tl.sum``, ``tl.zeros``) when ``triton`` itself is first imported. A process is
therefore either an interpreter process or a compiler process, for good: set too late, the
interpreter fails with "Cannot call @triton.jit'd outside of the scope of a kernel"; set
globally in a shared pytest process, it would turn the CUDA tests (``test_kernels_cuda.py``)
and any other CUDA use of the kernels in that session into slow interpreter runs.

So this module runs in-process only where that cannot hurt: ``TRITON_INTERPRET=1`` was already
set by the caller, or the machine has no CUDA device and triton is not imported yet (then it sets
the variable before importing triton). Anywhere else (a GPU machine, or triton imported earlier
without it) the same tests run in a child pytest process with the variable set, reported by
:func:`test_interpreter_suite_in_subprocess` (the only test collected in the parent).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, see above

triton = pytest.importorskip("triton")

from kvcompile.kernels import attention as attn  # noqa: E402
from kvcompile.kernels import dequant as dequant_mod  # noqa: E402
from kvcompile.kernels import quant_attention as qattn  # noqa: E402
from kvcompile.kernels import rope as rope_mod  # noqa: E402
from kvcompile.kernels import rvq as rvq_mod  # noqa: E402
from triton.runtime import JITFunction  # noqa: E402

# True when this process's triton (library and our kernels) runs in the interpreter.
IN_PROCESS = (
    os.environ.get("TRITON_INTERPRET") == "1"
    and not isinstance(triton.language.standard.cdiv, JITFunction)
    and attn._INTERPRETED
)


def test_interpreter_suite_in_subprocess():
    if IN_PROCESS:
        pytest.skip("this process is an interpreter process: the tests run here")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    output = f"{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"interpreter tests failed in a child process:\n{output}"


def test_kernels_are_interpreted():
    assert attn._INTERPRETED
    assert not isinstance(rope_mod._rope_kernel, JITFunction)


# ----------------------------------------------------------------------------- inputs


def make_inputs(
    lengths,
    batch=1,
    group=4,
    head_dim=64,
    q_len=1,
    t=1,
    dtype=torch.float32,
    views=False,
    offsets_dtype=torch.int32,
    seed=0,
):
    """Random inputs of :func:`ragged_attention` (a dict of its keyword arguments).

    ``views``: query as a transpose view of ``[B, q_len, Hq, D]``, keys/values as ``buf[:, :, :t]``
    of a longer buffer, prefix rows as a column slice of a wider tensor (non-unit row stride).
    """
    g = torch.Generator().manual_seed(seed)
    heads = len(lengths)
    rows = sum(lengths)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if views:
        prefix_keys = randn(rows, head_dim + 16)[:, 8 : 8 + head_dim]
        prefix_values = randn(rows, 2 * head_dim)[:, head_dim:]
        keys = randn(batch, heads, t + 5, head_dim)[:, :, :t]
        values = randn(batch, heads, t + 3, head_dim)[:, :, :t]
        query = randn(batch, q_len, heads * group, head_dim).transpose(1, 2)
    else:
        prefix_keys, prefix_values = randn(rows, head_dim), randn(rows, head_dim)
        keys, values = randn(batch, heads, t, head_dim), randn(batch, heads, t, head_dim)
        query = randn(batch, heads * group, q_len, head_dim)
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=offsets_dtype)
    return dict(
        query=query,
        prefix_keys=prefix_keys,
        prefix_values=prefix_values,
        offsets=offsets,
        max_len=max(lengths),
        keys=keys,
        values=values,
        scaling=head_dim**-0.5,
    )


TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    # bf16 outputs may differ by one ulp (the interpreter truncates fp32 -> bf16)
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def check_attention(inputs, num_splits):
    out = attn.ragged_attention(**inputs, num_splits=num_splits)
    ref = attn.ragged_attention_reference(**inputs)
    batch, q_heads, q_len, head_dim = inputs["query"].shape
    assert out.shape == (batch, q_len, q_heads, head_dim) and out.is_contiguous()
    assert out.dtype == inputs["query"].dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[out.dtype])
    return out


# ----------------------------------------------------------------------------- attention kernel

# (lengths per KV head, batch, group, head_dim, q_len, t, dtype, num_splits, views)
CASES = {
    "decode-g4-d64": ([0, 1, 63, 65], 2, 4, 64, 1, 1, torch.float32, 1, False),
    "decode-g4-d64-splits": ([0, 1, 63, 65], 2, 4, 64, 1, 1, torch.float32, 3, False),
    "decode-g8-d128-bf16": ([5, 0, 64, 1], 1, 8, 128, 1, 2, torch.bfloat16, 1, False),
    "decode-g8-d128-bf16-splits": ([5, 0, 64, 1], 1, 8, 128, 1, 2, torch.bfloat16, 4, False),
    "decode-g1-views": ([17, 0, 1], 2, 1, 64, 1, 3, torch.float32, 2, True),
    "prefill-g4-t>q": ([9, 0, 33], 1, 4, 64, 5, 9, torch.float32, 1, False),
    "prefill-g4-t>q-splits": ([9, 0, 33], 2, 4, 64, 5, 9, torch.float32, 3, True),
    "prefill-g1-t=q": ([31, 1], 1, 1, 128, 7, 7, torch.float32, 1, False),
    "prefill-g1-t=q-splits": ([31, 1], 1, 1, 128, 7, 7, torch.float32, 5, False),
    "prefill-g8-bf16-views": ([3, 65], 2, 8, 64, 3, 4, torch.bfloat16, 2, True),
    "prefill-fp16": ([12, 40], 1, 4, 64, 4, 6, torch.float16, 2, False),
    # 20 tokens x 4 heads = 80 rows: two M tiles, the first one skips the late new tokens
    "prefill-two-m-tiles": ([64, 2], 1, 4, 32, 20, 24, torch.float32, 1, False),
    "prefill-two-m-tiles-splits": ([64, 2], 1, 4, 32, 20, 24, torch.float32, 3, True),
    # more splits than key blocks: some splits own nothing at all
    "many-empty-splits": ([1, 0, 2], 1, 4, 16, 2, 2, torch.float32, 8, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_ragged_attention_matches_reference(case):
    lengths, batch, group, head_dim, q_len, t, dtype, splits, views = case
    inputs = make_inputs(lengths, batch, group, head_dim, q_len, t, dtype, views=views, seed=len(lengths) + q_len)
    check_attention(inputs, splits)


def test_ragged_attention_auto_splits_int64_offsets():
    # A 300-row head makes the automatic heuristic split decode (8 programs on a default 132 SMs).
    inputs = make_inputs([300, 7, 0], group=4, head_dim=16, q_len=1, t=1, offsets_dtype=torch.int64)
    assert attn.choose_num_splits(3, 300 + 1, attn.DEFAULT_SM_COUNT) == 2
    check_attention(inputs, None)


def test_split_count_does_not_change_the_result():
    inputs = make_inputs([70, 0, 129], batch=1, group=4, head_dim=32, q_len=2, t=3)
    outs = [check_attention(inputs, splits) for splits in (1, 2, 5)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 3])
def test_query_that_sees_nothing_gets_zeros(splits):
    # t = 0: the queries see only the prefix; head 0 is empty, so its queries see nothing.
    inputs = make_inputs([0, 5, 1], batch=2, group=2, head_dim=16, q_len=2, t=0)
    out = check_attention(inputs, splits)
    assert out[:, :, :2].abs().max() == 0
    assert out[:, :, 2:].abs().min() > 0


def test_non_contiguous_last_dim_is_copied():
    inputs = make_inputs([5, 9], batch=2, group=2, head_dim=16, q_len=2, t=3)
    inputs["query"] = torch.stack([inputs["query"], inputs["query"]], dim=-1)[..., 0]  # last-dim stride 2
    inputs["prefix_keys"] = inputs["prefix_keys"].t().contiguous().t()  # column-major
    assert inputs["query"].stride(-1) == 2 and inputs["prefix_keys"].stride(-1) != 1
    check_attention(inputs, 2)


def test_no_prefix_at_all_is_causal_attention():
    inputs = make_inputs([0, 0], batch=1, group=2, head_dim=32, q_len=4, t=6)
    out = check_attention(inputs, 2)
    q, k, v = inputs["query"], inputs["keys"], inputs["values"]
    mask = torch.ones(4, 6, dtype=torch.bool).tril(2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, sdpa.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_empty_inputs():
    inputs = make_inputs([3, 4], batch=1, group=2, head_dim=16, q_len=1, t=1)
    inputs["query"] = inputs["query"][:, :, :0]
    assert attn.ragged_attention(**inputs).shape == (1, 0, 4, 16)


def _head_dim_48(d):
    for name in ("query", "keys", "values", "prefix_keys", "prefix_values"):
        d[name] = d[name][..., :48]


@pytest.mark.parametrize(
    "change, message",
    [
        (_head_dim_48, "power of two"),
        (lambda d: d.update(query=d["query"][:, :3]), "multiple"),
        (lambda d: d.update(offsets=d["offsets"].float()), "offsets"),
        (lambda d: d.update(offsets=d["offsets"][:-1]), "offsets"),
        (lambda d: d.update(keys=d["keys"].half()), "dtype|share"),
        (lambda d: d.update(prefix_values=d["prefix_values"][:, :32]), "prefix"),
    ],
)
def test_invalid_inputs_raise(change, message):
    inputs = make_inputs([3, 4], group=2, head_dim=64)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        attn.ragged_attention(**inputs)


def test_choose_num_splits():
    # 8 KV heads, one decode token, 30k-row prefix: fill 2 x 132 SMs.
    assert attn.choose_num_splits(8, 30_000 + 1, 132) == 33
    # short prefix: every split keeps >= MIN_KEYS_PER_SPLIT keys
    assert attn.choose_num_splits(8, 1000, 132) == 4
    assert attn.choose_num_splits(8, 200, 132) == 1
    # prefill of 2048 tokens x 4 heads in 64-row tiles x 8 KV heads: already 1024 programs
    assert attn.choose_num_splits(1024, 30_000, 132) == 1
    assert attn.choose_num_splits(1, 10**7, 132) == attn.MAX_SPLITS


# ----------------------------------------------------------------------------- the spec itself


def attention_float64_loop(query, prefix_keys, prefix_values, offsets, max_len, keys, values, scaling):
    """Independent of the reference: one softmax per (batch, query head, token), in float64."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, t = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    bounds = offsets.tolist()
    out = torch.zeros(batch, q_len, q_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for qh in range(q_heads):
            h = qh // group
            pk = prefix_keys[bounds[h] : bounds[h + 1]].double()
            pv = prefix_values[bounds[h] : bounds[h + 1]].double()
            for i in range(q_len):
                visible = max(0, min(t, t - q_len + i + 1))  # new tokens 0 .. t - q_len + i
                k = torch.cat([pk, keys[b, h, :visible].double()])
                v = torch.cat([pv, values[b, h, :visible].double()])
                if k.shape[0] == 0:
                    continue
                w = torch.softmax(k @ query[b, qh, i].double() * scaling, dim=0)
                out[b, i, qh] = w @ v
    return out


@pytest.mark.parametrize(
    "lengths, batch, group, q_len, t",
    [([4, 0, 1], 2, 2, 1, 1), ([6, 3], 1, 4, 3, 5), ([0, 2], 1, 1, 4, 4), ([0, 3], 2, 2, 2, 0)],
)
def test_reference_matches_float64_loop(lengths, batch, group, q_len, t):
    inputs = make_inputs(lengths, batch, group, 16, q_len, t, views=True)
    ref = attn.ragged_attention_reference(**inputs)
    torch.testing.assert_close(ref.double(), attention_float64_loop(**inputs), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- rope


@pytest.mark.parametrize(
    "rows, head_dim, rotary, dtype, views",
    [
        (37, 64, 64, torch.float32, False),
        (37, 64, 32, torch.float32, True),  # partial rotary
        (50, 128, 128, torch.bfloat16, False),
        (50, 128, 96, torch.bfloat16, True),  # R / 2 = 48: not a power of two
        (33, 64, 48, torch.float16, False),
        (5, 32, 0, torch.float32, False),  # nothing rotated
    ],
)
def test_rope_matches_reference(rows, head_dim, rotary, dtype, views):
    g = torch.Generator().manual_seed(rows + rotary)
    x = torch.randn(rows, head_dim + (8 if views else 0), generator=g).to(dtype)[:, :head_dim]
    angles = torch.randn(rows, rotary // 2, generator=g) * 10
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    if views:
        cos, sin = cos.t().contiguous().t(), sin.t().contiguous().t()  # column-major
    out = rope_mod.rope(x, cos, sin)
    ref = rope_mod.rope_reference(x, cos, sin)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(out[:, rotary:], x[:, rotary:], atol=0, rtol=0)


def test_rope_reference_is_a_rotation():
    # Pairs (c, c + R/2) rotate by the angle of channel c: compare with complex multiplication.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 24, generator=g, dtype=torch.float64)
    angles = torch.randn(9, 8, generator=g, dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    z = torch.complex(x[:, :8], x[:, 8:16]) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat([z.real, z.imag, x[:, 16:]], dim=-1)
    torch.testing.assert_close(rope_mod.rope_reference(x, cos, sin), expected)


def test_rope_invalid_inputs_raise():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError):
        rope_mod.rope(x, torch.randn(4, 5), torch.randn(4, 5))  # odd R
    with pytest.raises(ValueError):
        rope_mod.rope(x, torch.randn(4, 32), torch.randn(4, 32))  # R > D
    with pytest.raises(ValueError):
        rope_mod.rope(x, torch.randn(3, 8), torch.randn(3, 8))  # rows differ


# ----------------------------------------------------------------------------- dequantisation


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per, group", [("channel", 32), ("channel", 3), ("token", 8), ("token", 16)])
@pytest.mark.parametrize("head_dim", [16, 64, 80])  # 80: not a power of two
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_reference_and_codec(bits, per, group, head_dim, dtype):
    from kvcompile.codecs import make_codec
    from kvcompile.codecs.integer import row_groups

    if per == "token" and head_dim % group:
        pytest.skip("a value group must divide head_dim")
    runs = [7, 0, 45, 1, 12]  # ragged runs: empty, single-row, partial groups
    codec = make_codec("int", bits=bits, per=per, group=group)
    g = torch.Generator().manual_seed(bits * head_dim + group)
    x = torch.randn(sum(runs), head_dim, generator=g) * 3 + torch.randn(head_dim, generator=g) * 5
    encoded = codec.encode(x, runs)
    groups = row_groups(runs, group)[0].to(torch.int32) if per == "channel" else None
    args = (encoded["codes"], encoded["scales"], encoded["zeros"], groups, bits, 0 if per == "channel" else group,
            head_dim, dtype)
    out = dequant_mod.dequantize(*args)
    ref = dequant_mod.dequantize_reference(*args)
    assert out.shape == (sum(runs), head_dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(ref.float(), codec.decode(encoded, runs, head_dim).to(dtype).float(), atol=0, rtol=0)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("depth, size, group, head_dim", [(1, 4, 8, 16), (4, 16, 32, 64), (3, 8, 16, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rvq_decode_matches_reference_and_codec(interleave, depth, size, group, head_dim, dtype):
    from kvcompile.codecs import make_codec

    codec = make_codec("rvq", depth=depth, size=size, group=group, interleave=interleave)
    g = torch.Generator().manual_seed(depth * head_dim)
    x = torch.randn(77, head_dim, generator=g) * 2
    e = codec.encode(x, [77])
    args = (e["codes"], e["codebooks"], e["scales"], interleave, head_dim, dtype)
    out, ref = rvq_mod.rvq_decode(*args), rvq_mod.rvq_decode_reference(*args)
    assert out.shape == (77, head_dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(ref.float(), codec.decode(e, [77], head_dim).to(dtype).float(), **TOLERANCE[dtype])


def test_dequantize_of_nothing_is_empty():
    out = dequant_mod.dequantize(torch.empty(0, 8, dtype=torch.uint8), torch.empty(0, 2, dtype=torch.float16),
                                 torch.empty(0, 2, dtype=torch.float16), None, 4, 8, 16, torch.float16)
    assert out.shape == (0, 16)


# ----------------------------------------------------------------------------- packaging


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import kvcompile.kernels as k\n"
        "assert not k.triton_available()\n"
        "try:\n    k.ragged_attention\nexcept ImportError:\n    pass\n"
        "else:\n    raise AssertionError('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_lazy_exports():
    import kvcompile.kernels as k

    assert k.triton_available()
    assert callable(k.ragged_attention) and callable(k.rope_reference)
    assert set(k.__all__) >= {"ragged_attention", "ragged_attention_reference", "rope", "rope_reference"}
    assert math.isclose(attn.LOG2E, 1 / math.log(2))


# ----------------------------------------------------------------------------- model features

def with_features(inputs, window=None, softcap=None, sinks=False, start=None, seed=0):
    """``inputs`` plus sorted prefix positions below ``start`` per head, and the features asked for."""
    g = torch.Generator().manual_seed(seed)
    offsets = inputs["offsets"].long()
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    start = start if start is not None else 2 * max(lengths) + 8
    positions = torch.cat([torch.randperm(start, generator=g)[:n].sort().values for n in lengths]).to(torch.int32)
    q_heads = inputs["query"].shape[1]
    extra = dict(prefix_positions=positions, start=start, window=window, softcap=softcap,
                 sinks=torch.randn(q_heads, generator=g) * 2 if sinks else None)
    return {**inputs, **extra}


FEATURES = {
    "window-decode": dict(window=20),
    "window-prefill": dict(window=6),
    "window-wider-than-all": dict(window=10_000),
    "softcap": dict(softcap=5.0),
    "sinks": dict(sinks=True),
    "all": dict(window=9, softcap=3.0, sinks=True),
}


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("name", FEATURES)
def test_window_softcap_and_sinks_match_reference(name, splits):
    features = FEATURES[name]
    q_len, t = (1, 2) if "decode" in name else (5, 9)
    inputs = make_inputs([9, 0, 33, 70], 2, 2, 32, q_len, t, torch.float32, seed=5)
    inputs["query"] = inputs["query"] * 4  # large scores, so the cap and the sinks matter
    check_attention(with_features(inputs, **features), splits)


def test_features_change_the_result():
    """The feature tests can fail: each feature changes the output."""
    base = make_inputs([9, 0, 33, 70], 1, 2, 32, 5, 9, torch.float32, seed=5)
    base["query"] = base["query"] * 4
    plain = attn.ragged_attention(**with_features(base), num_splits=1)
    for name, features in FEATURES.items():
        if name != "window-wider-than-all":
            out = attn.ragged_attention(**with_features(base, **features), num_splits=1)
            assert (out - plain).abs().max() > 1e-3, name


def test_a_window_needs_positions():
    inputs = make_inputs([3, 4], 1, 2, 16, 1, 1, torch.float32)
    with pytest.raises(ValueError, match="prefix_positions"):
        attn.ragged_attention(**inputs, window=4)


@pytest.mark.parametrize("arch, overrides", [("gemma2", dict(sliding_window=48)),
                                             ("gpt_oss", dict(sliding_window=48, num_local_experts=4,
                                                              num_experts_per_tok=2))],
                         ids=["gemma2-softcap-window", "gpt_oss-sinks-window"])
def test_models_with_windows_softcaps_and_sinks_answer_alike_through_the_kernel(arch, overrides, tiny_corpus,
                                                                                  tmp_path, monkeypatch):
    """The kernel path of a pack's attention (CUDA's, run here on CPU tensors in the interpreter)
    gives the padded reference's answer for layers with windows, softcaps and sinks."""
    import kvcompile
    import kvcompile.cache
    from kvcompile.builder import BuildOptions
    from kvcompile.models import load_model, make_tiny_model
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    torch.set_num_threads(1)
    lm = load_model(str(make_tiny_model(tmp_path / arch, arch=arch, **overrides)), device="cpu", progress=False)
    path = tmp_path / "p.kvpack"
    build([tiny_corpus], path, lm, load_recipe("qa"), BuildOptions(ratio=0.5, chunk_size=128, codec="fp32"))
    pack = kvcompile.load(path)
    question = "How long is the password reset link valid?"
    reference = pack.session(lm).first_token_logits(question)
    monkeypatch.setattr(kvcompile.cache, "uses_kernel", lambda device: True)
    session = pack.session(lm)
    assert session.cache().layers[0].pad is None
    torch.testing.assert_close(session.first_token_logits(question), reference, atol=1e-4, rtol=1e-4)



# ----------------------------------------------------------------------------- attention over codes


def quant_inputs(lengths, group=4, head_dim=64, q_len=1, t=1, dtype=torch.float32, kbits=4, vbits=2, outliers=0.0,
                 rotary="full", key_group=32, value_group=16, seed=0):
    """Keyword arguments of :func:`quant_attention`: the prefix of :func:`make_inputs` encoded
    by kvcompile's integer codecs (each head's rows in two runs, as two segments would be),
    keys before RoPE at positions up to ~40k, ``rotary`` "full", "partial" (half the
    channels) or None. Also returns the codecs, the runs and the encoded tensors."""
    from kvcompile.codecs import make_codec
    from kvcompile.codecs.integer import row_groups

    base = make_inputs(lengths, 1, group, head_dim, q_len, t, dtype, seed=seed)
    runs = [r for n in lengths for r in (n // 3, n - n // 3)]
    g = torch.Generator().manual_seed(seed + 1)
    # keys with a few large channels (as KIVI sees them), values plain
    xk = torch.randn(sum(lengths), head_dim, generator=g) * (1 + 4 * (torch.rand(head_dim, generator=g) > 0.9))
    xv = torch.randn(sum(lengths), head_dim, generator=g)
    kc = make_codec("int", bits=kbits, per="channel", group=key_group, outliers=outliers)
    vc = make_codec("int", bits=vbits, per="token", group=value_group, outliers=outliers)
    ek, ev = kc.encode(xk, runs), vc.encode(xv, runs)

    def rows(codec, e, groups):
        return qattn.QuantRows(e["codes"], e["scales"], e["zeros"], groups, codec.bits,
                               0 if codec.per == "channel" else codec.group, codec.exact_index(e, runs),
                               e.get("outliers"))

    positions = torch.randint(0, 40000, (sum(lengths),), generator=g)
    rot = {"full": head_dim, "partial": head_dim // 2, None: 0}[rotary]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)) if rot else None
    kwargs = dict(query=base["query"], prefix_keys=rows(kc, ek, row_groups(runs, key_group)[0].to(torch.int32)),
                  prefix_values=rows(vc, ev, None), offsets=base["offsets"], max_len=base["max_len"],
                  keys=base["keys"], values=base["values"], scaling=base["scaling"], positions=positions,
                  inv_freq=inv_freq, rope_scale=1.0 if rotary != "partial" else 1.25)
    return kwargs, (kc, vc, runs, ek, ev)


QUANT_CASES = {
    # name: (lengths, quant_inputs options, quant_attention options)
    "int4/int2-gqa4": ([70, 33, 0, 129], dict(), dict()),
    "int3/int3-odd-groups": ([45, 91], dict(kbits=3, vbits=3, key_group=7, value_group=8), dict()),
    "int8/int4-mha": ([64, 1, 100], dict(group=1, kbits=8, vbits=4), dict()),
    "int2/int2-outliers": ([50, 77, 12], dict(kbits=2, outliers=0.1), dict()),
    "partial-rotary-scaled": ([40, 90], dict(rotary="partial", outliers=0.05), dict()),
    "no-rotary": ([33, 66], dict(rotary=None), dict()),
    "prefill-q5-t9": ([60, 20], dict(q_len=5, t=9), dict()),
    "split-3": ([300, 129, 7], dict(), dict(num_splits=3)),
    "softcap-sinks": ([80, 40], dict(), dict(softcap=5.0, sinks=True)),
    "empty-heads-t0": ([0, 0], dict(t=0), dict()),
}


def _quant_case(name, dtype):
    lengths, opts, call = QUANT_CASES[name]
    kwargs, extra = quant_inputs(lengths, dtype=dtype, **opts)
    call = dict(call)
    if call.pop("sinks", False):
        call["sinks"] = torch.randn(kwargs["query"].shape[1])
    if name == "empty-heads-t0":
        kwargs["query"] = kwargs["query"][:, :, :0]
    return {**kwargs, **call}, extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_quant_attention_matches_reference(name, dtype):
    kwargs, _ = _quant_case(name, dtype)
    out = qattn.quant_attention(**kwargs)
    ref = qattn.quant_attention_reference(**kwargs)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])


def test_quant_attention_reference_is_the_codecs_rows_rotated_like_the_model():
    """The spec's prefix: the codecs' own decode (exact rows in place), rotated as
    kvcompile.rope does with the model's cos/sin (computed here in float64 for the check)."""
    from kvcompile.rope import apply_rope

    kwargs, (kc, vc, runs, ek, ev) = quant_inputs([50, 77], outliers=0.1, rotary="partial")
    d = kwargs["query"].shape[3]
    keys = kwargs["prefix_keys"].reference(d)
    torch.testing.assert_close(keys, kc.decode(ek, runs, d), atol=0, rtol=0)
    torch.testing.assert_close(kwargs["prefix_values"].reference(d), vc.decode(ev, runs, d), atol=0, rtol=0)
    angles = kwargs["positions"].double()[:, None] * kwargs["inv_freq"].double()[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    rotated = apply_rope(keys.double(), angles.cos() * 1.25, angles.sin() * 1.25)
    cos, sin = qattn.rotary_cos_sin(kwargs["positions"], kwargs["inv_freq"], 1.25)
    torch.testing.assert_close(apply_rope(keys, cos, sin).double(), rotated, atol=2e-2, rtol=1e-3)


def test_quant_attention_rotates_far_positions_as_the_model_does():
    """Positions of a 128k context (angles of ~1e5 radians): the kernel's two-step range
    reduction keeps the rotation that of transformers' fp32 angles (the reference: torch's
    cos/sin of the same fp32 products) to fp32 accuracy."""
    kwargs, _ = quant_inputs([64, 64], group=1, kbits=8, vbits=8, rotary="full")
    kwargs["positions"] = 120000 + torch.arange(128) * 37
    torch.testing.assert_close(qattn.quant_attention(**kwargs), qattn.quant_attention_reference(**kwargs),
                               atol=1e-4, rtol=1e-4)


def test_quant_attention_refuses_bad_inputs():
    kwargs, _ = quant_inputs([10, 20])
    with pytest.raises(ValueError, match="positions"):
        qattn.quant_attention(**{**kwargs, "positions": kwargs["positions"][:5]})
    with pytest.raises(ValueError, match="inv_freq"):
        qattn.quant_attention(**{**kwargs, "inv_freq": torch.ones(64)})
    p = kwargs["prefix_values"]
    with pytest.raises(ValueError, match="codes"):
        qattn.quant_attention(**{**kwargs, "prefix_values": qattn.QuantRows(p.codes[:3], p.scales, p.zeros, None,
                                                                             p.bits, p.group)})
    with pytest.raises(ValueError, match="group"):
        qattn.QuantRows(p.codes, p.scales, p.zeros, None, p.bits, 0)



@pytest.mark.parametrize("arch, overrides, quant, outliers", [
    ("llama", {}, "int4", 0.1),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 256}}, "int3", 0.0),
    ("gemma2", dict(sliding_window=48, attn_logit_softcapping=1e-3), "int2", 0.05),
    ("cohere", {}, "int4", 0.0),
], ids=["llama-int4-exact-rows", "yarn-int3", "gemma2-softcap-window-int2", "cohere-interleaved-int4"])
def test_quantised_packs_answer_alike_through_the_kernel_over_codes(arch, overrides, quant, outliers, tiny_corpus,
                                                                    tmp_path, monkeypatch):
    """The CUDA path of a quantised pack (run here on CPU tensors in the interpreter): layers the
    kernel can read stay codes (quant_attention, RoPE in the kernel; a yarn rotary's scaling
    included), windowed layers are decoded at load, and an interleaved rotary (Cohere) falls
    back to decoding per call. The answer is the padded CPU reference's."""
    import kvcompile
    import kvcompile.cache
    from kvcompile.builder import BuildOptions
    from kvcompile.encoded import EncodedKV
    from kvcompile.models import load_model, make_tiny_model
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    torch.set_num_threads(1)
    lm = load_model(str(make_tiny_model(tmp_path / arch, arch=arch, **overrides)), device="cpu", progress=False)
    path = tmp_path / "p.kvpack"
    build([tiny_corpus], path, lm, load_recipe("qa"),
          BuildOptions(ratio=0.5, chunk_size=128, codec="fp32", quant=quant, quant_group=8, quant_outliers=outliers))
    pack = kvcompile.load(path)
    question = "How long is the password reset link valid?"
    reference = pack.session(lm).first_token_logits(question)
    monkeypatch.setattr(kvcompile.cache, "uses_kernel", lambda device: True)
    calls = []
    attend = EncodedKV.attend
    monkeypatch.setattr(EncodedKV, "attend", lambda self, *a, **k: calls.append(1) or attend(self, *a, **k))
    session = pack.session(lm)
    encoded = [layer for layer in session.kv if isinstance(layer, EncodedKV)]
    torch.testing.assert_close(session.first_token_logits(question), reference, atol=1e-4, rtol=1e-4)
    fused = [layer.attends_encoded for layer in encoded]
    if arch == "cohere":
        assert encoded and not any(fused) and not calls
    else:
        assert encoded and all(fused) and len(calls) == len(encoded)
    if arch == "gemma2":
        assert len(encoded) < len(session.kv)  # the windowed layer was decoded at load



# ----------------------------------------------------------------------------- sparse decode (kernels/sparse.py)

from kvcompile.kernels import sparse as sparse_mod  # noqa: E402

from kvcompile.ragged import RaggedKV  # noqa: E402
from kvcompile.sparse import PageSummary, Sparse, query_channels  # noqa: E402


def sparse_inputs(lengths, group, head_dim, page, channels, dtype, seed=0):
    """A layer's page summaries and a decode step's query, columns and temperatures."""
    inputs = make_inputs(lengths, group=group, head_dim=head_dim, dtype=dtype, seed=seed)
    kv = RaggedKV.from_rows(inputs["prefix_keys"], inputs["prefix_values"], torch.arange(sum(lengths)), lengths)
    summary = PageSummary.of(kv, Sparse(0.5, page, channels))
    columns, inv_temp = query_channels(inputs["query"], len(lengths), channels)
    return inputs, summary, columns, inv_temp


@pytest.mark.parametrize("lengths,group,head_dim,page,channels,dtype", [
    ([0, 7, 130], 4, 64, 2, 9, torch.float32),
    ([200, 3], 1, 16, 3, 16, torch.float32),
    ([65, 0, 9, 64], 8, 128, 1, 1, torch.bfloat16),
    ([40, 41], 3, 32, 5, 7, torch.float16),
])
def test_page_logits_kernel_equals_its_reference(lengths, group, head_dim, page, channels, dtype):
    inputs, summary, columns, inv_temp = sparse_inputs(lengths, group, head_dim, page, channels, dtype)
    args = (inputs["query"], summary.bounds, summary.page_offsets, columns, inv_temp, max(summary.pages) + 3)
    out = sparse_mod.page_logits(*args)
    ref = sparse_mod.page_logits_reference(*args)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("lengths,group,head_dim,q_len,t,dtype,num_splits", [
    ([0, 7, 130], 4, 64, 1, 1, torch.float32, 1),
    ([0, 7, 130], 4, 64, 1, 1, torch.float32, 3),
    ([65, 0, 9, 64], 8, 128, 1, 2, torch.bfloat16, 2),
    ([40, 41], 2, 32, 3, 5, torch.float16, 1),
])
def test_gathered_attention_kernel_equals_its_reference(lengths, group, head_dim, q_len, t, dtype, num_splits):
    inputs = make_inputs(lengths, batch=2, group=group, head_dim=head_dim, q_len=q_len, t=t, dtype=dtype, seed=4)
    g = torch.Generator().manual_seed(1)
    heads = len(lengths)
    offsets = inputs["offsets"].long()
    # Each (batch, head) lists a random subset of its own rows, in any order, padded with -1.
    rows = torch.full((2, heads, 24), -1, dtype=torch.int32)
    for b in range(2):
        for h in range(heads):
            own = torch.randperm(lengths[h], generator=g)[: int(torch.randint(0, 24, (1,), generator=g))]
            rows[b, h, : len(own)] = (offsets[h] + own).int()
    args = (inputs["query"], inputs["prefix_keys"], inputs["prefix_values"], rows, inputs["keys"], inputs["values"],
            inputs["scaling"])
    out = sparse_mod.gathered_attention(*args, num_splits=num_splits)
    ref = sparse_mod.gathered_attention_reference(*args)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])


def test_gathered_attention_over_every_row_is_the_ragged_kernel():
    inputs = make_inputs([0, 9, 70], group=2, head_dim=32, seed=5)
    offsets = inputs["offsets"].long()
    rows = torch.full((1, 3, 70), -1)
    for h in range(3):
        rows[0, h, : offsets[h + 1] - offsets[h]] = torch.arange(offsets[h], offsets[h + 1])
    out = sparse_mod.gathered_attention(inputs["query"], inputs["prefix_keys"], inputs["prefix_values"], rows,
                                        inputs["keys"], inputs["values"], inputs["scaling"])
    torch.testing.assert_close(out, attn.ragged_attention_reference(**inputs), **TOLERANCE[torch.float32])


if not IN_PROCESS:
    # The tests above run in the child process of test_interpreter_suite_in_subprocess; collect only that one here.
    for _name in [n for n in globals() if n.startswith("test_") and n != "test_interpreter_suite_in_subprocess"]:
        del globals()[_name]
