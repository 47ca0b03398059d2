"""Residual vector quantisation (methods.md, section 4), with codebooks learned on the pack's own KV.

A row ``x [head_dim]`` is divided by its scale ``s = sqrt(mean(x^2))`` (no mean
subtraction), and split into sub-vectors of ``group`` channels: contiguous for values,
interleaved for keys (sub-vector ``j`` takes channels ``j, j + G, j + 2G, ...`` with ``G
= head_dim / group`` sub-vectors), which quantise better since a key's large channels
spread over all sub-vectors. Each sub-vector is coded by ``depth`` levels: the nearest
codeword of level 1's codebook, then of level 2's for what is left, and so on. Decoding
sums the codewords and multiplies by the scale.

Codebooks (``[depth, size, group]``, fp16) are shared by every sub-vector and head of
one layer's keys (or values) and learned when the pack is written, on exactly the rows
they code: k-means++ seeding then Lloyd iterations on a sample, with a fixed seed, so
equal inputs give equal bytes. They travel with the pack; their size is chosen so that
they stay under a tenth of what they code (:meth:`RVQCodec.fit`).

Tensors: ``codes [N, G * depth]`` (U8, sub-vector-major), ``scales [N]`` (F16),
``codebooks [depth, size, group]`` (F16). Codebooks are not per run: a rebuild recompiles
every document of an RVQ pack (kvcompile/pipeline.py).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import PackError
from . import Codec, register

MAX_SIZE = 256  # codes are one byte
SAMPLE = 16384  # sub-vectors a level's codebook is learned on
CODEBOOK_SHARE = 0.1  # codebooks at most this share of the bytes they code


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` centroids of ``x [n, d]`` (fp32): k-means++ seeding, then ``iters`` Lloyd steps.

    Deterministic for a given generator state. Fewer distinct points than ``k`` leave
    duplicated centroids, which cost nothing but their bytes.
    """
    n = x.shape[0]
    centres = x[torch.randint(n, (1,), generator=generator)]
    dist = torch.cdist(x, centres).squeeze(1) ** 2
    for _ in range(1, k):
        total = dist.sum()
        pick = torch.multinomial(dist / total, 1, generator=generator) if total > 0 else \
            torch.randint(n, (1,), generator=generator)
        centres = torch.cat([centres, x[pick]])
        dist = torch.minimum(dist, ((x - x[pick]) ** 2).sum(1))
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        moved = sums / counts.clamp_min(1)[:, None]
        centres = torch.where(counts[:, None] > 0, moved, centres)  # an empty cluster keeps its centre
    return centres


class RVQCodec(Codec):
    name = "rvq"

    def __init__(self, depth: int, size: int, group: int, interleave: bool, seed: int = 0, iters: int = 8):
        for name, value, lo, hi in (("depth", depth, 1, 16), ("size", size, 2, MAX_SIZE), ("group", group, 1, 256),
                                    ("seed", seed, 0, 2**31 - 1), ("iters", iters, 0, 100)):
            if type(value) is not int or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if type(interleave) is not bool:
            raise ValueError(f"interleave must be true or false, got {interleave!r}")
        self.depth, self.size, self.group, self.interleave = depth, size, group, interleave
        self.seed, self.iters = seed, iters

    def params(self) -> dict:
        return {"depth": self.depth, "size": self.size, "group": self.group, "interleave": self.interleave,
                "seed": self.seed, "iters": self.iters}

    @property
    def quantised(self) -> bool:
        return True

    @property
    def per_run(self) -> bool:
        return False

    def check(self, head_dim: int) -> None:
        if head_dim % self.group:
            raise ValueError(f"a group of {self.group} channels does not divide head_dim {head_dim}")

    def fit(self, rows: int, head_dim: int) -> RVQCodec:
        """This codec with the largest codebook (a power of two, at most ``size``) whose bytes
        stay under :data:`CODEBOOK_SHARE` of the ``rows`` rows' codes and scales."""
        coded = rows * (head_dim // self.group * self.depth + 2)
        size = self.size
        while size > 2 and (books := self.depth * size * self.group * 2) > CODEBOOK_SHARE * (coded + books):
            size //= 2
        return RVQCodec(self.depth, size, self.group, self.interleave, self.seed, self.iters)

    def layout(self, runs: Sequence[int], head_dim: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        self.check(head_dim)
        n = sum(runs)
        return {"codes": ("U8", (n, head_dim // self.group * self.depth)), "scales": ("F16", (n,)),
                "codebooks": ("F16", (self.depth, self.size, self.group))}

    def units(self, role: str, run: int) -> int:
        if role == "codebooks":
            raise ValueError("RVQ codebooks are shared by every run: its packs are rebuilt whole")
        return run

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` -> sub-vectors ``[N, G, group]``."""
        n, d = y.shape
        g = d // self.group
        if self.interleave:  # sub-vector j: channels j, j + g, j + 2g, ...
            return y.reshape(n, self.group, g).transpose(1, 2)
        return y.reshape(n, g, self.group)

    def _join(self, v: torch.Tensor) -> torch.Tensor:
        n, g, _ = v.shape
        return (v.transpose(1, 2) if self.interleave else v).reshape(n, g * self.group)

    def encode(self, x: torch.Tensor, runs: Sequence[int]) -> dict[str, torch.Tensor]:
        self.check(x.shape[1])
        x = x.detach().float().cpu()
        n, d = x.shape
        scales = x.pow(2).mean(1).sqrt().to(torch.float16)
        s = scales.float()
        residual = self._split(x / torch.where(s > 0, s, 1.0)[:, None]).reshape(-1, self.group)
        generator = torch.Generator().manual_seed(self.seed)
        books, codes = [], []
        for _ in range(self.depth):
            if residual.shape[0]:
                sample = residual[torch.randperm(residual.shape[0], generator=generator)[:SAMPLE]]
                book = kmeans(sample, self.size, self.iters, generator).to(torch.float16)
            else:
                book = torch.zeros(self.size, self.group, dtype=torch.float16)
            code = torch.cdist(residual, book.float()).argmin(1) if residual.shape[0] else \
                torch.zeros(0, dtype=torch.int64)
            residual = residual - book.float()[code]
            books.append(book)
            codes.append(code)
        code = torch.stack(codes, 1).reshape(n, d // self.group * self.depth).to(torch.uint8)
        return {"codes": code, "scales": scales, "codebooks": torch.stack(books)}

    def check_values(self, tensors: dict[str, torch.Tensor], runs: Sequence[int]) -> None:
        codes = tensors["codes"]
        if codes.numel() and int(codes.max()) >= self.size:
            raise PackError(f"corrupt pack: an RVQ code points past its codebook of {self.size}: rebuild it")

    def decode(self, tensors: dict[str, torch.Tensor], runs: Sequence[int], head_dim: int) -> torch.Tensor:
        self.check_values(tensors, runs)
        codes, books = tensors["codes"].long(), tensors["codebooks"].float()
        n, g = codes.shape[0], head_dim // self.group
        codes = codes.reshape(n * g, self.depth)
        v = torch.zeros(n * g, self.group, device=codes.device)
        for level in range(self.depth):
            v += books[level][codes[:, level]]
        return self._join(v.reshape(n, g, self.group)) * tensors["scales"].float()[:, None]


register("rvq", RVQCodec)
