"""Rotary position embedding of stored keys, one launch per layer.

Packs store keys before RoPE; at load time each kept token's key is rotated to its position.
:func:`rope` is the Triton kernel, :func:`rope_reference` the plain PyTorch spec. Both use the
``rotate_half`` convention (Llama, Qwen, Mistral, Gemma) over the first ``R`` channels
(partial rotary when ``R < D``); the remaining channels pass through unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Fixed launch configuration (no autotune): 32 rows of up to 128 channels per program keeps a
# tile at 16 KB of fp32 registers with 4 warps; the kernel is purely memory bound.
BLOCK_ROWS = 32


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    n_rows, half, dim,
    stride_xn, stride_xd, stride_cn, stride_cd, stride_sn, stride_sd, stride_on,
    BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    """Grid ``(cdiv(n_rows, BLOCK_ROWS),)``; ``half = R / 2``, ``dim = D``."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)[:, None]

    # Rotated channels: c in [0, half) pairs with c + half.
    c = tl.arange(0, BLOCK_HALF)[None, :]
    ok = row_ok[:, None] & (c < half)
    x1 = tl.load(x_ptr + rows * stride_xn + c * stride_xd, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + rows * stride_xn + (c + half) * stride_xd, mask=ok, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + rows * stride_cn + c * stride_cd, mask=ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + rows * stride_cn + (c + half) * stride_cd, mask=ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + rows * stride_sn + c * stride_sd, mask=ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + rows * stride_sn + (c + half) * stride_sd, mask=ok, other=0.0).to(tl.float32)
    # rotate_half(x) = [-x2, x1]
    o1 = x1 * cos1 - x2 * sin1
    o2 = x2 * cos2 + x1 * sin2
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows * stride_on + c, o1.to(dtype), mask=ok)
    tl.store(out_ptr + rows * stride_on + c + half, o2.to(dtype), mask=ok)

    # Pass-through channels [2 * half, dim), if any (partial rotary).
    if BLOCK_REST > 0:
        r = 2 * half + tl.arange(0, BLOCK_REST)[None, :]
        ok = row_ok[:, None] & (r < dim)
        rest = tl.load(x_ptr + rows * stride_xn + r * stride_xd, mask=ok, other=0.0)
        tl.store(out_ptr + rows * stride_on + r, rest, mask=ok)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by RoPE over its first ``R`` channels (Triton, one launch).

    x: ``[N, D]``, any float dtype and strides. cos, sin: ``[N, R]`` with ``R <= D`` even,
    any float dtype (e.g. the model's rotary module output for each row's position).
    Returns a new contiguous ``[N, D]`` tensor in ``x``'s dtype:
    ``out[:, :R] = x[:, :R] * cos + rotate_half(x[:, :R]) * sin`` computed in fp32,
    ``out[:, R:] = x[:, R:]``.
    """
    if x.dim() != 2 or cos.dim() != 2 or cos.shape != sin.shape:
        shapes = f"{tuple(x.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}"
        raise ValueError(f"expected x [N, D] and cos/sin [N, R], got {shapes}")
    n_rows, dim = x.shape
    rot = cos.shape[1]
    if cos.shape[0] != n_rows or rot > dim or rot % 2:
        raise ValueError(f"cos/sin must be [N={n_rows}, R] with R even and <= D={dim}, got {tuple(cos.shape)}")
    if not (x.is_floating_point() and cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError("x, cos and sin must be floating point")
    if len({x.device, cos.device, sin.device}) != 1:
        raise ValueError("x, cos and sin must be on one device")
    out = torch.empty(n_rows, dim, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = rot // 2
    block_half = triton.next_power_of_2(half) if half else 0
    block_rest = triton.next_power_of_2(dim - rot) if dim > rot else 0
    if block_half == 0:  # R = 0: nothing to rotate
        out.copy_(x)
        return out
    _rope_kernel[(triton.cdiv(n_rows, BLOCK_ROWS),)](
        x, cos, sin, out,
        n_rows, half, dim,
        *x.stride(), *cos.stride(), *sin.stride(), out.stride(0),
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_HALF=block_half, BLOCK_REST=block_rest,
        num_warps=4,
    )
    return out


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The spec of :func:`rope` in plain PyTorch: fp32 math, ``x``'s dtype out."""
    rot = cos.shape[-1]
    xf, cos, sin = x.float(), cos.float(), sin.float()
    x1, x2 = xf[:, : rot // 2], xf[:, rot // 2 : rot]
    rotated = xf[:, :rot] * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, xf[:, rot:]], dim=-1).to(x.dtype)


__all__ = ["rope", "rope_reference"]
