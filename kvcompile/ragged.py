"""The one ragged KV type: one layer's kept tokens, a different number per KV head.

Per-head budgets mean that KV head ``h`` of a layer keeps ``n_h`` tokens, and nothing
is padded. A layer's KV is therefore flat rows grouped by head, with cu_seqlens-style
offsets (architecture principle 9)::

    keys      [N, head_dim]    rows of head 0, then head 1, ...; by position within a head
    values    [N, head_dim]
    positions [N]              each row's token position (int64)
    offsets   [kv_heads + 1]   head h owns rows offsets[h]:offsets[h + 1]  (on the rows' device)
    lengths   (n_0, ..., n_H-1) the same counts on the host, so shapes never need a sync

The compiler produces it, the pack stores exactly these rows, the loader places it on
the device once, and the attention (reference or Triton kernel) reads it. A model's KV
is a ``list[RaggedKV]``, one per layer; a segment's rows are those whose positions lie
in its token range (rows are sorted by position within each head).

The same type holds several layers at once: :meth:`RaggedKV.stack` makes the layers'
heads one sequence of ``layers x kv_heads`` heads (layer-major), so the compiler scores,
selects and concatenates every layer in one set of tensor ops, and :meth:`split` gives
the layers back as views.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch


def head_offsets(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[heads + 1]`` the prefix sums of ``lengths`` (int64, on ``device``)."""
    # Built on the host and copied: only where no device-side counts exist (reading a pack).
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int64).to(device)


def runs(positions: torch.Tensor, lengths: Sequence[int], boundaries: Sequence[int]) -> list[int]:
    """Rows per (head, bin), head-major, zeros included: ``heads x (len(boundaries) + 1)``.

    ``positions [N]`` of rows grouped by head (``lengths[h]`` rows each), sorted within a
    head. Bin ``b`` holds positions in ``[boundaries[b - 1], boundaries[b])`` (bin 0 all
    before ``boundaries[0]``). With a pack's segment starts as boundaries, a run is one
    head's rows of the framing or of one segment: a contiguous block of rows. Codecs
    never group across runs.
    """
    bins, heads = len(boundaries) + 1, len(lengths)
    edges = torch.tensor(list(boundaries), dtype=torch.int64, device=positions.device)
    head = torch.repeat_interleave(torch.arange(heads, device=positions.device),
                                   torch.tensor(list(lengths), device=positions.device), output_size=positions.numel())
    index = head * bins + torch.searchsorted(edges, positions, right=True)
    return torch.bincount(index, minlength=heads * bins).tolist()


def within_heads(lengths: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[N]`` each row's index within its head, for rows grouped by head with ``lengths``."""
    lengths_t = torch.tensor(list(lengths), dtype=torch.int64, device=device)
    n = int(sum(lengths))
    starts = torch.cumsum(lengths_t, 0) - lengths_t
    return torch.arange(n, device=device) - torch.repeat_interleave(starts, lengths_t, output_size=n)


class HeadLengths:
    """The shape of per-head ragged rows, from ``lengths`` (one count per KV head)."""

    lengths: tuple[int, ...]

    @property
    def heads(self) -> int:
        return len(self.lengths)

    @property
    def rows(self) -> int:
        return sum(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)


@dataclass(frozen=True, eq=False)
class RaggedKV(HeadLengths):
    """One layer's KV with per-head lengths (see the module docstring for shapes)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    offsets: torch.Tensor
    lengths: tuple[int, ...]

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_rows(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  lengths: Sequence[int], offsets: torch.Tensor | None = None) -> RaggedKV:
        """Rows already grouped by head with ``lengths[h]`` rows for head ``h``.

        ``offsets``: the same counts as a device tensor, where the caller has one (it
        saves a blocking host-to-device copy).
        """
        lengths = tuple(int(n) for n in lengths)
        return cls(keys, values, positions, head_offsets(lengths, keys.device) if offsets is None else offsets, lengths)

    @classmethod
    def empty(cls, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str) -> RaggedKV:
        rows = torch.empty(0, head_dim, dtype=dtype, device=device)
        offsets = torch.zeros(kv_heads + 1, dtype=torch.int64, device=device)
        return cls(rows, rows, torch.empty(0, dtype=torch.int64, device=device), offsets, (0,) * kv_heads)

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> RaggedKV:
        """Every head holding ``t`` tokens: ``keys, values [kv_heads, t, head_dim]``; ``positions``
        ``[t]`` (the same tokens in every head) or ``[kv_heads, t]``."""
        heads, t, d = keys.shape
        positions = positions.to(keys.device, torch.int64)
        positions = positions.repeat(heads) if positions.dim() == 1 else positions.reshape(heads * t)
        offsets = torch.arange(heads + 1, device=keys.device) * t
        return cls(keys.reshape(heads * t, d), values.reshape(heads * t, d), positions, offsets, (t,) * heads)

    @classmethod
    def cat(cls, parts: Sequence[RaggedKV]) -> RaggedKV:
        """Head by head, the rows of ``parts`` one after another (``[a_0 b_0 | a_1 b_1 | ...]``).

        One gather for all heads: the rows of every part are stacked, then stably sorted
        by head, which keeps each head's rows in part order.
        """
        parts = [p for p in parts if p.rows] or list(parts[:1])
        if len(parts) == 1:
            return parts[0]
        heads = parts[0].heads
        head = torch.cat([p.head_ids() for p in parts])
        order = torch.sort(head, stable=True).indices
        lengths = [sum(p.lengths[h] for p in parts) for h in range(heads)]
        offsets = torch.stack([p.offsets for p in parts]).sum(0)
        return cls.from_rows(torch.cat([p.keys for p in parts])[order], torch.cat([p.values for p in parts])[order],
                             torch.cat([p.positions for p in parts])[order], lengths, offsets)

    @classmethod
    def stack(cls, layers: Sequence[RaggedKV]) -> RaggedKV:
        """Several layers as one: their heads one after another (layer-major)."""
        if len(layers) == 1:
            return layers[0]
        lengths = [n for layer in layers for n in layer.lengths]
        starts, base = [], 0  # each layer's head starts, moved past the layers before it
        for layer in layers:
            starts.append(layer.offsets[:-1] - layer.offsets[0] + base)
            base += layer.rows
        offsets = torch.cat([*starts, layers[0].offsets.new_full((1,), base)])
        return cls(torch.cat([layer.keys for layer in layers]), torch.cat([layer.values for layer in layers]),
                   torch.cat([layer.positions for layer in layers]), offsets, tuple(lengths))

    def split(self, parts: int) -> list[RaggedKV]:
        """The inverse of :meth:`stack`: ``parts`` layers of ``heads / parts`` heads, as views."""
        per = self.heads // parts
        out, row = [], 0
        for i in range(parts):
            lengths = self.lengths[i * per : (i + 1) * per]
            n = sum(lengths)
            offsets = self.offsets[i * per : (i + 1) * per + 1] - row
            out.append(RaggedKV(self.keys[row : row + n], self.values[row : row + n],
                                self.positions[row : row + n], offsets, lengths))
            row += n
        return out

    # -- shape -----------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def materialise(self) -> RaggedKV:
        """Itself: the rows attention reads (as :meth:`EncodedKV.materialise` gives them)."""
        return self

    @cached_property
    def _head_ids(self) -> torch.Tensor:
        heads = torch.arange(self.heads, device=self.keys.device)
        return heads.repeat_interleave(self.offsets.diff(), output_size=self.rows)

    def head_ids(self) -> torch.Tensor:
        """``[N]`` the KV head of each row (computed once per layout)."""
        return self._head_ids

    @cached_property
    def _padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        j = torch.arange(self.max_len, device=self.keys.device)
        valid = j < self.offsets.diff()[:, None]
        return torch.where(valid, self.offsets[:-1, None] + j, 0), valid

    def padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``index [kv_heads, max_len]`` into the rows and ``valid [kv_heads, max_len]``.

        Gathering with ``index`` pads every head to the longest one (padding repeats
        row 0, or reads nothing when there are no rows); ``valid`` marks the real rows.
        Computed once per layout.
        """
        return self._padded_index

    def head_local_index(self) -> torch.Tensor:
        """``[N]`` each row's index within its head (the column of :meth:`padded_index`)."""
        head = self.head_ids()
        return torch.arange(self.rows, device=self.keys.device) - self.offsets[head]

    def runs(self, boundaries: Sequence[int]) -> list[int]:
        """Rows per (head, bin), head-major: :func:`runs` of this layer's rows."""
        return runs(self.positions, self.lengths, boundaries)

    def head_counts(self, mask: torch.Tensor) -> torch.Tensor:
        """``[kv_heads]`` how many rows of each head ``mask [N]`` selects (on the device)."""
        counts = torch.zeros(self.heads, dtype=torch.int64, device=mask.device)
        return counts.index_add_(0, self.head_ids(), mask.long())

    # -- derived layers --------------------------------------------------------------

    def take(self, mask: torch.Tensor, lengths: Sequence[int], counts: torch.Tensor | None = None) -> RaggedKV:
        """The rows where ``mask [N]`` is true, which hold ``lengths[h]`` rows of head ``h``.

        The caller knows the counts (one sync for all layers; ``counts`` is the same on
        the device), so this never syncs: a stable sort puts the kept rows first, in order.
        """
        n = sum(lengths)
        index = torch.sort((~mask).to(torch.uint8), stable=True).indices[:n]
        offsets = None if counts is None else torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return RaggedKV.from_rows(self.keys[index], self.values[index], self.positions[index], lengths, offsets)

    def where(self, mask: torch.Tensor) -> RaggedKV:
        """The rows where ``mask [N]`` is true (syncs once to count them)."""
        counts = self.head_counts(mask)
        return self.take(mask, counts.tolist(), counts)

    def span(self, lo: int, hi: int) -> RaggedKV:
        """The rows whose positions lie in ``[lo, hi)``: one segment's rows."""
        return self.where((self.positions >= lo) & (self.positions < hi))

    def replace(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> RaggedKV:
        """The same layout with other rows (same count) or positions."""
        return RaggedKV(self.keys if keys is None else keys, self.values if values is None else values,
                        self.positions if positions is None else positions, self.offsets, self.lengths)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RaggedKV:
        """On ``device`` (positions and offsets too), keys and values in ``dtype``."""
        return RaggedKV(self.keys.to(device, dtype), self.values.to(device, dtype), self.positions.to(device),
                        self.offsets.to(device), self.lengths)

    def shifted(self, delta: int) -> RaggedKV:
        """Positions moved by ``delta`` (rows unchanged)."""
        return self.replace(positions=self.positions + delta) if delta else self
