"""Flash-decoding attention over a ragged per-KV-head prefix followed by dense new tokens.

Layout of one layer (``D`` = head_dim, ``H`` KV heads, ``Hq = H * G`` query heads):

- ``prefix_keys``, ``prefix_values`` ``[N, D]``: the pack's cached tokens, shared by the batch,
  grouped by KV head: head ``h`` owns rows ``offsets[h] : offsets[h + 1]`` (cu_seqlens style,
  lengths may differ and may be 0).
- ``keys``, ``values`` ``[B, H, t, D]``: the dense new tokens (any strides, last dim contiguous).
- ``query`` ``[B, Hq, q_len, D]`` (likewise): the last ``q_len`` of the ``t`` new tokens.
  Query ``i`` sees the whole prefix of its KV head ``qh // G`` and the new tokens
  ``j <= t - q_len + i`` (causal, bottom-right aligned).
- returns ``[B, q_len, Hq, D]`` contiguous, the layout transformers expects from an attention
  function, in the query's dtype.

:func:`ragged_attention` is the Triton kernel (one launch, plus one small combine launch when
the key range is split); :func:`ragged_attention_reference` is the plain PyTorch spec it is
tested against.

Kernel design (flash-decoding). For each KV head the keys form a virtual sequence
``[prefix_h (n_h rows) | new tokens (t rows)]``. A program owns one tile of ``BLOCK_M`` rows
packed from the ``G`` query heads of a KV head and the ``q_len`` query tokens (row ``r`` is
token ``r // G`` of query head ``h * G + r % G``), so the K/V blocks it loads are shared by
the whole GQA group, and one split (a contiguous range) of that virtual sequence. The grid is
``(M tiles, B * H, splits)``. With one split the program normalises and writes ``out``;
otherwise it writes the unnormalised partial (acc, max, sum) to fp32 scratch and
:func:`_combine_kernel` merges the splits with log-sum-exp.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime import JITFunction

LOG2E = 1.4426950408889634  # 1 / ln(2): exp(x) == exp2(x * LOG2E)

# Fixed launch configuration (no autotune, so runs are deterministic and need no warm-up), see
# _launch_config: 64 keys per block keeps K/V tiles of D=128 bf16/fp16 at 16 KB, so 3 pipeline
# stages fit easily in shared memory.
BLOCK_N = 64
MAX_HEAD_DIM = 256
# Splitting aims at about two resident programs per SM; a split keeps at least this many keys,
# so the extra scratch traffic and the combine stay small next to the work they parallelise.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64
DEFAULT_SM_COUNT = 132  # an H100 SXM; used off CUDA (CPU tensors under TRITON_INTERPRET=1)
COMBINE_BLOCK_M = 16


@triton.jit
def _softmax_step(acc, m_i, l_i, q, k_t, v, mask, qk_scale, softcap, FP32: tl.constexpr, SOFTCAP: tl.constexpr):
    """One online-softmax update of a ``[BLOCK_M, D]`` tile with a block of keys.

    ``k_t`` is ``[D, BLOCK_N]`` (loaded transposed), ``v`` ``[BLOCK_N, D]``, ``mask``
    ``[BLOCK_M, BLOCK_N]`` True where attending is allowed. ``m_i`` is the running max of
    the log2-scaled scores (``-inf`` while a row has seen nothing), ``l_i`` the running sum.
    With ``SOFTCAP``, ``qk_scale`` is the plain softmax scale and scores are capped as
    ``softcap * tanh(s / softcap)`` before they are moved to log2 units.
    """
    if FP32:  # fp32 inputs: 3xTF32 keeps fp32 accuracy on tensor cores (plain tf32 would not; ieee compiles slowly)
        s = tl.dot(q, k_t, input_precision="tf32x3")
    else:
        s = tl.dot(q, k_t)
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflows to inf -> 1, underflows to 0 -> -1).
        capped = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (s * qk_scale / softcap)) + 1.0))
        s = tl.where(mask, capped * 1.4426950408889634, float("-inf"))
    else:
        s = tl.where(mask, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no allowed key so far keeps m = -inf; subtract 0 instead so no -inf - -inf NaN
    # appears (its p and alpha are then exp2(-inf) = 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if FP32:
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="tf32x3")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, tok, k_base, v_base, stride_kn, stride_vn, start, end, causal_limit, qk_scale,
    pos_base, q_pos, window, softcap,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Attend to keys ``start .. start + BLOCK_N`` (masked at ``end``) of ``k_base``/``v_base``.

    With ``CAUSAL`` (the new tokens), key ``j`` is visible to the row of query token ``tok``
    iff ``j <= causal_limit + tok``, and with ``WINDOW`` also iff ``j > causal_limit + tok - window``.
    Without it (the prefix), ``WINDOW`` reads each key's position at ``pos_base`` and keeps
    those above ``q_pos - window``.
    """
    cols = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < end
    k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k_t, v = k_t.to(tl.float32), v.to(tl.float32)
    mask = col_ok[None, :]
    if CAUSAL:
        mask = mask & (cols[None, :] <= causal_limit + tok[:, None])
        if WINDOW:
            mask = mask & (cols[None, :] > causal_limit + tok[:, None] - window)
    elif WINDOW:
        k_pos = tl.load(pos_base + cols, mask=col_ok, other=0)
        mask = mask & (k_pos[None, :] > q_pos[:, None] - window)
    return _softmax_step(acc, m_i, l_i, q, k_t, v, mask, qk_scale, softcap, FP32, SOFTCAP)


@triton.jit
def _attend_range(
    acc, m_i, l_i, q, tok, k_base, v_base, stride_kn, stride_vn, lo, hi, causal_limit, qk_scale,
    pos_base, q_pos, window, softcap,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr,
    WHILE_LOOP: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Attend to keys ``[lo, hi)``, one block of ``BLOCK_N`` at a time; returns ``(acc, m_i, l_i)``."""
    if WHILE_LOOP:
        # Interpreter only: older interpreters (triton 3.6) cannot range() over runtime bounds with
        # numpy >= 2.4 (triton-lang/triton#9171). Compiled code keeps the for loop, which Triton pipelines.
        start = lo
        while start < hi:
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, tok, k_base, v_base, stride_kn, stride_vn, start, hi, causal_limit, qk_scale,
                pos_base, q_pos, window, softcap, CAUSAL, HEAD_DIM, BLOCK_N, FP32, UPCAST, WINDOW, SOFTCAP,
            )
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, tok, k_base, v_base, stride_kn, stride_vn, start, hi, causal_limit, qk_scale,
                pos_base, q_pos, window, softcap, CAUSAL, HEAD_DIM, BLOCK_N, FP32, UPCAST, WINDOW, SOFTCAP,
            )
    return acc, m_i, l_i


@triton.jit
def _partials(part_ptr, rows, HEAD_DIM: tl.constexpr):
    """Pointers to the three parts of the fp32 split scratch: acc ``[rows, D]``, then max and sum ``[rows]``.

    ``rows = B * H * num_splits * q_len * G``; row ``((b * H + h) * num_splits + s) * q_len * G + r``.
    """
    acc_ptr = part_ptr
    m_ptr = part_ptr + rows.to(tl.int64) * HEAD_DIM
    return acc_ptr, m_ptr, m_ptr + rows


@triton.jit
def _store_out(out, out_ptr, b, tok, qh, row_ok, H, q_len, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store rows (token ``tok``, query head ``qh``) of batch ``b`` into the contiguous ``[B, q_len, Hq, D]`` output."""
    row = (b * q_len + tok[:, None]) * (H * GROUP) + qh[:, None]
    o_ptrs = out_ptr + row * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _query_tile(q_ptr, stride_qb, stride_qh, stride_qi, H, q_len,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    """This program's tile: batch ``b``, KV head ``h``, rows ``offs_m`` (query token ``tok`` of
    query head ``qh``), ``row_ok``, and the queries ``q [BLOCK_M, D]``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 bases: batch/head offsets of big buffers pass 2**31
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len * GROUP
    tok = offs_m // GROUP
    qh = h * GROUP + offs_m % GROUP
    q = tl.load(
        q_ptr + b * stride_qb + qh[:, None] * stride_qh + tok[:, None] * stride_qi + tl.arange(0, HEAD_DIM)[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    return b, h, offs_m, row_ok, tok, qh, q


@triton.jit
def _empty_state(BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The online softmax's state before any key: accumulator 0, running max -inf, sum 0."""
    return (tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), tl.full([BLOCK_M], float("-inf"), tl.float32),
            tl.zeros([BLOCK_M], dtype=tl.float32))


@triton.jit
def _split_range(offsets_ptr, h, q_len, t, num_splits, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Head ``h``'s first prefix row and length ``n``, and this split's share ``[lo, hi)`` of the
    virtual sequence ``[prefix (n) | new tokens the tile can see]``."""
    m_total = q_len * GROUP
    p_start = tl.load(offsets_ptr + h).to(tl.int64)
    n = (tl.load(offsets_ptr + h + 1) - p_start).to(tl.int32)
    # New tokens the tile's last query may see; later ones are masked for every row, so skip them.
    last_tok = (tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, m_total) - 1) // GROUP
    t_vis = tl.minimum(tl.maximum(t - q_len + last_tok + 1, 0), t)
    # Whole blocks per split, so only the last block of each part needs a tail mask.
    total = n + t_vis
    chunk = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
    lo = tl.program_id(2) * chunk
    return p_start, n, lo, tl.minimum(lo + chunk, total)


@triton.jit
def _finish_tile(acc, m_i, l_i, out_ptr, part_ptr, sinks_ptr, b, offs_m, row_ok, tok, qh, H, q_len, num_splits,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, SINKS: tl.constexpr):
    """Write the tile: its partial (acc, max, sum) to the split scratch, or, unsplit, the output."""
    if SPLIT:
        # Partials [B * H, num_splits, m_total, (D)]: every slot is written, empty splits included.
        m_total = q_len * GROUP
        row = (tl.program_id(1).to(tl.int64) * num_splits + tl.program_id(2)) * m_total + offs_m
        acc_ptr, m_ptr, l_ptr = _partials(part_ptr, tl.num_programs(1) * num_splits * m_total, HEAD_DIM)
        tl.store(m_ptr + row, m_i, mask=row_ok)
        tl.store(l_ptr + row, l_i, mask=row_ok)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], acc, mask=row_ok[:, None])
    else:
        if SINKS:
            l_i = _add_sink(l_i, m_i, sinks_ptr, qh, row_ok)
        # A row that saw no key at all (empty head and no new tokens) has l = 0 and acc = 0: output 0.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        _store_out(out, out_ptr, b, tok, qh, row_ok, H, q_len, GROUP, HEAD_DIM)


# t, q_len, num_splits and start change from call to call (decode steps): not specialized, so they cause no
# recompiles.
@triton.jit(do_not_specialize=["q_len", "t", "num_splits", "start"])
def _ragged_attention_kernel(
    q_ptr, pk_ptr, pv_ptr, offsets_ptr, k_ptr, v_ptr,
    out_ptr, part_ptr, pos_ptr, sinks_ptr,
    stride_qb, stride_qh, stride_qi, stride_pkn, stride_pvn,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    H, q_len, t, num_splits, qk_scale, start, window, softcap,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr, WHILE_LOOP: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
):
    """Grid ``(cdiv(q_len * GROUP, BLOCK_M), B * H, num_splits)``; see the module docstring.

    Every tensor's last dimension is contiguous (its stride is not passed: fewer launch arguments,
    each costs host time on every call). ``part_ptr``: the fp32 scratch of :func:`_partials`.
    """
    b, h, offs_m, row_ok, tok, qh, q = _query_tile(q_ptr, stride_qb, stride_qh, stride_qi, H, q_len,
                                                   GROUP, HEAD_DIM, BLOCK_M, UPCAST)
    p_start, n, lo, hi = _split_range(offsets_ptr, h, q_len, t, num_splits, GROUP, BLOCK_M, BLOCK_N)

    acc, m_i, l_i = _empty_state(BLOCK_M, HEAD_DIM)

    q_pos = start + t - q_len + tok  # the queries' positions (read only with WINDOW)
    # Prefix rows [lo, min(hi, n)) of head h: no causal mask, only the tail (and the window).
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, tok, pk_ptr + p_start * stride_pkn, pv_ptr + p_start * stride_pvn,
        stride_pkn, stride_pvn, lo, tl.minimum(hi, n), 0, qk_scale, pos_ptr + p_start, q_pos, window, softcap,
        False, HEAD_DIM, BLOCK_N, FP32, UPCAST, WHILE_LOOP, WINDOW, SOFTCAP,
    )
    acc, m_i, l_i = _attend_new(acc, m_i, l_i, q, tok, k_ptr, v_ptr, b, h, stride_kb, stride_kh, stride_kt,
                                stride_vb, stride_vh, stride_vt, n, lo, hi, q_len, t, qk_scale, pos_ptr, q_pos,
                                window, softcap, HEAD_DIM, BLOCK_N, FP32, UPCAST, WHILE_LOOP, WINDOW, SOFTCAP)
    _finish_tile(acc, m_i, l_i, out_ptr, part_ptr, sinks_ptr, b, offs_m, row_ok, tok, qh, H, q_len, num_splits,
                 GROUP, HEAD_DIM, SPLIT, SINKS)


@triton.jit
def _attend_new(acc, m_i, l_i, q, tok, k_ptr, v_ptr, b, h, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt, n, lo, hi, q_len, t, qk_scale, pos_ptr, q_pos, window, softcap,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr,
                WHILE_LOOP: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    """The new tokens' share ``[max(lo, n) - n, hi - n)`` of the split: causal, token ``j`` is
    visible to query token ``i`` iff ``j <= t - q_len + i``."""
    return _attend_range(
        acc, m_i, l_i, q, tok, k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
        stride_kt, stride_vt, tl.maximum(lo, n) - n, hi - n, t - q_len, qk_scale, pos_ptr, q_pos, window, softcap,
        True, HEAD_DIM, BLOCK_N, FP32, UPCAST, WHILE_LOOP, WINDOW, SOFTCAP,
    )


@triton.jit
def _add_sink(l_i, m_i, sinks_ptr, qh, row_ok):
    """The softmax sum with each query head's sink logit (natural units) added: a key with no value."""
    sink = tl.load(sinks_ptr + qh, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)  # as in _softmax_step
    return l_i + tl.exp2(sink - m_safe)


@triton.jit
def _combine_split(acc, m_i, l_i, acc_ptr, m_ptr, l_ptr, row, row_ok, HEAD_DIM: tl.constexpr):
    """Fold one split's partial (rows ``row`` of the scratch) into the running (acc, max, sum)."""
    m_s = tl.load(m_ptr + row, mask=row_ok, other=float("-inf"))
    l_s = tl.load(l_ptr + row, mask=row_ok, other=0.0)
    offs_d = tl.arange(0, HEAD_DIM)
    acc_s = tl.load(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_new = tl.maximum(m_i, m_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # as in _softmax_step
    alpha = tl.exp2(m_i - m_safe)
    beta = tl.exp2(m_s - m_safe)
    return acc * alpha[:, None] + acc_s * beta[:, None], m_new, l_i * alpha + l_s * beta


@triton.jit(do_not_specialize=["q_len", "num_splits"])
def _combine_kernel(
    out_ptr, part_ptr, sinks_ptr, H, q_len, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, WHILE_LOOP: tl.constexpr,
    SINKS: tl.constexpr,
):
    """Merge the split partials of ``BLOCK_M`` rows with log-sum-exp; grid ``(cdiv(q_len * GROUP, BLOCK_M), B * H)``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m_total = q_len * GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < m_total
    first_row = pid_bh.to(tl.int64) * num_splits * m_total + offs_m  # split s adds s * m_total
    acc_ptr, m_ptr, l_ptr = _partials(part_ptr, tl.num_programs(1) * num_splits * m_total, HEAD_DIM)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WHILE_LOOP:  # see _attend_range
        s = 0
        while s < num_splits:
            row = first_row + s * m_total
            acc, m_i, l_i = _combine_split(acc, m_i, l_i, acc_ptr, m_ptr, l_ptr, row, row_ok, HEAD_DIM)
            s += 1
    else:
        for s in range(0, num_splits):
            row = first_row + s * m_total
            acc, m_i, l_i = _combine_split(acc, m_i, l_i, acc_ptr, m_ptr, l_ptr, row, row_ok, HEAD_DIM)

    qh = h * GROUP + offs_m % GROUP
    if SINKS:
        l_i = _add_sink(l_i, m_i, sinks_ptr, qh, row_ok)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    _store_out(out, out_ptr, b, offs_m // GROUP, qh, row_ok, H, q_len, GROUP, HEAD_DIM)


# True when TRITON_INTERPRET=1 was set as this module was imported (the kernels then run in numpy).
_INTERPRETED = not isinstance(_ragged_attention_kernel, JITFunction)


def _cdiv(a: int, b: int) -> int:
    # Plain Python on the host path: triton.cdiv is a constexpr_function wrapper, slow to call from Python.
    return -(-a // b)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_config(m_total: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of :func:`_ragged_attention_kernel` (a fixed rule, no autotune).

    BLOCK_M: the packed rows (``q_len * G``) rounded up to a power of two, between 16 (the
    smallest ``tl.dot``) and 64. 16-bit inputs with D <= 128: 64-key blocks, 4 warps, 3 stages.
    fp32 (3xTF32 dots) and D = 256 tiles are larger: 32-key blocks and 2 stages, 8 warps for
    D = 256 (its fp32 accumulator would spill), and at most 32 rows for fp32 with D = 256 so the
    shared memory stays under the 227 KB of an H100 (compiled for sm_90 with triton 3.9). On an
    H200 (triton 3.6), 128-key blocks, 8 warps or 4 stages were no faster for bf16 decode.
    """
    wide, fp32 = head_dim > 128, dtype == torch.float32
    max_block_m = 32 if (wide and fp32) else 64
    return dict(
        BLOCK_M=min(max_block_m, max(16, 1 << (m_total - 1).bit_length())),  # next power of two
        BLOCK_N=32 if (wide or fp32) else BLOCK_N,
        num_warps=8 if wide else 4,
        num_stages=2 if (wide or fp32) else 3,
    )


def choose_num_splits(programs: int, max_keys: int, sm_count: int) -> int:
    """Splits of each key range so that ``programs * splits`` fills the GPU (about two programs per SM).

    ``programs``: M tiles * B * H; ``max_keys``: the longest key range (``max_len + t``).
    Already enough programs (prefill, big batches) -> 1; otherwise as many splits as reach
    ``2 * sm_count`` programs, but never below :data:`MIN_KEYS_PER_SPLIT` keys per split
    and at most :data:`MAX_SPLITS`. E.g. 8 KV heads, one decode token, 30k-row prefix on 132
    SMs: 8 programs -> 33 splits of ~910 keys (264 programs); on an H200 two and four times
    as many splits were slower (65 and 83 us against 47 us).
    """
    target = 2 * sm_count
    if programs >= target or max_keys <= MIN_KEYS_PER_SPLIT:
        return 1
    splits = min(_cdiv(target, programs), _cdiv(max_keys, MIN_KEYS_PER_SPLIT), MAX_SPLITS)
    return max(1, splits)


def _check_inputs(query, offsets, keys, values) -> None:
    """The query and the dense new tokens (and ``offsets``, where given), whatever form the prefix has."""
    if query.dim() != 4 or keys.dim() != 4 or values.dim() != 4:
        raise ValueError("query, keys and values must be 4-D: [batch, heads, tokens, head_dim]")
    batch, q_heads, _, head_dim = query.shape
    kv_heads = keys.shape[1]
    if keys.shape != values.shape or keys.shape[0] != batch or keys.shape[3] != head_dim:
        shapes = f"keys {tuple(keys.shape)} / values {tuple(values.shape)}"
        raise ValueError(f"{shapes} do not match query {tuple(query.shape)}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
    if offsets is not None and (offsets.shape != (kv_heads + 1,) or offsets.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"offsets must be int32/int64 [{kv_heads + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
    if head_dim < 16 or head_dim > MAX_HEAD_DIM or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in [16, {MAX_HEAD_DIM}], got {head_dim}")
    dtypes = {t.dtype for t in (query, keys, values)}
    if len(dtypes) != 1 or query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"all inputs must share one of float16/bfloat16/float32, got {sorted(map(str, dtypes))}")
    devices = {t.device for t in (query, offsets, keys, values) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def _check_prefix(query, prefix_keys, prefix_values) -> None:
    """A dense prefix: ``[N, head_dim]`` rows in the query's dtype, on its device."""
    if prefix_keys.dim() != 2 or prefix_values.dim() != 2:
        raise ValueError("prefix_keys and prefix_values must be 2-D: [rows, head_dim]")
    if prefix_keys.shape != prefix_values.shape or prefix_keys.shape[1] != query.shape[3]:
        shapes = f"prefix_keys {tuple(prefix_keys.shape)} / prefix_values {tuple(prefix_values.shape)}"
        raise ValueError(f"{shapes} do not match head_dim {query.shape[3]}")
    dtypes = {t.dtype for t in (query, prefix_keys, prefix_values)}
    if len(dtypes) != 1:
        raise ValueError(f"all inputs must share one of float16/bfloat16/float32, got {sorted(map(str, dtypes))}")
    devices = {t.device for t in (query, prefix_keys, prefix_values)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def _check_sinks(query, sinks) -> None:
    if sinks is not None and (sinks.shape != (query.shape[1],) or sinks.device != query.device):
        raise ValueError(f"sinks must be [{query.shape[1]}] (one per query head) on the query's device")


def ragged_attention(
    query: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    num_splits: int | None = None,
    *,
    prefix_positions: torch.Tensor | None = None,
    start: int = 0,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over ``[prefix of its KV head | causal new tokens]`` (Triton).

    query: ``[B, Hq, q_len, D]``; the last ``q_len`` of the ``t`` new tokens.
    prefix_keys, prefix_values: ``[N, D]``; head ``h`` owns rows ``offsets[h]:offsets[h+1]``.
    offsets: ``[H + 1]`` int32/int64 on the same device, non-decreasing, ``offsets[0] = 0`` not required.
    max_len: a Python int >= the longest head (only sizes the split count; never read from the device).
    keys, values: ``[B, H, t, D]`` (e.g. ``buf[:, :, :t]`` of a preallocated buffer); ``Hq = H * G``.
    scaling: softmax scale (e.g. ``D ** -0.5``).
    num_splits: key-range splits; ``None`` picks them with :func:`choose_num_splits`.
    Returns ``[B, q_len, Hq, D]`` contiguous, in the query's dtype. ``D`` must be a power of
    two in [16, 256]; all tensors share one dtype (float16, bfloat16 or float32).
    A query that sees no key (empty head and ``t = 0``) gets zeros.

    The attention features of some models (``masked_attention`` in kvcompile/attention.py
    is the model-level spec), all off by default:

    - ``window``: a sliding window. New token ``j`` stands at position ``start + j`` and
      query ``i`` at ``start + t - q_len + i``; a query at ``p`` sees only keys above
      ``p - window``, prefix rows by ``prefix_positions [N]`` (int32/int64, each below
      ``start``), which ``window`` requires.
    - ``softcap``: scores become ``softcap * tanh(s * scaling / softcap)``.
    - ``sinks``: ``[Hq]`` logits of a key without a value, added to each query head's
      softmax denominator (gpt-oss).

    Tensors may have any strides as long as the last dimension is contiguous (views such as
    ``buf[:, :, :t]`` or ``x.view(B, q_len, Hq, D).transpose(1, 2)`` are read in place); a tensor
    whose last dimension is not contiguous is copied first. No host synchronisation: safe in a
    decode loop and under CUDA graph capture (for fixed shapes and ``num_splits``).
    """
    _check_inputs(query, offsets, keys, values)
    _check_prefix(query, prefix_keys, prefix_values)
    _check_features(query, prefix_keys, prefix_positions, window, sinks)
    # The kernel assumes a contiguous last dimension (true of views such as buf[:, :, :t] and transposes).
    query, prefix_keys, prefix_values, keys, values = (
        x if x.stride(-1) == 1 else x.contiguous() for x in (query, prefix_keys, prefix_values, keys, values)
    )
    launch = Launch.plan(query, keys, max_len, num_splits, sinks, softcap is not None)
    if launch is None:
        return torch.empty(*_out_shape(query), dtype=query.dtype, device=query.device)
    # Unused feature pointers get any tensor: their loads are compiled out (constexpr flags).
    positions = prefix_positions if window is not None else offsets
    _ragged_attention_kernel[launch.grid](
        query, prefix_keys, prefix_values, offsets, keys, values, launch.out, launch.part, positions, launch.sinks,
        *query.stride()[:3], prefix_keys.stride(0), prefix_values.stride(0), *keys.stride()[:3], *values.stride()[:3],
        keys.shape[1], query.shape[2], keys.shape[2], launch.num_splits, scaling * launch.qk_factor, int(start),
        int(window or 0), float(softcap or 1.0), WINDOW=window is not None, SOFTCAP=softcap is not None,
        **launch.constants,
    )
    return launch.finish()


def _out_shape(query: torch.Tensor) -> tuple[int, ...]:
    batch, q_heads, q_len, head_dim = query.shape
    return batch, q_len, q_heads, head_dim


@dataclass
class Launch:
    """What a launch of the attention kernels needs besides their inputs: the output
    ``[B, q_len, Hq, D]``, the split count and fp32 split scratch, the grid, the tile
    configuration, and the combine launch that :meth:`finish` makes when the keys are split.
    Shared by :func:`ragged_attention` and the quantised-prefix kernel (quant_attention.py)."""

    out: torch.Tensor
    part: torch.Tensor
    sinks: torch.Tensor
    grid: tuple[int, int, int]
    num_splits: int
    qk_factor: float
    constants: dict

    @classmethod
    def plan(cls, query: torch.Tensor, keys: torch.Tensor, max_len: int, num_splits: int | None,
             sinks: torch.Tensor | None, softcap: bool) -> Launch | None:
        """The launch for ``query [B, Hq, q_len, D]`` against ``keys [B, H, t, D]`` and a prefix
        of at most ``max_len`` rows per head; None when the output is empty."""
        batch, q_heads, q_len, head_dim = query.shape
        kv_heads, t = keys.shape[1], keys.shape[2]
        group = q_heads // kv_heads
        out = torch.empty(*_out_shape(query), dtype=query.dtype, device=query.device)
        if out.numel() == 0:
            return None
        m_total = q_len * group
        cfg = _launch_config(m_total, head_dim, query.dtype)
        m_tiles = _cdiv(m_total, cfg["BLOCK_M"])
        if num_splits is None:
            programs = m_tiles * batch * kv_heads
            num_splits = choose_num_splits(programs, max(int(max_len), 0) + t, _sm_count(query.device))
        num_splits = max(1, int(num_splits))
        part = out  # unused (SPLIT=False)
        if num_splits > 1:  # fp32 scratch: acc [rows, D], then max [rows] and sum [rows] (see _partials)
            rows = batch * kv_heads * num_splits * m_total
            part = torch.empty(rows * (head_dim + 2), dtype=torch.float32, device=query.device)
        # Triton's interpreter cannot compute on bfloat16 (tl.dot multiplies the raw uint16 bit patterns,
        # triton-lang/triton#11584): under TRITON_INTERPRET=1 bf16 tiles are upcast to fp32 after loading.
        upcast = _INTERPRETED and query.dtype == torch.bfloat16
        has_sinks = sinks is not None
        constants = dict(GROUP=group, HEAD_DIM=head_dim, SPLIT=num_splits > 1,
                         FP32=query.dtype == torch.float32 or upcast, UPCAST=upcast, WHILE_LOOP=_INTERPRETED,
                         SINKS=has_sinks, **cfg)
        return cls(out, part, sinks.float().contiguous() if has_sinks else out, (m_tiles, batch * kv_heads, num_splits),
                   num_splits, 1.0 if softcap else LOG2E, constants)

    def finish(self) -> torch.Tensor:
        """The output, after merging the splits' partials if the keys were split."""
        if self.num_splits > 1:
            c = self.constants
            m_total = self.out.shape[1] * c["GROUP"]
            _combine_kernel[(_cdiv(m_total, COMBINE_BLOCK_M), self.grid[1])](
                self.out, self.part, self.sinks, self.out.shape[2] // c["GROUP"], self.out.shape[1], self.num_splits,
                GROUP=c["GROUP"], HEAD_DIM=c["HEAD_DIM"], BLOCK_M=COMBINE_BLOCK_M, WHILE_LOOP=_INTERPRETED,
                SINKS=c["SINKS"], num_warps=4,
            )
        return self.out


def _check_features(query, prefix_keys, prefix_positions, window, sinks) -> None:
    if window is not None:
        if window < 1:
            raise ValueError(f"window must be a positive number of tokens, got {window}")
        if (prefix_positions is None or prefix_positions.shape != (prefix_keys.shape[0],)
                or prefix_positions.dtype not in (torch.int32, torch.int64)
                or prefix_positions.device != query.device):
            raise ValueError("a window needs prefix_positions: int32/int64 [N] on the query's device")
    _check_sinks(query, sinks)


def ragged_attention_reference(
    query: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    num_splits: int | None = None,
    *,
    prefix_positions: torch.Tensor | None = None,
    start: int = 0,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec of :func:`ragged_attention`, in plain fp32 PyTorch (same arguments and output).

    Each head's prefix is padded to ``max_len`` through a gather index, the new tokens are
    appended, and one bool mask ``[H, q_len, max_len + t]`` says what each query sees: the
    head's real prefix rows, and new token ``j`` iff ``j <= t - q_len + i``, each within
    the window by position if one is given. Scores are softcapped before the mask, and sinks
    join each softmax as one more column. A query that sees nothing gets zeros.
    ``num_splits`` is accepted for signature parity and ignored.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, t = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    device = query.device
    offsets = offsets.to(device=device, dtype=torch.long)

    # Padded prefix [H, max_len, D]: row idx[h, j] of the prefix, or a zero row where j >= n_h.
    lengths = offsets[1:] - offsets[:-1]
    pos = torch.arange(max_len, device=device)
    valid = pos[None, :] < lengths[:, None]  # [H, max_len]
    zero = prefix_keys.new_zeros(1, head_dim)
    pk = torch.cat([prefix_keys, zero]).float()
    pv = torch.cat([prefix_values, zero]).float()
    idx = torch.where(valid, offsets[:-1, None] + pos[None, :], prefix_keys.shape[0])
    k = torch.cat([pk[idx].expand(batch, -1, -1, -1), keys.float()], dim=2)  # [B, H, max_len + t, D]
    v = torch.cat([pv[idx].expand(batch, -1, -1, -1), values.float()], dim=2)

    tok = torch.arange(q_len, device=device)
    new = torch.arange(t, device=device)
    causal = new[None, :] <= (t - q_len) + tok[:, None]  # [q_len, t]
    if window is not None:
        q_pos = start + t - q_len + tok  # [q_len]
        k_pos = torch.cat([prefix_positions.to(device, torch.long), prefix_positions.new_zeros(1)])[idx]  # [H, max_len]
        valid = valid[:, None, :] & (k_pos[:, None, :] > q_pos[None, :, None] - window)  # [H, q_len, max_len]
        causal = causal & (start + new[None, :] > q_pos[:, None] - window)
    else:
        valid = valid[:, None, :].expand(-1, q_len, -1)
    mask = torch.cat([valid, causal.expand(kv_heads, -1, -1)], dim=2)

    q = query.float().reshape(batch, kv_heads, group, q_len, head_dim)
    scores = torch.einsum("bhgid,bhjd->bhgij", q, k) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask[None, :, None], float("-inf"))
    if sinks is not None:  # one more key per query head, with no value
        sink = sinks.float().reshape(1, kv_heads, group, 1, 1).expand(batch, -1, -1, q_len, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows (nothing visible) -> 0
    out = torch.einsum("bhgij,bhjd->bhgid", probs, v).reshape(batch, q_heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous().to(query.dtype)


__all__ = ["ragged_attention", "ragged_attention_reference", "choose_num_splits"]
