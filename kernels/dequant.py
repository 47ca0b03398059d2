"""Bit-unpack and dequantise a layer's integer-coded rows, one launch per part.

Layout (kvcompile/codecs/integer.py, docs/kvpack-format.md section 3):

- ``codes [N, D * bits / 8]`` uint8: each row's ``D`` codes as a little-endian bit stream,
  code ``j`` in bits ``[bits * j, bits * (j + 1))`` (3-bit codes straddle bytes);
- ``scales``, ``zeros`` fp16, either per channel over groups of rows (``[G, D]``, row
  ``r`` in group ``groups[r]``) or per row over groups of ``group`` channels
  (``[N, D / group]``);
- ``x[r, j] = code * scale + zero``, computed in fp32 and stored in the output dtype.

:func:`dequantize` is the Triton kernel; :func:`dequantize_reference` the plain PyTorch
spec it is tested against (``tests/test_kernels.py``, under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Fixed launch configuration (no autotune): 32 rows of up to 256 channels per program, a
# purely memory-bound gather.
BLOCK_ROWS = 32


@triton.jit
def dequant_at(codes_ptr, scales_ptr, zeros_ptr, rows, ch, srow, ok, width, n_scale_cols,
               BITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """fp32 values of rows ``rows`` (int64) at channels ``ch``, broadcast against each other.

    ``srow``: each row's scale row, its group ``groups[row]`` for per-channel scales (``GROUP``
    = 0), else the row itself (per-row scales over ``GROUP`` channels). Masked-off entries are 0.
    The attention kernel over quantised rows (quant_attention.py) dequantises with this too.
    """
    bit = ch * BITS
    byte = bit // 8
    lo = tl.load(codes_ptr + rows * width + byte, mask=ok, other=0).to(tl.int32)
    if BITS == 3:  # only 3-bit codes straddle into the next byte
        hi = tl.load(codes_ptr + rows * width + byte + 1, mask=ok & (byte + 1 < width), other=0).to(tl.int32)
        lo = (hi << 8) | lo
    q = (lo >> (bit % 8)) & ((1 << BITS) - 1)
    if GROUP == 0:
        at = srow * HEAD_DIM + ch
    else:
        at = srow * n_scale_cols + ch // GROUP
    scale = tl.load(scales_ptr + at, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + at, mask=ok, other=0.0).to(tl.float32)
    return q.to(tl.float32) * scale + zero


@triton.jit
def _dequant_kernel(
    codes_ptr, scales_ptr, zeros_ptr, groups_ptr, out_ptr,
    n_rows, width, n_scale_cols,
    BITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Grid ``(cdiv(n_rows, BLOCK_ROWS),)``. ``GROUP`` = channels per scale (per-row scales), or
    0 for per-channel scales indexed by ``groups[row]``."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = row_ok[:, None] & (d < HEAD_DIM)
    if GROUP == 0:
        srow = tl.load(groups_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None]
    else:
        srow = rows64
    x = dequant_at(codes_ptr, scales_ptr, zeros_ptr, rows64, d, srow, ok, width, n_scale_cols, BITS, GROUP, HEAD_DIM)
    tl.store(out_ptr + rows64 * HEAD_DIM + d, x.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groups: torch.Tensor | None,
               bits: int, group: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, head_dim]`` rows in ``dtype`` from integer codes (Triton, one launch).

    codes: ``[N, head_dim * bits / 8]`` uint8, contiguous. scales, zeros: fp16, contiguous;
    ``[G, head_dim]`` with ``groups [N]`` (int32, each row's group) when ``group == 0``,
    else ``[N, head_dim / group]``.
    """
    n = codes.shape[0]
    out = torch.empty(n, head_dim, dtype=dtype, device=codes.device)
    if n == 0:
        return out
    if group == 0 and groups is None:
        raise ValueError("per-channel scales need each row's group")
    grid = (triton.cdiv(n, BLOCK_ROWS),)
    _dequant_kernel[grid](
        codes, scales, zeros, groups if groups is not None else codes, out,
        n, codes.shape[1], scales.shape[1],
        BITS=bits, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_ROWS=BLOCK_ROWS,
    )
    return out


def dequantize_reference(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         groups: torch.Tensor | None, bits: int, group: int, head_dim: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """The spec of :func:`dequantize`, in plain PyTorch."""
    n = codes.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    stream = ((codes[..., None] >> shifts) & 1).reshape(n, head_dim, bits).long()
    q = (stream << torch.arange(bits, device=codes.device)).sum(-1).float()
    if group == 0:
        s, z = scales.float()[groups.long()], zeros.float()[groups.long()]
    else:
        s, z = (t.float().repeat_interleave(group, dim=1) for t in (scales, zeros))
    return (q * s + z).to(dtype)
