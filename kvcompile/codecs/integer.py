"""Integer codecs: asymmetric min/max group quantisation (KIVI), 2, 3, 4 or 8 bits.

Each group of values is stored as codes ``q`` in ``[0, 2^bits)`` with an fp16 ``scale``
and ``zero`` (the group's minimum): ``x ~ q * scale + zero``, ``scale = (max - min) /
(2^bits - 1)``. Where the group lies depends on ``per``:

- ``per="channel"`` (keys): each channel over ``group`` consecutive rows of one run
  (one KV head of one segment); a run's last group may be shorter. Keys have a few
  channels of large magnitude (KIVI), and pre-RoPE they hold still across tokens, so a
  scale per channel fits them. ``scales``/``zeros``: ``[groups, head_dim]``.
- ``per="token"`` (values): each row over ``group`` consecutive channels.
  ``scales``/``zeros``: ``[N, head_dim / group]``.

With ``outliers`` (a share), each run's ``ceil(outliers x run)`` rows farthest from the
run's mean are stored exactly (fp16 ``outliers [K, D]`` and their index within the run,
``outlier_rows [K]``), and the group ranges are taken without them: the dense-and-sparse
split of KVQuant, which KVmix's full-precision share becomes in a pack (methods.md).

Codes are packed little-endian into a bit stream per row, ``head_dim * bits / 8``
bytes: value ``j`` of a row occupies bits ``[bits * j, bits * (j + 1))``, so 3-bit
codes straddle bytes and 2, 4 and 8-bit ones never do (docs/kvpack-format.md, section
3). The Triton kernel (kvcompile/kernels/dequant.py) reads the same layout.

Re-encoding decoded rows need not give back the same bytes (fp16 scales and zeros
round), so a rebuild never does it: it copies a reused segment's encoded blocks
(:func:`~kvcompile.codecs.copy_runs`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import PackError
from . import Codec, register

BITS = (2, 3, 4, 8)
PER = ("channel", "token")
MAX_GROUP = 4096


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes [N, D]`` (uint8, each < 2^bits; ``D * bits`` a multiple of 8) -> ``[N, D * bits / 8]`` uint8."""
    n, d = codes.shape
    stream = (codes[..., None] >> torch.arange(bits, dtype=torch.uint8, device=codes.device)) & 1
    stream = stream.reshape(n, d * bits // 8, 8)
    out = stream[..., 0].clone()
    for i in range(1, 8):
        out |= stream[..., i] << i
    return out


def unpack_bits(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: ``[N, head_dim * bits / 8]`` -> ``[N, head_dim]`` uint8."""
    n = packed.shape[0]
    stream = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    stream = stream.reshape(n, head_dim, bits)
    out = stream[..., 0].clone()
    for i in range(1, bits):
        out |= stream[..., i] << i
    return out


def run_rows(runs: Sequence[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """``run [N]`` each row's run, ``first [R]`` each run's first row, ``r [R]`` the runs' lengths."""
    r = torch.tensor(list(runs), dtype=torch.int64, device=device)
    run = torch.repeat_interleave(torch.arange(len(r), device=device), r, output_size=int(sum(runs)))
    return run, torch.cumsum(r, 0) - r, r


def row_groups(runs: Sequence[int], group: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """``[N]`` each row's group for per-channel quantisation (groups of ``group`` rows, never
    across a run), and the number of groups."""
    run, first_row, r = run_rows(runs, device)
    per_run = (r + group - 1) // group
    first_group = torch.cumsum(per_run, 0) - per_run
    within = torch.arange(run.numel(), device=device) - first_row[run]
    return first_group[run] + within // group, int(per_run.sum())


class IntCodec(Codec):
    name = "int"

    def __init__(self, bits: int, per: str, group: int, outliers: float = 0.0):
        if type(bits) is not int or bits not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
        if per not in PER:
            raise ValueError(f"per must be 'channel' or 'token', got {per!r}")
        if type(group) is not int or not 1 <= group <= MAX_GROUP:
            raise ValueError(f"group must be an integer in [1, {MAX_GROUP}], got {group!r}")
        if type(outliers) not in (int, float) or not 0 <= outliers <= 1:
            raise ValueError(f"outliers must be a share in [0, 1], got {outliers!r}")
        self.bits, self.per, self.group, self.outliers = bits, per, group, float(outliers)

    def params(self) -> dict:
        out = {"bits": self.bits, "per": self.per, "group": self.group}
        if self.outliers:
            out["outliers"] = self.outliers
        return out

    @property
    def quantised(self) -> bool:
        return True

    def units(self, role: str, run: int) -> int:
        if role in ("outliers", "outlier_rows"):
            return math.ceil(self.outliers * run)
        if self.per == "channel" and role != "codes":
            return (run + self.group - 1) // self.group
        return run

    def check(self, head_dim: int) -> None:
        """Raises ValueError when rows of ``head_dim`` channels cannot take this codec."""
        if head_dim % 8:
            raise ValueError(f"head_dim {head_dim} is not a multiple of 8, which packed codes need")
        if self.per == "token" and head_dim % self.group:
            raise ValueError(f"a group of {self.group} channels does not divide head_dim {head_dim}")

    def layout(self, runs: Sequence[int], head_dim: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        self.check(head_dim)
        n = sum(runs)
        groups = (sum(self.units("scales", r) for r in runs), head_dim) if self.per == "channel" \
            else (n, head_dim // self.group)
        out = {"codes": ("U8", (n, head_dim * self.bits // 8)), "scales": ("F16", groups), "zeros": ("F16", groups)}
        if self.outliers:
            k = sum(self.units("outliers", r) for r in runs)
            out.update({"outliers": ("F16", (k, head_dim)), "outlier_rows": ("I32", (k,))})
        return out

    def _groups(self, runs: Sequence[int], device) -> tuple[torch.Tensor, int] | None:
        """Per-channel codes: :func:`row_groups` (computed once per encode or decode); else None."""
        return row_groups(runs, self.group, device) if self.per == "channel" else None

    def _params(self, x: torch.Tensor, groups: tuple[torch.Tensor, int] | None,
                exact: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp16 ``scales``, ``zeros`` of ``x [N, D]`` (fp32), laid out as :meth:`layout` says;
        rows where ``exact [N]`` is true (stored exactly) do not count."""
        levels = (1 << self.bits) - 1
        low = x if exact is None else x.masked_fill(exact[:, None], math.inf)
        high = x if exact is None else x.masked_fill(exact[:, None], -math.inf)
        if groups is not None:
            gid, groups = groups
            index = gid[:, None].expand_as(x)
            lo = x.new_zeros(groups, x.shape[1]).scatter_reduce_(0, index, low, "amin", include_self=False)
            hi = x.new_zeros(groups, x.shape[1]).scatter_reduce_(0, index, high, "amax", include_self=False)
        else:
            shape = (x.shape[0], x.shape[1] // self.group, self.group)
            lo, hi = low.reshape(shape).amin(-1), high.reshape(shape).amax(-1)
        empty = lo > hi  # every row of the group is exact
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
        zeros, scales = lo.to(torch.float16), ((hi - lo) / levels).to(torch.float16)
        if not (torch.isfinite(zeros).all() and torch.isfinite(scales).all()):
            raise ValueError("values beyond fp16's range cannot be quantised: build without --quant")
        return scales, zeros

    def _per_row(self, t: torch.Tensor, groups: tuple[torch.Tensor, int] | None) -> torch.Tensor:
        """Group parameters ``t`` broadcast to ``[N, D]`` (fp32)."""
        if groups is not None:
            return t.float()[groups[0]]
        return t.float().repeat_interleave(self.group, dim=1)

    def _exact_rows(self, x: torch.Tensor, runs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each run's ``ceil(outliers x run)`` rows farthest (L2) from the run's mean row; ties
        to the earlier row. Those rows stretch the groups' ranges (keys: an attention sink's
        key sets its channels' ranges, and quantises well itself while the rest do not),
        so they are the ones to take out. Returns the mask ``[N]``, and their indices within
        their runs in row order."""
        dev = x.device
        run, first, r = run_rows(runs, dev)
        mean = x.new_zeros(len(runs), x.shape[1]).index_add_(0, run, x) / r.clamp_min(1)[:, None]
        error = (x - mean[run]).norm(dim=1)
        order = torch.sort(error, descending=True, stable=True).indices
        order = order[torch.sort(run[order], stable=True).indices]  # by run, farthest first
        rank = torch.arange(x.shape[0], device=dev) - first[run[order]]
        wanted = torch.tensor([self.units("outliers", n) for n in runs], dtype=torch.int64, device=dev)
        exact = torch.zeros(x.shape[0], dtype=torch.bool, device=dev)
        exact[order[rank < wanted[run[order]]]] = True
        rows = exact.nonzero()[:, 0]
        return exact, rows - first[run[rows]]

    def encode(self, x: torch.Tensor, runs: Sequence[int]) -> dict[str, torch.Tensor]:
        self.check(x.shape[1])
        x = x.detach().float()  # on its device: the compiler's round trip stays there; the writer's rows are on the CPU
        exact, local = self._exact_rows(x, runs) if self.outliers else (None, None)
        groups = self._groups(runs, x.device)
        scales, zeros = self._params(x, groups, exact)
        s, z = self._per_row(scales, groups), self._per_row(zeros, groups)
        q = torch.where(s > 0, torch.round((x - z) / torch.where(s > 0, s, 1.0)), 0.0)
        codes = q.clamp(0, (1 << self.bits) - 1).to(torch.uint8)
        out = {"scales": scales, "zeros": zeros}
        if exact is not None:
            codes[exact] = 0  # never read: the exact rows replace them
            out.update({"outliers": x[exact].to(torch.float16), "outlier_rows": local.to(torch.int32)})
        out["codes"] = pack_bits(codes, self.bits)
        return out

    def decode(self, tensors: dict[str, torch.Tensor], runs: Sequence[int], head_dim: int) -> torch.Tensor:
        codes = unpack_bits(tensors["codes"], self.bits, head_dim).float()
        groups = self._groups(runs, codes.device)
        x = codes * self._per_row(tensors["scales"], groups) + self._per_row(tensors["zeros"], groups)
        return self.put_outliers(x, tensors, runs)

    def put_outliers(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], runs: Sequence[int],
                     check: bool = True) -> torch.Tensor:
        """``x [N, D]`` (dequantised rows) with the rows stored exactly put in place (in place).
        ``check``: validate their indices first (a host sync; skip where that was done once)."""
        if not self.outliers:
            return x
        if check:
            self.check_values(tensors, runs)
        x[self._stored_rows(tensors, runs)] = tensors["outliers"].to(x.dtype)
        return x

    def exact_index(self, tensors: dict[str, torch.Tensor], runs: Sequence[int]) -> torch.Tensor | None:
        """``[N]`` int32: for each row, -1, or the row of ``tensors["outliers"]`` stored for it
        (the lookup the attention kernel over codes reads); None without exact rows."""
        if not self.outliers:
            return None
        rows = self._stored_rows(tensors, runs)
        index = torch.full((int(sum(runs)),), -1, dtype=torch.int32, device=rows.device)
        index[rows] = torch.arange(rows.numel(), dtype=torch.int32, device=rows.device)
        return index

    def _stored_rows(self, tensors: dict[str, torch.Tensor], runs: Sequence[int]) -> torch.Tensor:
        """``[K]`` the rows (in the part) of the exactly stored rows: their run's first row + their index in it."""
        local, run, r = self._outlier_runs(tensors, runs)
        return (torch.cumsum(r, 0) - r)[run] + local

    def _outlier_runs(self, tensors: dict[str, torch.Tensor], runs: Sequence[int]):
        """Each exact row's index within its run, its run, and the runs' lengths (on the tensors' device)."""
        local = tensors["outlier_rows"].long()
        r = torch.tensor(list(runs), dtype=torch.int64, device=local.device)
        wanted = torch.tensor([self.units("outliers", n) for n in runs], dtype=torch.int64, device=local.device)
        run = torch.repeat_interleave(torch.arange(len(runs), device=local.device), wanted, output_size=local.numel())
        return local, run, r

    def check_values(self, tensors: dict[str, torch.Tensor], runs: Sequence[int]) -> None:
        if self.outliers:
            local, run, r = self._outlier_runs(tensors, runs)
            if local.numel() and not ((local >= 0) & (local < r[run])).all():
                raise PackError("corrupt pack: an exactly stored row lies outside its run: rebuild it")


register("int", IntCodec)
