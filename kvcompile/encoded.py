"""A quantised pack's layer as it stays on the device: encoded rows, decoded per use.

A loaded pack keeps what a quantised codec wrote (codes, scales, zeros) on the model's
device, so its memory is the pack's, not an fp16 cache's. Attention reads it in one of two ways:

- integer codes on CUDA: :meth:`EncodedKV.attend` runs the attention kernel over the codes
  (``kvcompile/kernels/quant_attention.py``), which dequantises and rotates each block of
  keys in registers; no dense copy of the layer is ever written;
- otherwise (RVQ, rotaries the kernel cannot reproduce, the CPU): :meth:`EncodedKV.materialise`
  decodes the layer (on CUDA with the Triton kernels of ``kernels/dequant.py`` and ``rvq.py``,
  elsewhere with the codec's PyTorch reference) and rotates its keys. :class:`~kvcompile.cache.PackLayer`
  calls it once per question where it pads the prefix anyway (the CPU reference), and per
  forward pass on CUDA, so that at most one layer is dense at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property

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
    in ``runs``. For integer codes, what kernels read besides (the runs alone would need a
    search per row): ``groups [N]`` int32, each row's scale group (per-channel codes), and
    ``exact [N]`` int32, -1 or the exactly stored row that replaces the row (``outliers``)."""

    codec: Codec
    tensors: dict[str, torch.Tensor]
    runs: tuple[int, ...]
    head_dim: int
    groups: torch.Tensor | None = None
    exact: torch.Tensor | None = None

    @classmethod
    def place(cls, codec: Codec, tensors: dict[str, torch.Tensor], runs, head_dim: int,
              device: torch.device) -> EncodedPart:
        codec.check_values(tensors, runs)  # once, on the host: kernels read codes as indices
        tensors = {role: t.to(device) for role, t in tensors.items()}
        groups = exact = None
        if isinstance(codec, IntCodec):
            if codec.per == "channel":
                groups = row_groups(runs, codec.group, device)[0].to(torch.int32)
            exact = codec.exact_index(tensors, runs)
        return cls(codec, tensors, tuple(runs), head_dim, groups, exact)

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: the stored tensors, and the row groups and exact-row
        index (4 bytes per row each) if any."""
        extra = [t for t in (self.groups, self.exact) if t is not None]
        return sum(t.numel() * t.element_size() for t in [*self.tensors.values(), *extra])

    @cached_property
    def quant_rows(self):
        """The part as :func:`~kvcompile.kernels.quant_attention.quant_attention` reads it
        (integer codes only; made once, read by every decode step)."""
        from .kernels.quant_attention import QuantRows

        c, t = self.codec, self.tensors
        return QuantRows(t["codes"], t["scales"], t["zeros"], self.groups, c.bits,
                         0 if c.per == "channel" else c.group, self.exact, t.get("outliers"))

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

    @cached_property
    def attends_encoded(self) -> bool:
        """Whether :meth:`attend` can read this layer as it is stored: integer codes, and keys
        without RoPE or with a rotary the kernel can reproduce (:meth:`Rotary.frequencies`)."""
        return all(isinstance(p.codec, IntCodec) for p in (self.keys, self.values)) and (
            self.rotary is None or self._frequencies is not None)

    @cached_property
    def _frequencies(self) -> tuple[torch.Tensor, float] | None:
        return None if self.rotary is None else self.rotary.frequencies(self.positions)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
               softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``query [B, Hq, q_len, D]`` over this layer followed by the dense new
        tokens ``keys``/``values [B, H, t, D]`` (causal), reading the codes directly (one Triton
        launch, :func:`~kvcompile.kernels.quant_attention.quant_attention`); ``[B, q_len, Hq, D]``.
        Only where :attr:`attends_encoded`."""
        from .kernels.quant_attention import quant_attention

        inv_freq, rope_scale = self._frequencies or (None, 1.0)
        return quant_attention(query, self.keys.quant_rows, self.values.quant_rows, self.offsets, self.max_len,
                               keys, values, scaling, positions=self.positions, inv_freq=inv_freq,
                               rope_scale=rope_scale, softcap=softcap, sinks=sinks)

    def materialise(self) -> RaggedKV:
        """The layer as attention reads it: decoded to ``dtype``, keys rotated to their positions."""
        keys = self.keys.decode(self.dtype)
        if self.rotary is not None:
            keys = self.rotary.apply(keys, self.positions)
        return RaggedKV(keys, self.values.decode(self.dtype), self.positions, self.offsets, self.lengths)
