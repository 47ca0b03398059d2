"""The byte layer of a ``.kvpack``: a safetensors file, written and validated by hand.

We write the safetensors layout ourselves (it is one page: docs/kvpack-format.md,
section 1) because equal packs must be equal bytes, and we read it ourselves because a
pack is untrusted input: every length, shape and offset is checked against the file
before anything is allocated from it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import BinaryIO

import torch

from .errors import PackError

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U8": (torch.uint8, 1),
}
NAMES = {dtype: name for name, (dtype, _) in DTYPES.items()}
MAX_TABLE_BYTES = 100_000_000


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of a CPU tensor, as stored."""
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def write_container(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write ``tensors`` (laid out in name order) and ``metadata`` to ``f``; return bytes written."""
    table: dict[str, object] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which packs do not store")
        data = tensor_bytes(t)
        table[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header = json.dumps(table, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for data in blobs:
        f.write(data)
    return 8 + len(header) + offset


class Container:
    """A validated, read-only view of a safetensors file.

    Opening checks the layout (format spec, section 7 step 1); tensors are read on
    demand with :meth:`read`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self.size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise PackError(f"{self.path}: not a pack (file is {self.size} bytes, too short): rebuild it")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_TABLE_BYTES or n > self.size - 8:
                    raise PackError(f"{self.path}: corrupt or truncated pack (header length {n} does not fit a "
                                    f"{self.size}-byte file): rebuild it")
                raw = f.read(n)
        except OSError as e:
            raise PackError(f"cannot read pack {self.path}: {e.strerror or e}") from None
        try:
            table = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PackError(f"{self.path}: corrupt pack (its header is not valid JSON): rebuild it") from None
        if not isinstance(table, dict):
            raise PackError(f"{self.path}: corrupt pack (header is not a JSON object): rebuild it")
        self.data_start = 8 + n
        meta = table.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise PackError(f"{self.path}: corrupt pack (metadata is not a map of strings): rebuild it")
        self.metadata: dict[str, str] = meta
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for name, e in table.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]
                ok = (dtype in DTYPES and isinstance(shape, list)
                      and all(isinstance(d, int) and d >= 0 for d in shape)
                      and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok or end - begin != math.prod(shape) * DTYPES[dtype][1]:
                raise PackError(f"{self.path}: corrupt pack (tensor {name!r} has an invalid entry): rebuild it")
            self.entries[name] = (dtype, tuple(shape), begin, end)
            spans.append((begin, end))
        expected = 0
        for begin, end in sorted(spans):
            if begin != expected:
                raise PackError(f"{self.path}: corrupt pack (tensor data overlaps or has gaps): rebuild it")
            expected = end
        if self.data_start + expected != self.size:
            what = "truncated" if self.data_start + expected > self.size else "has trailing bytes"
            raise PackError(f"{self.path}: pack is {what} ({self.size} bytes, expected "
                            f"{self.data_start + expected}): rebuild it")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def raw(self, name: str) -> bytes:
        """The stored bytes of tensor ``name`` (size already validated)."""
        _, _, begin, end = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            data = f.read(end - begin)
        if len(data) != end - begin:
            raise PackError(f"{self.path}: pack was truncated while reading {name!r}: rebuild it")
        return data

    def to_tensor(self, name: str, data: bytes) -> torch.Tensor:
        dtype, shape, _, _ = self.entries[name]
        if not data:
            return torch.empty(shape, dtype=DTYPES[dtype][0])
        return torch.frombuffer(bytearray(data), dtype=DTYPES[dtype][0]).reshape(shape)
