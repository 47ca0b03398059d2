"""A quantised pack's layer as it stays on the device: encoded rows, decoded per use.

A loaded pack keeps what a quantised codec wrote (codes, scales, zeros) on the model's
device, so its memory is the pack's, not an fp16 cache's. Attention needs dense rows:
:meth:`EncodedKV.materialise` decodes one layer (on CUDA with the Triton kernel of
``kvcompile/kernels/dequant.py`` and ``rvq.py``, elsewhere with the codec's PyTorch reference) and
rotates its keys to their positions. :class:`~kvcompile.cache.PackLayer` calls it once
per question where it pads the prefix anyway (the CPU reference), and per forward pass
on CUDA, so that at most one layer is dense at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .codecs import Codec
from .codecs.integer import IntCodec, row_groups
from .codecs.rvq import RVQCodec
from .ragged import HeadLengths, RaggedKV
from .rope import Rotary


@cache
def _kernels():
    """``kvcompile.kernels``' decoders (dequantise, RVQ), or None where Triton is missing."""
    try:
        from .kernels import dequant, rvq
    except ImportError:
        return None
    return dequant.dequantize, rvq.rvq_decode


@dataclass(frozen=True, eq=False)
class EncodedPart:
    """The keys or values of one layer as stored: ``codec``'s tensors (on the device) for rows
    in ``runs``. ``groups [N]``: each row's scale group, for per-channel integer codes (the
    kernel reads it; the runs alone would need a search per row)."""

    codec: Codec
    tensors: dict[str, torch.Tensor]
    runs: tuple[int, ...]
    head_dim: int
    groups: torch.Tensor | None = None

    @classmethod
    def place(cls, codec: Codec, tensors: dict[str, torch.Tensor], runs, head_dim: int,
              device: torch.device) -> EncodedPart:
        codec.check_values(tensors, runs)  # once, on the host: kernels read codes as indices
        tensors = {role: t.to(device) for role, t in tensors.items()}
        groups = None
        if isinstance(codec, IntCodec) and codec.per == "channel":
            groups = row_groups(runs, codec.group, device)[0].to(torch.int32)
        return cls(codec, tensors, tuple(runs), head_dim, groups)

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: the stored tensors, and the row groups (4 per row) if any."""
        extra = [] if self.groups is None else [self.groups]
        return sum(t.numel() * t.element_size() for t in [*self.tensors.values(), *extra])

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        """``[N, head_dim]`` in ``dtype``, on the tensors' device (on CUDA: one Triton launch)."""
        c, t = self.codec, self.tensors
        kernels = _kernels() if t["codes"].is_cuda else None
        if kernels is not None and isinstance(c, IntCodec):
            x = kernels[0](t["codes"], t["scales"], t["zeros"], self.groups, c.bits,
                           c.group if c.per == "token" else 0, self.head_dim, dtype)
            return c.put_outliers(x, t, self.runs, check=False)  # checked by place: no sync per step
        if kernels is not None and isinstance(c, RVQCodec):
            return kernels[1](t["codes"], t["codebooks"], t["scales"], c.interleave, self.head_dim, dtype)
        return c.decode(t, self.runs, self.head_dim).to(dtype)


@dataclass(frozen=True, eq=False)
class EncodedKV(HeadLengths):
    """One layer of a quantised pack on the device: keys (before RoPE) and values encoded;
    ``positions [N]``, ``offsets [kv_heads + 1]`` and ``lengths`` as in
    :class:`~kvcompile.ragged.RaggedKV`. ``rotary``: the layer's (None without RoPE);
    ``dtype``: the model's, which :meth:`materialise` gives."""

    keys: EncodedPart
    values: EncodedPart
    positions: torch.Tensor
    offsets: torch.Tensor
    lengths: tuple[int, ...]
    rotary: Rotary | None
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def head_dim(self) -> int:
        return self.keys.head_dim

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: the encoded parts and the positions."""
        return self.keys.nbytes + self.values.nbytes + self.positions.numel() * self.positions.element_size()

    def materialise(self) -> RaggedKV:
        """The layer as attention reads it: decoded to ``dtype``, keys rotated to their positions."""
        keys = self.keys.decode(self.dtype)
        if self.rotary is not None:
            keys = self.rotary.apply(keys, self.positions)
        return RaggedKV(keys, self.values.decode(self.dtype), self.positions, self.offsets, self.lengths)
