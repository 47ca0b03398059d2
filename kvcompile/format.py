"""The ``.kvpack`` format's constants and encodings, shared by the reader and the writer.

docs/kvpack-format.md is the specification; this module holds what both sides of it
need: the version, zstd frames with a bounded decompression, and the delta coding of
kept positions (section 4). It depends on nothing above it.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from .errors import PackError

FORMAT_VERSION = (1, 5)
# Level 9: on a 32k-token pack's positions (1 MB raw) it takes 0.06 s against level 19's
# 0.68 s on a CPU core, for 16% more bytes (1.13 vs 0.97 per kept token). Positions are
# ~0.2% of a pack; the build's time is not.
ZSTD_LEVEL = 9


def zstd_frame(data: bytes) -> torch.Tensor:
    """One zstd frame of ``data`` as a ``U8`` tensor (fixed level: equal input, equal bytes)."""
    frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8) if frame else torch.empty(0, dtype=torch.uint8)


def unzstd(data, size: int, what: str, path: str) -> bytes:
    """Decompress one zstd frame (any buffer) that must hold exactly ``size`` bytes.

    The frame's declared size is checked first, and decompression then streams with a
    cap of ``size + 1`` bytes: a hostile frame can make us hold at most what the header
    (validated against the file) already implies, whatever it declares.
    """
    try:
        declared = zstandard.frame_content_size(data)
        if declared != size:
            raise PackError(f"{path}: corrupt pack ({what} declares {declared} bytes, expected {size}): rebuild it")
        out = bytearray()
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while len(out) <= size and (chunk := reader.read(min(1 << 20, size + 1 - len(out)))):
                out += chunk
    except zstandard.ZstdError:
        raise PackError(f"{path}: corrupt pack ({what} does not decompress): rebuild it") from None
    if len(out) != size:
        got = f"more than {size}" if len(out) > size else str(len(out))
        raise PackError(f"{path}: corrupt pack ({what} has {got} bytes, expected {size}): rebuild it")
    return out


def _runs(kept: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """For the flat rows of all (layer, head) runs: each row's first row in its run, and
    which rows begin a run."""
    lengths = torch.tensor([n for layer in kept for n in layer], dtype=torch.int64)
    starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
    first_row = starts.repeat_interleave(lengths)
    return first_row, first_row == torch.arange(first_row.numel())


def encode_positions(positions: list[torch.Tensor], kept: list[list[int]]) -> bytes:
    """Delta-coded little-endian int32 (format spec, section 4).

    positions: per layer ``[N]``, rows grouped by KV head (``kept[layer][head]`` each),
    increasing within a head. Each (layer, head) run stores its first position, then
    the differences.
    """
    flat = torch.cat([p.cpu().to(torch.int64) for p in positions]) if positions else torch.empty(0, dtype=torch.int64)
    _, is_first = _runs(kept)
    delta = flat.clone()
    delta[1:] -= flat[:-1]
    delta[is_first] = flat[is_first]
    return delta.to(torch.int32).numpy().astype("<i4").tobytes()


def decode_positions(data: bytes, kept: list[list[int]], limit: int, path: str) -> list[torch.Tensor]:
    """Inverse of :func:`encode_positions`: per layer ``[N]``, validated.

    Refuses a run that does not increase or a position at or beyond ``limit``.
    """
    delta = torch.from_numpy(np.frombuffer(data, dtype="<i4").astype(np.int64))
    first_row, is_first = _runs(kept)
    if (delta[is_first] < 0).any() or (delta[~is_first] < 1).any():
        raise PackError(f"{path}: corrupt pack (positions are not increasing): rebuild it")
    total = delta.cumsum(0)
    flat = total - (total - delta)[first_row]  # restart the running sum at each run
    if flat.numel() and int(flat.max()) >= limit:
        raise PackError(f"{path}: corrupt pack (a position is beyond the cache): rebuild it")
    return list(flat.split([sum(layer) for layer in kept]))
