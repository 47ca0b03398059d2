"""The Triton kernels of ``kvcompile.kernels`` against their PyTorch references on a CUDA device.

Realistic shapes (32 query heads over 8 KV heads, head_dim 128, ragged prefixes of about 5k rows
per head, up to 30k), compiled kernels. Skipped without a CUDA device or without triton. Run it in
a process where ``TRITON_INTERPRET`` is unset (``tests/test_kernels.py`` never sets it in a
process that has a CUDA device): ``python -m pytest -q tests/test_kernels_cuda.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"


@pytest.fixture(scope="module")
def kernels():
    """``(attention module, rope module)``, compiled (never interpreted)."""
    pytest.importorskip("triton")
    from kvcompile.kernels import attention, rope

    if attention._INTERPRETED or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: run the CUDA tests in a process without it")
    return attention, rope


def make_inputs(lengths, batch, group, head_dim, q_len, t, dtype, views=False, q_std=3.0, seed=0):
    """Random inputs of ``ragged_attention`` on the GPU (a dict of its keyword arguments).

    Queries have standard deviation ``q_std`` so the softmax is peaked, not a near-uniform average
    of thousands of values (which would make any output look right). ``views``: query as the
    transpose of ``[B, q_len, Hq, D]`` (as a model's projection gives it), keys/values as
    ``buf[:, :, :t]`` of a preallocated buffer, prefix keys/values as the halves of one ``[N, 2D]``.
    """
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    heads, rows = len(lengths), sum(lengths)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE) * std).to(dtype)

    if views:
        prefix = randn(rows, 2 * head_dim)
        prefix_keys, prefix_values = prefix[:, :head_dim], prefix[:, head_dim:]
        capacity = t + 37
        keys = randn(batch, heads, capacity, head_dim)[:, :, :t]
        values = randn(batch, heads, capacity, head_dim)[:, :, :t]
        query = randn(batch, q_len, heads * group, head_dim, std=q_std).transpose(1, 2)
    else:
        prefix_keys, prefix_values = randn(rows, head_dim), randn(rows, head_dim)
        keys, values = randn(batch, heads, t, head_dim), randn(batch, heads, t, head_dim)
        query = randn(batch, heads * group, q_len, head_dim, std=q_std)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
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


# Element-wise tolerance, and a bound on ||out - ref|| / ||ref||.
TOLERANCE = {
    torch.float32: (dict(atol=1e-4, rtol=1e-4), 1e-5),
    torch.float16: (dict(atol=2e-3, rtol=1e-2), 2e-3),
    torch.bfloat16: (dict(atol=1e-2, rtol=2e-2), 1e-2),
}


def check(attention, inputs, num_splits=None):
    out = attention.ragged_attention(**inputs, num_splits=num_splits)
    ref = attention.ragged_attention_reference(**inputs)
    batch, q_heads, q_len, head_dim = inputs["query"].shape
    assert out.shape == (batch, q_len, q_heads, head_dim) and out.is_contiguous()
    assert out.dtype == inputs["query"].dtype and out.device == inputs["query"].device
    elementwise, relative = TOLERANCE[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), **elementwise)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < relative
    return out


# ~5k rows per KV head, ragged, with an empty head and a one-row head.
LENGTHS_5K = [4811, 5377, 0, 1, 5120, 4999, 6143, 3001]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("q_len, t", [(1, 1), (1, 17), (64, 64), (64, 100)])
@pytest.mark.parametrize("splits", [None, 1])
def test_attention_realistic_bf16(kernels, batch, q_len, t, splits):
    attention, _ = kernels
    inputs = make_inputs(LENGTHS_5K, batch, 4, 128, q_len, t, torch.bfloat16, views=batch == 2, seed=q_len + t)
    check(attention, inputs, splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("q_len, t", [(1, 1), (64, 80)])
def test_attention_realistic_other_dtypes(kernels, dtype, q_len, t):
    attention, _ = kernels
    check(attention, make_inputs(LENGTHS_5K, 1, 4, 128, q_len, t, dtype, views=True))


def test_attention_long_prefix_decode(kernels):
    """8 KV heads x ~30k rows, one decode token: the case the split heuristic exists for."""
    attention, _ = kernels
    lengths = [30_000, 29_517, 30_720, 12_345, 30_001, 28_000, 1, 30_000]
    inputs = make_inputs(lengths, 1, 4, 128, 1, 1, torch.bfloat16)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    assert attention.choose_num_splits(8, max(lengths) + 1, sms) > 8
    out = check(attention, inputs)
    torch.testing.assert_close(out, check(attention, inputs, 1), atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "group, head_dim, q_len, t",
    [(1, 64, 1, 1), (8, 64, 1, 5), (1, 128, 48, 48), (8, 128, 33, 40), (2, 256, 1, 1), (2, 256, 16, 20)],
)
def test_attention_groups_and_head_dims(kernels, group, head_dim, q_len, t):
    attention, _ = kernels
    lengths = [1500, 0, 777, 2048, 1, 1023, 64, 65]
    for splits in (None, 1, 7):
        check(attention, make_inputs(lengths, 2, group, head_dim, q_len, t, torch.bfloat16, views=True), splits)


def test_attention_fp32_head_dim_256(kernels):
    """fp32 with D = 256 caps the tile at 32 rows (shared memory); 40 tokens x 2 heads need 3 tiles."""
    attention, _ = kernels
    for splits in (None, 1, 3):
        check(attention, make_inputs([700, 0, 1, 333], 1, 2, 256, 40, 41, torch.float32, views=True), splits)


def test_attention_large_prefill_chunk(kernels):
    """A prefill chunk of 512 tokens: many M tiles, so the heuristic keeps one split."""
    attention, _ = kernels
    inputs = make_inputs(LENGTHS_5K, 1, 4, 128, 512, 512, torch.bfloat16, views=True)
    check(attention, inputs)


def test_attention_no_visible_keys_and_int64_offsets(kernels):
    attention, _ = kernels
    inputs = make_inputs([0, 300, 0, 5000], 2, 4, 128, 3, 0, torch.bfloat16)
    inputs["offsets"] = inputs["offsets"].long()
    out = check(attention, inputs, 4)
    assert out[:, :, :4].abs().max().item() == 0 and out[:, :, 8:12].abs().max().item() == 0


def test_attention_makes_no_host_sync(kernels):
    """No .item()/.tolist() on device tensors: safe to call in a decode loop (and to graph-capture)."""
    attention, _ = kernels
    inputs = make_inputs(LENGTHS_5K, 1, 4, 128, 1, 1, torch.bfloat16)
    attention.ragged_attention(**inputs)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention.ragged_attention(**inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    "dtype, head_dim, rotary",
    [(torch.bfloat16, 128, 128), (torch.bfloat16, 128, 64), (torch.float16, 64, 64), (torch.float32, 128, 96)],
)
def test_rope(kernels, dtype, head_dim, rotary):
    _, rope = kernels
    rows = 8 * 5000 + 3
    g = torch.Generator(device=DEVICE).manual_seed(rotary)
    x = torch.randn(rows, head_dim, generator=g, device=DEVICE).to(dtype)
    positions = torch.arange(rows, device=DEVICE, dtype=torch.float32)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, rotary, 2, device=DEVICE, dtype=torch.float32) / rotary)
    angles = torch.cat([positions * inv_freq] * 2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    out = rope.rope(x, cos, sin)
    ref = rope.rope_reference(x, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out[:, rotary:], x[:, rotary:], atol=0, rtol=0)


@pytest.mark.parametrize("features", [dict(window=4096), dict(softcap=50.0), dict(sinks=True),
                                      dict(window=1000, softcap=30.0, sinks=True)],
                         ids=["window", "softcap", "sinks", "all"])
@pytest.mark.parametrize("q_len, t", [(1, 1), (64, 100)])
def test_window_softcap_and_sinks_bf16(kernels, features, q_len, t):
    attention, _ = kernels
    inputs = make_inputs(LENGTHS_5K, 1, 4, 128, q_len, t, torch.bfloat16, seed=7)
    g = torch.Generator(device=DEVICE).manual_seed(7)
    start = 8192
    positions = torch.cat([torch.randperm(start, generator=g, device=DEVICE)[:n].sort().values for n in LENGTHS_5K])
    sinks = torch.randn(inputs["query"].shape[1], generator=g, device=DEVICE) if features.get("sinks") else None
    check(attention, {**inputs, "prefix_positions": positions, "start": start, "window": features.get("window"),
                      "softcap": features.get("softcap"), "sinks": sinks})


@pytest.mark.parametrize("bits, per", [(4, "channel"), (2, "token"), (3, "channel"), (8, "token")])
def test_dequantize_realistic(kernels, bits, per):
    """40k rows of head_dim 128 (a layer of 8 KV heads at 5k rows each), against the reference."""
    from kvcompile.kernels import dequant

    from kvcompile.codecs import make_codec
    from kvcompile.codecs.integer import row_groups

    runs = [5000 + 17 * h for h in range(8)]
    codec = make_codec("int", bits=bits, per=per, group=32)
    x = torch.randn(sum(runs), 128, generator=torch.Generator().manual_seed(bits)) * 4
    e = {k: v.to(DEVICE) for k, v in codec.encode(x, runs).items()}
    groups = row_groups(runs, 32, DEVICE)[0].to(torch.int32) if per == "channel" else None
    args = (e["codes"], e["scales"], e["zeros"], groups, bits, 0 if per == "channel" else 32, 128, torch.bfloat16)
    torch.testing.assert_close(dequant.dequantize(*args).float(), dequant.dequantize_reference(*args).float(),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("interleave", [True, False])
def test_rvq_decode_realistic(kernels, interleave):
    from kvcompile.kernels import rvq

    from kvcompile.codecs import make_codec

    codec = make_codec("rvq", depth=4, size=256, group=32, interleave=interleave)
    x = torch.randn(20000, 128, generator=torch.Generator().manual_seed(1))
    e = {k: v.to(DEVICE) for k, v in codec.encode(x, [20000]).items()}
    args = (e["codes"], e["codebooks"], e["scales"], interleave, 128, torch.bfloat16)
    torch.testing.assert_close(rvq.rvq_decode(*args).float(), rvq.rvq_decode_reference(*args).float(),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kbits, vbits, outliers", [(4, 4, 0.0), (3, 4, 0.1), (2, 2, 0.1)])
@pytest.mark.parametrize("q_len, t", [(1, 200), (16, 16)])
def test_quant_attention_realistic_bf16(kernels, kbits, vbits, outliers, q_len, t):
    """Attention over an integer-coded prefix of ~40k rows (8 KV heads, head_dim 128, GQA 4,
    keys rotated in the kernel at positions up to 30k) against the reference, split and unsplit."""
    from kvcompile.kernels import quant_attention as qa

    from kvcompile.codecs import make_codec
    from kvcompile.codecs.integer import row_groups

    lengths = LENGTHS_5K
    inputs = make_inputs(lengths, 1, 4, 128, q_len, t, torch.bfloat16)
    runs = [r for n in lengths for r in (n // 3, n - n // 3)]  # two segments per head
    g = torch.Generator().manual_seed(kbits)
    kc = make_codec("int", bits=kbits, per="channel", group=32, outliers=outliers)
    vc = make_codec("int", bits=vbits, per="token", group=32, outliers=outliers)
    parts = []
    rows = [torch.randn(sum(lengths), 128, generator=g) * 3, torch.randn(sum(lengths), 128, generator=g)]
    for codec, x in zip((kc, vc), rows):
        e = {k: v.to(DEVICE) for k, v in codec.encode(x, runs).items()}
        groups = row_groups(runs, 32, DEVICE)[0].to(torch.int32) if codec.per == "channel" else None
        parts.append(qa.QuantRows(e["codes"], e["scales"], e["zeros"], groups, codec.bits,
                                  0 if codec.per == "channel" else codec.group, codec.exact_index(e, runs),
                                  e.get("outliers")))
    positions = torch.randint(0, 30000, (sum(lengths),), generator=g).to(DEVICE)
    inv_freq = (1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))).to(DEVICE)
    kwargs = dict(query=inputs["query"], prefix_keys=parts[0], prefix_values=parts[1], offsets=inputs["offsets"],
                  max_len=inputs["max_len"], keys=inputs["keys"], values=inputs["values"], scaling=128**-0.5,
                  positions=positions, inv_freq=inv_freq)
    for splits in (None, 1):
        out = qa.quant_attention(**kwargs, num_splits=splits)
        torch.testing.assert_close(out.float(), qa.quant_attention_reference(**kwargs).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("top_k", [0.1, 1.0])
def test_sparse_decode_realistic_bf16(kernels, top_k):
    """A decode step of sparse attention (kvcompile/sparse.py) with the kernels against the same
    step with the PyTorch references, on an 8B-shaped layer; every row chosen equals dense attention."""
    from kvcompile.kernels import sparse as sparse_kernels

    from kvcompile import sparse
    from kvcompile.ragged import RaggedKV

    inputs = make_inputs([5000, 4100, 0, 6200, 5000, 1, 3000, 4500], 1, 4, 128, 1, 3, torch.bfloat16)
    lengths = inputs["offsets"].diff().tolist()
    kv = RaggedKV.from_rows(inputs["prefix_keys"], inputs["prefix_values"], torch.arange(sum(lengths), device=DEVICE),
                            lengths)
    summary = sparse.PageSummary.of(kv, sparse.Sparse.auto(0.25, 128, top_k=top_k))
    columns, inv_temp = sparse.query_channels(inputs["query"], 8, summary.sparse.channels)
    args = (inputs["query"], summary.bounds, summary.page_offsets, columns, inv_temp, max(summary.pages))
    logits, ref = sparse_kernels.page_logits(*args), sparse.page_logits(*args)
    finite = ref.isfinite()
    assert torch.equal(finite, logits.isfinite())
    torch.testing.assert_close(logits[finite], ref[finite], atol=2e-2, rtol=2e-2)
    rows = sparse.choose_rows(ref, summary)
    gathered = (inputs["query"], kv.keys, kv.values, rows, inputs["keys"], inputs["values"], inputs["scaling"])
    out = sparse_kernels.gathered_attention(*gathered)
    torch.testing.assert_close(out.float(), sparse.gathered_attention(*gathered).float(), atol=2e-2, rtol=2e-2)
    if top_k == 1.0:
        dense = kernels[0].ragged_attention_reference(**inputs)
        torch.testing.assert_close(out.float(), dense.float(), atol=2e-2, rtol=2e-2)
