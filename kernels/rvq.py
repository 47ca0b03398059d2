"""Residual-VQ decode: the gather-sum of codewords, one launch per part.

Layout (kvcompile/codecs/rvq.py, docs/kvpack-format.md section 3): ``codes [N, G * depth]``
uint8 (sub-vector ``j``'s level ``l`` at column ``j * depth + l``), ``codebooks [depth, size,
group]`` and ``scales [N]`` fp16; ``G = head_dim / group`` sub-vectors per row, each either
contiguous channels (``j * group + c``) or interleaved (``j + c * G``). Row ``r``'s channel of
sub-vector ``j`` at offset ``c`` is ``scales[r] * sum_l codebooks[l, codes[r, j * depth + l], c]``,
summed in fp32.

:func:`rvq_decode` is the Triton kernel; :func:`rvq_decode_reference` the PyTorch spec.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 32


@triton.jit
def _rvq_kernel(codes_ptr, books_ptr, scales_ptr, out_ptr, n_rows,
                DEPTH: tl.constexpr, SIZE: tl.constexpr, GROUP: tl.constexpr, SUBVECTORS: tl.constexpr,
                INTERLEAVE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Grid ``(cdiv(n_rows, BLOCK_ROWS),)``."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = row_ok[:, None] & (d < HEAD_DIM)
    if INTERLEAVE:
        j, c = d % SUBVECTORS, d // SUBVECTORS
    else:
        j, c = d // GROUP, d % GROUP
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    for level in tl.static_range(DEPTH):
        code = tl.load(codes_ptr + rows64 * (SUBVECTORS * DEPTH) + j * DEPTH + level, mask=ok, other=0).to(tl.int32)
        acc += tl.load(books_ptr + (level * SIZE + code) * GROUP + c, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scales_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rows64 * HEAD_DIM + d, (acc * scale).to(out_ptr.dtype.element_ty), mask=ok)


def rvq_decode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, interleave: bool,
               head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, head_dim]`` rows in ``dtype`` (Triton, one launch). Inputs contiguous; codes must
    lie below the codebook size (the codec checks them when the pack is read)."""
    depth, size, group = codebooks.shape
    n = codes.shape[0]
    out = torch.empty(n, head_dim, dtype=dtype, device=codes.device)
    if n:
        _rvq_kernel[(triton.cdiv(n, BLOCK_ROWS),)](
            codes, codebooks, scales, out, n, DEPTH=depth, SIZE=size, GROUP=group, SUBVECTORS=head_dim // group,
            INTERLEAVE=interleave, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_ROWS=BLOCK_ROWS)
    return out


def rvq_decode_reference(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, interleave: bool,
                         head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The spec of :func:`rvq_decode`, in plain PyTorch."""
    depth, _, group = codebooks.shape
    n, g = codes.shape[0], head_dim // group
    picked = codebooks.float()[torch.arange(depth, device=codes.device), codes.long().reshape(n, g, depth)]
    v = picked.sum(2)  # [n, g, group]
    v = v.transpose(1, 2) if interleave else v
    return (v.reshape(n, head_dim) * scales.float()[:, None]).to(dtype)
