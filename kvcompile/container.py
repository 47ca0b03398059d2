"""The byte layer of a ``.kvpack``: a safetensors file, written and validated by hand.

We write the safetensors layout ourselves (it is one page: docs/kvpack-format.md,
section 1) because equal packs must be equal bytes, and we read it ourselves because a
pack is untrusted input: every length, shape and offset is checked against the file
before anything is allocated from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from typing import BinaryIO

import torch

from . import schema
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


CHUNK = 1 << 24  # bytes read (and hashed) at a time: memory stays one copy of the tensor


def open_regular(path: str, what: str, error: type[Exception]) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading if, and only if, it is a regular file; return ``(fd, stat)``.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer, and
    the type is checked on the open descriptor, so a file swapped in between cannot slip
    through. ``error`` is raised, with one line, for anything else.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise error(f"{path}: {what} must be a regular file, this is {kind}")
    os.set_blocking(fd, True)
    return fd, st


def _parse_table(raw: bytes, file_size: int) -> tuple[dict | None, str | None]:
    """The safetensors table, validated to be an object with string-map metadata, or
    ``(None, what is wrong)``. It returns rather than raises, so that no traceback keeps
    the decoded text (the size of the table) alive in a caller that keeps the error."""
    # A count in the raw bytes refuses the plain form of a huge table before decoding it;
    # the parser's object limit catches any other spelling, at twice the table's size.
    if raw.count(b'"data_offsets"') > schema.MAX_TENSORS:
        return None, f"lists more than {schema.MAX_TENSORS} tensors"
    try:
        schema.check_items(raw, file_size, "")  # the table and the header inside it
        table = schema.parse(raw.decode("utf-8"), max_objects=schema.MAX_TENSORS + 2)
        if type(table) is not dict:
            raise schema.SchemaError("", "expected an object")
        table["__metadata__"] = schema.check(schema.METADATA, table.get("__metadata__", {}), "__metadata__")
    except UnicodeDecodeError:
        return None, "is not UTF-8"
    except schema.SchemaError as e:
        return None, f"is invalid: {e}"
    return table, None


class Container:
    """A validated, read-only view of a safetensors file.

    Opening checks the layout (format spec, section 7 step 1) against the JSON schema of
    :mod:`kvcompile.schema`; tensors are read on demand with :meth:`read`, which checks
    that the file is still the one that was validated.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        fd, st = open_regular(self.path, "pack", PackError)
        self.size, self._identity = st.st_size, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with os.fdopen(fd, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PackError(f"{self.path}: not a pack (file is {self.size} bytes, too short): rebuild it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_TABLE_BYTES or n > self.size - 8:
                raise PackError(f"{self.path}: corrupt or truncated pack (header length {n} does not fit a "
                                f"{self.size}-byte file): rebuild it")
            raw = f.read(n)
        table, problem = _parse_table(raw, self.size)
        del raw
        if problem is not None:
            raise PackError(f"{self.path}: corrupt pack (its table {problem}): rebuild it")
        meta = table.pop("__metadata__")
        self.data_start = 8 + n
        self.metadata: dict[str, str] = meta
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for name, e in table.items():
            try:
                schema.check(schema.TABLE_ENTRY, e, name)
                schema.check(schema.TENSOR_NAME, name, "tensor name")
            except schema.SchemaError as err:
                raise PackError(f"{self.path}: corrupt pack (tensor entry {err}): rebuild it") from None
            dtype, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]
            if dtype not in DTYPES or begin > end or end - begin != math.prod(shape) * DTYPES[dtype][1]:
                raise PackError(f"{self.path}: corrupt pack (tensor {name!r} has an invalid entry): rebuild it")
            self.entries[name] = (dtype, tuple(shape), begin, end)
            spans.append((begin, end))
        expected = 0
        for begin, end in sorted(spans):
            if begin != expected:
                raise PackError(f"{self.path}: corrupt pack (tensor data overlaps or has gaps): rebuild it")
            expected = end
        if self.data_start + expected != self.size:
            what = "truncated" if self.data_start + expected > self.size else "followed by trailing bytes"
            raise PackError(f"{self.path}: pack is {what} ({self.size} bytes, expected "
                            f"{self.data_start + expected}): rebuild it")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def read(self, name: str, sha256: str | None = None) -> torch.Tensor:
        """Tensor ``name`` as stored (a CPU tensor of its dtype and shape).

        With ``sha256``, the bytes are hashed while they are read, in bounded chunks, into
        the tensor's own memory, and refused on a mismatch: a checksum never needs a
        second copy of the data.
        """
        dtype, shape, begin, end = self.entries[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view, digest = memoryview(buf.numpy()), hashlib.sha256()
        fd, st = open_regular(self.path, "pack", PackError)
        with os.fdopen(fd, "rb") as f:
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
                raise PackError(f"{self.path}: pack changed while it was being read: load it again")
            f.seek(self.data_start + begin)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:done + CHUNK])
                if not got:
                    raise PackError(f"{self.path}: pack was truncated while reading {name!r}: rebuild it")
                if sha256 is not None:
                    digest.update(view[done:done + got])
                done += got
        if sha256 is not None and digest.hexdigest() != sha256:
            raise PackError(f"{self.path}: corrupt pack (checksum mismatch in {name!r}): rebuild it")
        return buf.view(DTYPES[dtype][0]).reshape(shape) if buf.numel() else torch.empty(shape, dtype=DTYPES[dtype][0])

    def raw(self, name: str) -> bytes:
        """The stored bytes of tensor ``name``."""
        return self.read(name).view(torch.uint8).numpy().tobytes()
