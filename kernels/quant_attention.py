"""Flash-decoding attention that reads a quantised ragged prefix directly.

The same attention as :func:`~kvcompile.kernels.attention.ragged_attention` (same grid,
splits, GQA packing, causal new tokens, softcap and sinks), but the prefix rows are integer
codes (kvcompile/codecs/integer.py's layout, :class:`QuantRows`), never materialised as a dense
tensor: each block of ``BLOCK_N`` rows is bit-unpacked, dequantised with its fp16 scales and
zeros, given its exactly stored rows where it has them, and, for keys, rotated to each row's
position, all in registers, in fp32, and then rounded to the model's dtype for the dot products
(as dense rows would have been). Per decode step a layer reads ``bits / 16`` of an fp16 prefix's
bytes plus its scales, instead of decoding the whole layer to memory and reading that back.

Keys are stored before RoPE, so the kernel rotates them itself (``rotate_half`` convention
over the first ``R`` channels, Llama, Qwen, Mistral, Gemma): channel ``c < R`` of a row at
position ``p`` becomes ``s * (k[c] cos(p f) -+ k[c +- R/2] sin(p f))`` with ``f =
inv_freq[c mod R/2]`` and ``s`` the rotary's attention scaling, the formula of transformers'
rotary modules. The partner channel is a second (cached) load of the same codes. The angle is
reduced to ``[-pi, pi]`` in two steps (Cody-Waite) before ``cos``/``sin``, so fast hardware
approximations stay accurate at the positions of long contexts.

:func:`quant_attention` is the Triton kernel; :func:`quant_attention_reference` the PyTorch
spec (dequantise, rotate, then :func:`~kvcompile.kernels.attention.ragged_attention_reference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention import (
    Launch,
    _attend_new,
    _check_inputs,
    _check_sinks,
    _empty_state,
    _finish_tile,
    _out_shape,
    _query_tile,
    _softmax_step,
    _split_range,
    ragged_attention_reference,
)
from .dequant import dequant_at, dequantize_reference
from .rope import rope_reference

TWO_PI_HI = 6.28125  # 2 pi split for the angle reduction: 8 significant bits, so k * TWO_PI_HI is exact for k < 2**16
TWO_PI_LO = 0.0019353071795864769  # 2 pi - TWO_PI_HI
INV_TWO_PI = 0.15915494309189535
# Smaller key blocks than the dense kernel's: a [D, BLOCK_N] key tile lives in registers four
# times over (codes, partner codes, cos, sin). Not tuned on a GPU yet (no device so far).
QUANT_TILE = dict(BLOCK_N=32, num_stages=2)


@dataclass(frozen=True)
class QuantRows:
    """Integer-coded rows, ``[N, D]`` once decoded, as the kernels read them.

    codes: ``[N, D * bits / 8]`` uint8, each row's codes as one little-endian bit stream.
    scales, zeros: fp16; ``[G, D]`` with ``groups [N]`` (int32, each row's scale row) when
    ``group`` is 0 (keys: per channel over groups of rows), else ``[N, D / group]`` (values:
    per row over ``group`` channels).
    exact: ``[N]`` int32, -1 or the row of ``exact_rows [K, D]`` (fp16) that replaces the
    row (rows stored exactly, ``--quant-outliers``); None when there are none.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    groups: torch.Tensor | None
    bits: int
    group: int
    exact: torch.Tensor | None = None
    exact_rows: torch.Tensor | None = None

    def __post_init__(self):
        if (self.group == 0) != (self.groups is not None):
            raise ValueError("per-channel scales (group 0) need each row's group, and only they")
        if (self.exact is None) != (self.exact_rows is None):
            raise ValueError("exact and exact_rows come together")

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    def reference(self, head_dim: int) -> torch.Tensor:
        """The rows decoded in fp32 ``[N, head_dim]`` (the spec the kernel follows)."""
        x = dequantize_reference(self.codes, self.scales, self.zeros, self.groups, self.bits, self.group, head_dim,
                                 torch.float32)
        if self.exact is not None:
            hit = self.exact >= 0
            x[hit] = self.exact_rows.float()[self.exact[hit].long()]
        return x

    def _args(self) -> tuple:
        """Pointer and size arguments of the kernel (unused ones get the codes: never read)."""
        c = self.codes
        return (c, self.scales, self.zeros, self.groups if self.groups is not None else c,
                self.exact if self.exact is not None else c, self.exact_rows if self.exact_rows is not None else c,
                c.shape[1], self.scales.shape[1])


@triton.jit
def _row_meta(groups_ptr, exact_ptr, rows, row_ok, GROUP: tl.constexpr, EXACT: tl.constexpr):
    """Each row's scale row (its group for per-channel scales, else itself) and exact row (-1: none)."""
    if GROUP == 0:
        srow = tl.load(groups_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        srow = rows
    if EXACT:
        e = tl.load(exact_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    else:
        e = rows * 0 - 1
    return srow, e


@triton.jit
def _rows_at(codes_ptr, scales_ptr, zeros_ptr, exact_rows_ptr, rows, ch, srow, e, ok, width, n_scale_cols,
             BITS: tl.constexpr, GROUP: tl.constexpr, EXACT: tl.constexpr, HEAD_DIM: tl.constexpr):
    """fp32 values of rows ``rows`` at channels ``ch`` (broadcast), exact rows in place."""
    x = dequant_at(codes_ptr, scales_ptr, zeros_ptr, rows, ch, srow, ok, width, n_scale_cols, BITS, GROUP, HEAD_DIM)
    if EXACT:
        exact = tl.load(exact_rows_ptr + e * HEAD_DIM + ch, mask=ok & (e >= 0), other=0.0).to(tl.float32)
        x = tl.where(e >= 0, exact, x)
    return x


@triton.jit
def _quant_block(
    acc, m_i, l_i, q, rows, col_ok,
    kc_ptr, ks_ptr, kz_ptr, kg_ptr, ke_ptr, kx_ptr, k_width, k_scols,
    vc_ptr, vs_ptr, vz_ptr, vg_ptr, ve_ptr, vx_ptr, v_width, v_scols,
    pos_ptr, freq_ptr, rope_scale, qk_scale, softcap,
    KBITS: tl.constexpr, KGROUP: tl.constexpr, KEXACT: tl.constexpr,
    VBITS: tl.constexpr, VGROUP: tl.constexpr, VEXACT: tl.constexpr,
    ROT_HALF: tl.constexpr, HEAD_DIM: tl.constexpr, FP32: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One online-softmax step over prefix rows ``rows [BLOCK_N]`` (int64, masked by ``col_ok``)."""
    # Keys, loaded transposed [D, BLOCK_N]: rows along the columns.
    kr = rows[None, :]
    k_ok_r = col_ok[None, :]
    ch = tl.arange(0, HEAD_DIM)[:, None]
    k_ok = k_ok_r & (ch < HEAD_DIM)
    srow, e = _row_meta(kg_ptr, ke_ptr, kr, k_ok_r, KGROUP, KEXACT)
    k = _rows_at(kc_ptr, ks_ptr, kz_ptr, kx_ptr, kr, ch, srow, e, k_ok, k_width, k_scols, KBITS, KGROUP, KEXACT,
                 HEAD_DIM)
    if ROT_HALF > 0:
        rot = ch < 2 * ROT_HALF
        first = ch < ROT_HALF
        partner = tl.where(first, ch + ROT_HALF, tl.where(rot, ch - ROT_HALF, ch))
        kp = _rows_at(kc_ptr, ks_ptr, kz_ptr, kx_ptr, kr, partner, srow, e, k_ok, k_width, k_scols, KBITS, KGROUP,
                      KEXACT, HEAD_DIM)
        freq = tl.load(freq_ptr + ch % ROT_HALF, mask=rot, other=0.0)  # [D, 1] fp32
        angle = tl.load(pos_ptr + kr, mask=k_ok_r, other=0).to(tl.float32) * freq  # as transformers: fp32 p * f
        turns = tl.floor(angle * INV_TWO_PI + 0.5)
        angle = (angle - turns * TWO_PI_HI) - turns * TWO_PI_LO
        cos = tl.cos(angle) * rope_scale
        sin = tl.sin(angle) * rope_scale
        k = tl.where(rot, k * cos + tl.where(first, -kp, kp) * sin, k)
    # Values [BLOCK_N, D].
    vr = rows[:, None]
    v_ok_r = col_ok[:, None]
    vch = tl.arange(0, HEAD_DIM)[None, :]
    srow, e = _row_meta(vg_ptr, ve_ptr, vr, v_ok_r, VGROUP, VEXACT)
    v = _rows_at(vc_ptr, vs_ptr, vz_ptr, vx_ptr, vr, vch, srow, e, v_ok_r & (vch < HEAD_DIM), v_width, v_scols,
                 VBITS, VGROUP, VEXACT, HEAD_DIM)
    if not FP32:  # the model's dtype, as dense rows would be
        k, v = k.to(q.dtype), v.to(q.dtype)
    mask = col_ok[None, :]  # no causal mask in a prefix
    return _softmax_step(acc, m_i, l_i, q, k, v, mask, qk_scale, softcap, FP32, SOFTCAP)


# t, q_len, num_splits change from call to call (decode steps): not specialized, so they cause no recompiles.
@triton.jit(do_not_specialize=["q_len", "t", "num_splits"])
def _quant_attention_kernel(
    q_ptr, offsets_ptr, k_ptr, v_ptr, out_ptr, part_ptr, sinks_ptr,
    kc_ptr, ks_ptr, kz_ptr, kg_ptr, ke_ptr, kx_ptr, k_width, k_scols,
    vc_ptr, vs_ptr, vz_ptr, vg_ptr, ve_ptr, vx_ptr, v_width, v_scols,
    pos_ptr, freq_ptr, rope_scale,
    stride_qb, stride_qh, stride_qi, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    H, q_len, t, num_splits, qk_scale, softcap,
    KBITS: tl.constexpr, KGROUP: tl.constexpr, KEXACT: tl.constexpr,
    VBITS: tl.constexpr, VGROUP: tl.constexpr, VEXACT: tl.constexpr, ROT_HALF: tl.constexpr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr, WHILE_LOOP: tl.constexpr,
    SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
):
    """Grid ``(cdiv(q_len * GROUP, BLOCK_M), B * H, num_splits)``, as the dense-prefix kernel's."""
    b, h, offs_m, row_ok, tok, qh, q = _query_tile(q_ptr, stride_qb, stride_qh, stride_qi, H, q_len,
                                                   GROUP, HEAD_DIM, BLOCK_M, UPCAST)
    p_start, n, lo, hi = _split_range(offsets_ptr, h, q_len, t, num_splits, GROUP, BLOCK_M, BLOCK_N)

    acc, m_i, l_i = _empty_state(BLOCK_M, HEAD_DIM)

    # Prefix rows [lo, min(hi, n)) of head h.
    p_hi = tl.minimum(hi, n)
    if WHILE_LOOP:  # interpreter only, see attention._attend_range
        s = lo
        while s < p_hi:
            cols = s + tl.arange(0, BLOCK_N)
            acc, m_i, l_i = _quant_block(
                acc, m_i, l_i, q, p_start + cols, cols < p_hi,
                kc_ptr, ks_ptr, kz_ptr, kg_ptr, ke_ptr, kx_ptr, k_width, k_scols,
                vc_ptr, vs_ptr, vz_ptr, vg_ptr, ve_ptr, vx_ptr, v_width, v_scols,
                pos_ptr, freq_ptr, rope_scale, qk_scale, softcap,
                KBITS, KGROUP, KEXACT, VBITS, VGROUP, VEXACT, ROT_HALF, HEAD_DIM, FP32, SOFTCAP,
            )
            s += BLOCK_N
    else:
        for s in range(lo, p_hi, BLOCK_N):
            cols = s + tl.arange(0, BLOCK_N)
            acc, m_i, l_i = _quant_block(
                acc, m_i, l_i, q, p_start + cols, cols < p_hi,
                kc_ptr, ks_ptr, kz_ptr, kg_ptr, ke_ptr, kx_ptr, k_width, k_scols,
                vc_ptr, vs_ptr, vz_ptr, vg_ptr, ve_ptr, vx_ptr, v_width, v_scols,
                pos_ptr, freq_ptr, rope_scale, qk_scale, softcap,
                KBITS, KGROUP, KEXACT, VBITS, VGROUP, VEXACT, ROT_HALF, HEAD_DIM, FP32, SOFTCAP,
            )
    acc, m_i, l_i = _attend_new(acc, m_i, l_i, q, tok, k_ptr, v_ptr, b, h, stride_kb, stride_kh, stride_kt,
                                stride_vb, stride_vh, stride_vt, n, lo, hi, q_len, t, qk_scale, pos_ptr, tok,
                                0, softcap, HEAD_DIM, BLOCK_N, FP32, UPCAST, WHILE_LOOP, False, SOFTCAP)
    _finish_tile(acc, m_i, l_i, out_ptr, part_ptr, sinks_ptr, b, offs_m, row_ok, tok, qh, H, q_len, num_splits,
                 GROUP, HEAD_DIM, SPLIT, SINKS)


def _check_quant(prefix_keys: QuantRows, prefix_values: QuantRows, positions, inv_freq, head_dim: int,
                 device) -> None:
    n = prefix_keys.rows
    for name, p in (("prefix_keys", prefix_keys), ("prefix_values", prefix_values)):
        if p.rows != n or p.codes.dtype != torch.uint8 or p.codes.shape[1] * 8 != head_dim * p.bits:
            raise ValueError(f"{name}: codes must be uint8 [{n}, {head_dim} * bits / 8], got "
                             f"{p.codes.dtype} {tuple(p.codes.shape)} at {p.bits} bits")
        tensors = [p.codes, p.scales, p.zeros] + [x for x in (p.groups, p.exact, p.exact_rows) if x is not None]
        if any(x.device != device or not x.is_contiguous() for x in tensors):
            raise ValueError(f"{name}: every tensor must be contiguous on the query's device")
    if positions.shape != (n,) or positions.dtype not in (torch.int32, torch.int64) or positions.device != device:
        raise ValueError(f"positions must be int32/int64 [{n}] on the query's device")
    if inv_freq is not None and (inv_freq.dim() != 1 or inv_freq.dtype != torch.float32 or not 1 <= 2 * inv_freq.numel()
                                 <= head_dim or inv_freq.device != device):
        raise ValueError(f"inv_freq must be float32 [R / 2] with R <= {head_dim}, on the query's device")


def quant_attention(
    query: torch.Tensor,
    prefix_keys: QuantRows,
    prefix_values: QuantRows,
    offsets: torch.Tensor,
    max_len: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    num_splits: int | None = None,
    *,
    positions: torch.Tensor,
    inv_freq: torch.Tensor | None = None,
    rope_scale: float = 1.0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over ``[quantised prefix of its KV head | causal new tokens]`` (Triton).

    As :func:`~kvcompile.kernels.attention.ragged_attention` (``query [B, Hq, q_len, D]``,
    ``offsets [H + 1]``, ``keys``/``values [B, H, t, D]``, returns ``[B, q_len, Hq, D]``),
    with the prefix's keys and values as :class:`QuantRows` (``N`` rows each, contiguous):
    keys before RoPE, rotated in the kernel to ``positions [N]`` by ``inv_freq [R / 2]``
    (fp32) and ``rope_scale`` (no rotation when ``inv_freq`` is None). No sliding window
    (a windowed layer's prefix is decoded and cut at load instead).
    """
    _check_inputs(query, offsets, keys, values)
    _check_quant(prefix_keys, prefix_values, positions, inv_freq, query.shape[3], query.device)
    _check_sinks(query, sinks)
    query, keys, values = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, keys, values))
    launch = Launch.plan(query, keys, max_len, num_splits, sinks, softcap is not None)
    if launch is None:
        return torch.empty(*_out_shape(query), dtype=query.dtype, device=query.device)
    k, v = prefix_keys, prefix_values
    _quant_attention_kernel[launch.grid](
        query, offsets, keys, values, launch.out, launch.part, launch.sinks,
        *k._args(), *v._args(),
        positions, inv_freq if inv_freq is not None else positions, float(rope_scale),
        *query.stride()[:3], *keys.stride()[:3], *values.stride()[:3],
        keys.shape[1], query.shape[2], keys.shape[2], launch.num_splits, scaling * launch.qk_factor,
        float(softcap or 1.0),
        KBITS=k.bits, KGROUP=k.group, KEXACT=k.exact is not None,
        VBITS=v.bits, VGROUP=v.group, VEXACT=v.exact is not None,
        ROT_HALF=0 if inv_freq is None else inv_freq.numel(), SOFTCAP=softcap is not None,
        **{**launch.constants, **QUANT_TILE},
    )
    return launch.finish()


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float) -> tuple[torch.Tensor, ...]:
    """``cos, sin [N, R]`` in fp32, as transformers' rotary modules compute them: angles
    ``positions x inv_freq`` in fp32, repeated for both halves, times ``rope_scale``."""
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * rope_scale, angles.sin() * rope_scale


def quant_attention_reference(
    query: torch.Tensor,
    prefix_keys: QuantRows,
    prefix_values: QuantRows,
    offsets: torch.Tensor,
    max_len: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    num_splits: int | None = None,
    *,
    positions: torch.Tensor,
    inv_freq: torch.Tensor | None = None,
    rope_scale: float = 1.0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec of :func:`quant_attention`: the prefix decoded in fp32, its keys rotated, then
    :func:`~kvcompile.kernels.attention.ragged_attention_reference`."""
    head_dim = query.shape[3]
    k, v = prefix_keys.reference(head_dim), prefix_values.reference(head_dim)
    if inv_freq is not None:
        k = rope_reference(k, *rotary_cos_sin(positions, inv_freq, rope_scale))
    return ragged_attention_reference(query, k, v, offsets, max_len, keys, values, scaling, softcap=softcap,
                                      sinks=sinks)


__all__ = ["QuantRows", "quant_attention", "quant_attention_reference", "rotary_cos_sin"]
