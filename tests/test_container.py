"""The byte layer of a .kvpack (docs/kvpack-format.md, sections 1 and 7 step 1).

A pack is a plain safetensors file, and a pack is untrusted input: every corruption of
its bytes (length, JSON table, kvpack header, tensor data), every truncation and any
trailing garbage must be refused with a PackError, never another exception and never a
silent load.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import safetensors
import safetensors.torch
import torch

import kvcompile
from kvcompile.container import MAX_TABLE_BYTES, Container
from kvcompile.errors import PackError

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def pack_bytes(tiny_pack) -> bytes:
    return tiny_pack.read_bytes()


@pytest.fixture(scope="module")
def layout(tiny_pack) -> dict:
    """Byte ranges of the regions of the fixture pack, in file offsets."""
    c = Container(tiny_pack)
    raw_table = tiny_pack.read_bytes()[8 : c.data_start]
    # The kvpack header is a JSON document stored as a (JSON-escaped) string in the table.
    marker = b'"kvpack":"'
    begin = raw_table.index(marker) + len(marker)
    end = raw_table.index(b'","kvpack_sha256"', begin)

    def span(name):
        _, _, b, e = c.entries[name]
        return c.data_start + b, c.data_start + e

    return {
        "length": (0, 8),
        "table": (8, c.data_start),
        "kvpack_header": (8 + begin, 8 + end),
        "keys": span("layers.0.keys"),
        "values": span("layers.1.values"),
        "positions": span("positions"),
        "manifest": span("manifest"),
        "size": c.size,
    }


def _outcome(path) -> str:
    """'PackError', 'loaded' or the name of any other exception raised by kvcompile.load."""
    try:
        kvcompile.load(path)
    except PackError:
        return "PackError"
    except Exception as e:  # noqa: BLE001 - any other type is what the tests look for
        return f"{type(e).__name__}: {e}"
    return "loaded"


def _flip(data: bytes, i: int) -> bytes:
    b = bytearray(data)
    b[i] ^= 0x01
    return bytes(b)


def _check_flips(tmp_path, data: bytes, offsets) -> list[tuple[int, str]]:
    """Flip each offset in turn (b ^ 0x01) and return the offsets that were not refused."""
    path = tmp_path / "flipped.kvpack"
    bad = []
    for i in sorted(set(offsets)):
        path.write_bytes(_flip(data, i))
        outcome = _outcome(path)
        if outcome != "PackError":
            bad.append((i, outcome))
    return bad


# ----------------------------------------------------------------------------- a plain safetensors file


def test_safe_open_lists_every_tensor_and_the_kvpack_header(tiny_pack):
    pack = kvcompile.load(tiny_pack)
    with safetensors.safe_open(str(tiny_pack), "pt") as f:
        names = set(f.keys())
        meta = f.metadata()
        tensors = {n: f.get_tensor(n) for n in names}
    layers = pack.model["num_layers"]
    expected = {f"layers.{li}.{part}" for li in range(layers) for part in ("keys", "values")}
    expected |= {"positions", "manifest", "index"}
    assert names == expected == set(pack.container.entries)
    assert set(meta) == {"kvpack", "kvpack_sha256"}
    header = json.loads(meta["kvpack"])
    assert header["format"] == "kvpack"
    assert header["version"] == [1, 5]
    assert header == pack.header
    # safetensors reads the same tensors the pack decodes.
    for li in range(layers):
        layer = pack.layer(li)
        assert list(layer.lengths) == pack.kept[li]
        assert torch.equal(tensors[f"layers.{li}.keys"], layer.keys)
        assert torch.equal(tensors[f"layers.{li}.values"], layer.values)
    assert tensors["positions"].dtype == torch.uint8 and tensors["manifest"].dtype == torch.uint8


def test_container_matches_safetensors_offsets(tiny_pack, pack_bytes):
    c = Container(tiny_pack)
    (n,) = struct.unpack("<Q", pack_bytes[:8])
    assert c.data_start == 8 + n and c.size == len(pack_bytes)
    with safetensors.safe_open(str(tiny_pack), "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            assert c.read(name).equal(f.get_tensor(name))


# ----------------------------------------------------------------------------- flipped bytes


def test_the_unmodified_pack_loads(tiny_pack):
    # The baseline for every corruption test below: the same bytes, unflipped, load.
    assert _outcome(tiny_pack) == "loaded"


@pytest.mark.parametrize("region", ["length", "table", "kvpack_header", "keys", "values", "positions", "manifest"])
def test_flip_one_byte_in_each_region(tmp_path, pack_bytes, layout, region):
    begin, end = layout[region]
    assert end > begin
    # First, middle and last byte of the region.
    bad = _check_flips(tmp_path, pack_bytes, [begin, (begin + end) // 2, end - 1])
    assert bad == []


def test_flip_every_length_byte(tmp_path, pack_bytes):
    assert _check_flips(tmp_path, pack_bytes, range(8)) == []


def test_flip_every_97th_byte_of_the_file(tmp_path, pack_bytes):
    size = len(pack_bytes)
    offsets = list(range(0, size, 97)) + [0, 1, size - 2, size - 1]
    assert len(offsets) > 100
    assert _check_flips(tmp_path, pack_bytes, offsets) == []


def test_flip_every_7th_byte_of_the_json_table(tmp_path, pack_bytes, layout):
    # Dense sampling of the JSON table (every 7th byte): keys, offsets, dtypes, padding, metadata.
    begin, end = layout["table"]
    assert _check_flips(tmp_path, pack_bytes, range(begin, end, 7)) == []


def test_flip_last_byte_of_padding(tmp_path, pack_bytes, layout):
    # The table is padded with spaces; a changed pad byte is not JSON whitespace any more.
    _, end = layout["table"]
    assert pack_bytes[end - 1 : end] in (b" ", b"}")
    assert _check_flips(tmp_path, pack_bytes, [end - 1]) == []


# ----------------------------------------------------------------------------- truncation, trailing bytes


def test_truncated_files_are_refused(tmp_path, pack_bytes, layout):
    size = layout["size"]
    data_start = layout["table"][1]
    cuts = [0, 1, 7, 8, 9, data_start // 2, data_start - 1, data_start, data_start + 1,
            (data_start + size) // 2, layout["positions"][0] + 1, size - 1]
    path = tmp_path / "cut.kvpack"
    bad = []
    for cut in cuts:
        path.write_bytes(pack_bytes[:cut])
        outcome = _outcome(path)
        if outcome != "PackError":
            bad.append((cut, outcome))
    assert bad == []


@pytest.mark.parametrize("garbage", [b"\x00", b" ", b"x" * 8, b"\x00" * 4096])
def test_trailing_garbage_is_refused(tmp_path, pack_bytes, garbage):
    path = tmp_path / "long.kvpack"
    path.write_bytes(pack_bytes + garbage)
    with pytest.raises(PackError, match="trailing"):
        kvcompile.load(path)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.kvpack"
    empty.write_bytes(b"")
    with pytest.raises(PackError, match="too short"):
        kvcompile.load(empty)
    with pytest.raises(PackError, match="cannot read"):
        kvcompile.load(tmp_path / "missing.kvpack")
    with pytest.raises(PackError):
        kvcompile.load(tmp_path)  # a directory


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, MAX_TABLE_BYTES + 1, 10**12])
def test_huge_declared_table_length_is_refused_quickly(tmp_path, pack_bytes, length):
    path = tmp_path / "huge.kvpack"
    path.write_bytes(struct.pack("<Q", length) + pack_bytes[8:])
    t0 = time.perf_counter()
    with pytest.raises(PackError, match="header length"):
        kvcompile.load(path)
    assert time.perf_counter() - t0 < 1.0


def test_table_length_just_beyond_the_file_is_refused(tmp_path, pack_bytes):
    path = tmp_path / "beyond.kvpack"
    path.write_bytes(struct.pack("<Q", len(pack_bytes) - 7) + pack_bytes[8:])
    with pytest.raises(PackError, match="header length"):
        kvcompile.load(path)


# ----------------------------------------------------------------------------- other files


def test_safetensors_without_kvpack_metadata_is_not_a_kvpack(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(3, 4)}, str(plain))
    with pytest.raises(PackError, match="not a kvpack"):
        kvcompile.load(plain)
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(3, 4)}, str(other), metadata={"format": "pt"})
    with pytest.raises(PackError, match="not a kvpack"):
        kvcompile.load(other)


@pytest.mark.parametrize("content", [b"hello world, this is not a pack", bytes(range(256)) * 4,
                                     b"PK\x03\x04" + b"\x00" * 100, b"\x08" + b"\x00" * 7 + b"[1,2,3] "])
def test_other_files_are_refused(tmp_path, content):
    path = tmp_path / "other.kvpack"
    path.write_bytes(content)
    assert _outcome(path) == "PackError"


@pytest.mark.parametrize("entry", [
    {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]},
    {"dtype": "F16", "shape": [-1], "data_offsets": [0, 2]},
    {"dtype": "F16", "shape": [2], "data_offsets": [0, 2]},
    {"dtype": "F16", "shape": "2", "data_offsets": [0, 4]},
    {"dtype": "F16", "shape": [2], "data_offsets": [4, 0]},
    {"dtype": "F16", "shape": [2]},
    "not an object",
])
def test_invalid_tensor_entries_are_refused(tmp_path, entry):
    table = json.dumps({"__metadata__": {}, "x": entry}).encode()
    table += b" " * (-len(table) % 8)
    path = tmp_path / "bad.kvpack"
    path.write_bytes(struct.pack("<Q", len(table)) + table + b"\x00" * 8)
    with pytest.raises(PackError):
        Container(path)


def test_overlapping_and_gapped_offsets_are_refused(tmp_path):
    def write(entries, data_len):
        table = json.dumps({"__metadata__": {}, **entries}).encode()
        table += b" " * (-len(table) % 8)
        path = tmp_path / "t.kvpack"
        path.write_bytes(struct.pack("<Q", len(table)) + table + b"\x00" * data_len)
        return path

    good = write({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                  "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, 8)
    assert set(Container(good).entries) == {"a", "b"}
    overlap = write({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                     "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, 6)
    with pytest.raises(PackError, match="overlaps or has gaps"):
        Container(overlap)
    gap = write({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                 "b": {"dtype": "U8", "shape": [4], "data_offsets": [6, 10]}}, 10)
    with pytest.raises(PackError, match="overlaps or has gaps"):
        Container(gap)


def test_metadata_that_is_not_a_map_of_strings_is_refused(tmp_path):
    table = json.dumps({"__metadata__": {"kvpack": 1}}).encode()
    table += b" " * (-len(table) % 8)
    path = tmp_path / "m.kvpack"
    path.write_bytes(struct.pack("<Q", len(table)) + table)
    with pytest.raises(PackError, match=r"__metadata__\.kvpack: expected a string"):
        Container(path)
