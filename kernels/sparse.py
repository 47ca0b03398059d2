"""The two kernels of sparse decode (kvcompile/sparse.py): approximate page scores, and
attention over gathered prefix rows.

- :func:`page_logits`: grid ``(cdiv(max_pages, BLOCK_P), B * H)``. A program loads its KV
  head's chosen columns of the queries of the whole GQA group (``[G, r]``) once, then a
  block of pages' bounds at those columns only (``[r, BLOCK_P]``: ``r / 2D`` of the
  summaries' bytes), and writes ``[G, BLOCK_P]`` logits.
- :func:`gathered_attention`: :func:`~kvcompile.kernels.attention.ragged_attention`'s
  flash-decoding (same tiles, GQA packing, splits and combine), but a head's prefix is the
  rows listed in ``rows [B, H, K]``, loaded by index, so nothing is gathered to memory first.

Their PyTorch references, the spec, are kvcompile/sparse.py's :func:`~kvcompile.sparse.page_logits`
and :func:`~kvcompile.sparse.gathered_attention` (the CPU path), exported here as
:func:`page_logits_reference` and :func:`gathered_attention_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sparse import gathered_attention as gathered_attention_reference
from ..sparse import page_logits as page_logits_reference
from .attention import (
    Launch,
    _attend_new,
    _cdiv,
    _check_inputs,
    _check_prefix,
    _empty_state,
    _finish_tile,
    _out_shape,
    _query_tile,
    _softmax_step,
)

# The scores are a broadcast product [G, r, pages] summed over r (G is too small for tl.dot): pages
# per program are sized so that product stays at 8k elements (64 fp32 registers per thread, 4 warps).
PRODUCT = 8192


def _pow2(n: int, least: int = 2) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


@triton.jit
def _page_logits_kernel(q_ptr, bounds_ptr, page_offsets_ptr, columns_ptr, inv_temp_ptr, out_ptr,
                        stride_qb, stride_qh, stride_bp, H, channels, max_pages,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr, R_PAD: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    """Logits ``[G, BLOCK_P]`` of one block of pages of KV head ``h`` for its query heads; see
    :func:`~kvcompile.sparse.page_logits`. ``q_ptr`` points at the step's (last) query token."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    r = tl.arange(0, R_PAD)
    r_ok = r < channels
    cols = tl.load(columns_ptr + pid_bh * channels + r, mask=r_ok, other=0)
    g = tl.arange(0, G_PAD)
    g_ok = g < GROUP
    qh = h * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + (cols % HEAD_DIM)[None, :],
                mask=g_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # [G, r]
    first = tl.load(page_offsets_ptr + h)
    count = tl.load(page_offsets_ptr + h + 1) - first
    j = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    j_ok = j < count
    bound = tl.load(bounds_ptr + (first + j)[None, :] * stride_bp + cols[:, None],
                    mask=r_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)  # [r, BLOCK_P]
    s = tl.sum(q[:, :, None] * bound[None, :, :], axis=1)  # [G, BLOCK_P]
    inv_temp = tl.load(inv_temp_ptr + b * H * GROUP + qh, mask=g_ok, other=0.0)
    s = tl.where(j_ok[None, :], s * inv_temp[:, None], float("-inf"))
    out = out_ptr + ((b * H * GROUP + qh) * max_pages)[:, None] + j[None, :]
    tl.store(out, s, mask=g_ok[:, None] & (j < max_pages)[None, :])


def page_logits(query: torch.Tensor, bounds: torch.Tensor, page_offsets: torch.Tensor, columns: torch.Tensor,
                inv_temp: torch.Tensor, max_pages: int) -> torch.Tensor:
    """:func:`kvcompile.sparse.page_logits` (same arguments and output), in one launch."""
    b, hq, _, d = query.shape
    h, r = columns.shape[1], columns.shape[2]
    if bounds.stride(-1) != 1:
        bounds = bounds.contiguous()
    q = query[:, :, -1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(b, hq, max_pages, dtype=torch.float32, device=query.device)
    g_pad, r_pad = _pow2(hq // h), _pow2(r)
    block_p = max(2, min(64, PRODUCT // (g_pad * r_pad)))
    if out.numel():
        _page_logits_kernel[(_cdiv(max_pages, block_p), b * h)](
            q, bounds, page_offsets, columns.contiguous(), inv_temp.float().contiguous(), out,
            q.stride(0), q.stride(1), bounds.stride(0), h, r, max_pages,
            GROUP=hq // h, HEAD_DIM=d, G_PAD=g_pad, R_PAD=r_pad, BLOCK_P=block_p,
        )
    return out


@triton.jit
def _gathered_block(acc, m_i, l_i, q, rows_base, start, end, pk_ptr, pv_ptr, stride_pkn, stride_pvn, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr):
    """Attend to the listed rows ``start .. start + BLOCK_N`` (masked at ``end`` and where ``-1``)."""
    cols = start + tl.arange(0, BLOCK_N)
    row = tl.load(rows_base + cols, mask=cols < end, other=-1)
    ok = row >= 0
    row = tl.where(ok, row, 0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    k_t = tl.load(pk_ptr + row[None, :] * stride_pkn + offs_d[:, None], mask=ok[None, :], other=0.0)
    v = tl.load(pv_ptr + row[:, None] * stride_pvn + offs_d[None, :], mask=ok[:, None], other=0.0)
    if UPCAST:
        k_t, v = k_t.to(tl.float32), v.to(tl.float32)
    return _softmax_step(acc, m_i, l_i, q, k_t, v, ok[None, :], qk_scale, 1.0, FP32, False)


@triton.jit(do_not_specialize=["q_len", "t", "num_splits"])
def _gathered_attention_kernel(
    q_ptr, pk_ptr, pv_ptr, rows_ptr, k_ptr, v_ptr, out_ptr, part_ptr,
    stride_qb, stride_qh, stride_qi, stride_pkn, stride_pvn,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    H, q_len, t, K, num_splits, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr, WHILE_LOOP: tl.constexpr, SINKS: tl.constexpr,
):
    """Grid ``(cdiv(q_len * GROUP, BLOCK_M), B * H, num_splits)``: the virtual sequence of a head is
    ``[its K listed rows | the new tokens the tile can see]``, split as the dense kernel's."""
    b, h, offs_m, row_ok, tok, qh, q = _query_tile(q_ptr, stride_qb, stride_qh, stride_qi, H, q_len,
                                                   GROUP, HEAD_DIM, BLOCK_M, UPCAST)
    last_tok = (tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, q_len * GROUP) - 1) // GROUP
    t_vis = tl.minimum(tl.maximum(t - q_len + last_tok + 1, 0), t)
    chunk = tl.cdiv(tl.cdiv(K + t_vis, num_splits), BLOCK_N) * BLOCK_N
    lo = tl.program_id(2) * chunk
    hi = tl.minimum(lo + chunk, K + t_vis)
    acc, m_i, l_i = _empty_state(BLOCK_M, HEAD_DIM)

    rows_base = rows_ptr + tl.program_id(1).to(tl.int64) * K
    end = tl.minimum(hi, K)
    if WHILE_LOOP:  # the interpreter's loop form, see attention._attend_range
        start = lo
        while start < end:
            acc, m_i, l_i = _gathered_block(acc, m_i, l_i, q, rows_base, start, end, pk_ptr, pv_ptr, stride_pkn,
                                            stride_pvn, qk_scale, HEAD_DIM, BLOCK_N, FP32, UPCAST)
            start += BLOCK_N
    else:
        for start in range(lo, end, BLOCK_N):
            acc, m_i, l_i = _gathered_block(acc, m_i, l_i, q, rows_base, start, end, pk_ptr, pv_ptr, stride_pkn,
                                            stride_pvn, qk_scale, HEAD_DIM, BLOCK_N, FP32, UPCAST)
    acc, m_i, l_i = _attend_new(acc, m_i, l_i, q, tok, k_ptr, v_ptr, b, h, stride_kb, stride_kh, stride_kt,
                                stride_vb, stride_vh, stride_vt, K, lo, hi, q_len, t, qk_scale, rows_ptr, tok, 0, 1.0,
                                HEAD_DIM, BLOCK_N, FP32, UPCAST, WHILE_LOOP, False, False)
    _finish_tile(acc, m_i, l_i, out_ptr, part_ptr, part_ptr, b, offs_m, row_ok, tok, qh, H, q_len, num_splits,
                 GROUP, HEAD_DIM, SPLIT, False)


def gathered_attention(query: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor,
                       rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                       num_splits: int | None = None) -> torch.Tensor:
    """:func:`kvcompile.sparse.gathered_attention` (same arguments and output), in one launch
    (plus the combine when split). ``rows [B, H, K]`` int32/int64, ``-1`` for none."""
    _check_inputs(query, None, keys, values)
    _check_prefix(query, prefix_keys, prefix_values)
    if rows.dim() != 3 or rows.shape[:2] != keys.shape[:2] or rows.device != query.device:
        raise ValueError(f"rows must be [batch, kv_heads, K] = [{keys.shape[0]}, {keys.shape[1]}, K] on the "
                         f"query's device, got {tuple(rows.shape)} on {rows.device}")
    query, prefix_keys, prefix_values, keys, values = (
        x if x.stride(-1) == 1 else x.contiguous() for x in (query, prefix_keys, prefix_values, keys, values)
    )
    k = rows.shape[2]
    launch = Launch.plan(query, keys, k, num_splits, None, False)
    if launch is None:
        return torch.empty(*_out_shape(query), dtype=query.dtype, device=query.device)
    _gathered_attention_kernel[launch.grid](
        query, prefix_keys, prefix_values, rows.contiguous(), keys, values, launch.out, launch.part,
        *query.stride()[:3], prefix_keys.stride(0), prefix_values.stride(0), *keys.stride()[:3], *values.stride()[:3],
        keys.shape[1], query.shape[2], keys.shape[2], k, launch.num_splits, scaling * launch.qk_factor,
        **launch.constants,
    )
    return launch.finish()


__all__ = ["page_logits", "page_logits_reference", "gathered_attention", "gathered_attention_reference"]
