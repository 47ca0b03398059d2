"""The meaning of a .kvpack (docs/kvpack-format.md, sections 1-7): the header, the
positions, the manifest, and what a reader refuses even when the bytes are intact
(a valid header hash, valid checksums).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
import tracemalloc

import pytest
import torch
import zstandard
from conftest import set_field

import kvcompile
from kvcompile.container import DTYPES, Container, tensor_bytes
from kvcompile.errors import PackError
from kvcompile.format import FORMAT_VERSION, decode_positions, encode_positions, zstd_frame

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def pack(tiny_pack):
    return kvcompile.load(tiny_pack)


def _flat(nested: list[list[torch.Tensor]]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Per-head positions (``nested[layer][head]``) as the format functions take them:
    flat ``[N]`` per layer, rows grouped by head, and the kept counts."""
    kept = [[int(p.numel()) for p in row] for row in nested]
    flat = [torch.cat([p.to(torch.int64) for p in row]) if row else torch.empty(0, dtype=torch.int64)
            for row in nested]
    return flat, kept


def _encode(nested: list[list[torch.Tensor]]) -> bytes:
    return encode_positions(*_flat(nested))


def _per_head(positions: list[torch.Tensor], kept: list[list[int]]) -> list[list[torch.Tensor]]:
    """The inverse of :func:`_flat`: ``[layer][head]`` tensors."""
    return [list(p.split(row)) for p, row in zip(positions, kept)]


def _positions_tensor(nested) -> torch.Tensor:
    return zstd_frame(_encode(nested))


# ----------------------------------------------------------------------------- the file as written


def test_rewrite_without_edits_is_byte_identical(tiny_pack, tmp_path, rewrite_pack):
    # The writer is deterministic and the test helper reproduces the file exactly, so the
    # edits below change only what they mean to change.
    out = rewrite_pack(tiny_pack, tmp_path / "same.kvpack")
    assert out.read_bytes() == tiny_pack.read_bytes()


def test_json_table_is_canonical_and_padded(tiny_pack):
    data = tiny_pack.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    raw = data[8 : 8 + n]
    text = raw.decode("utf-8")
    stripped = text.rstrip(" ")
    assert len(text) - len(stripped) < 8
    table = json.loads(stripped)
    # Sorted keys, no insignificant whitespace.
    assert stripped == json.dumps(table, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    meta = table.pop("__metadata__")
    assert set(meta) == {"kvpack", "kvpack_sha256"}
    assert meta["kvpack_sha256"] == hashlib.sha256(meta["kvpack"].encode()).hexdigest()
    assert meta["kvpack_sha256"] == meta["kvpack_sha256"].lower() and len(meta["kvpack_sha256"]) == 64
    # Tensors are laid out in the order of their names, back to back.
    names = sorted(table)
    offset = 0
    for name in names:
        begin, end = table[name]["data_offsets"]
        assert begin == offset, name
        assert table[name]["dtype"] in DTYPES
        offset = end
    assert 8 + n + offset == len(data)


def test_header_describes_the_model_and_options(pack, tiny_lm):
    h = pack.header
    cfg = tiny_lm.config
    assert h["format"] == "kvpack" and h["version"] == list(FORMAT_VERSION) == [1, 5]
    m = h["model"]
    assert m["fingerprint"] == tiny_lm.fingerprint
    assert (m["num_layers"], m["num_heads"], m["num_kv_heads"], m["head_dim"]) == (2, 4, 2, 16)
    assert m["num_layers"] == cfg.num_hidden_layers and m["max_positions"] == 4096 and m["rope"] is True
    o = h["options"]
    assert o["ratio"] == 0.5 and o["chunk_size"] == 64 and o["codec"]["name"] == "fp16"
    assert h["recipe"]["name"] == "qa" and h["recipe"]["probes"]
    assert h["recipe"]["task_prompt"]


def test_cache_section_matches_the_tensors(pack):
    h, c = pack.header, pack.container
    m, cache = h["model"], h["cache"]
    framing = h["framing"]
    assert cache["tokens"] == len(framing["prefix_ids"]) + h["corpus"]["tokens"]
    assert cache["question_position"] == cache["tokens"]
    kept = cache["kept"]
    assert len(kept) == m["num_layers"] and all(len(row) == m["num_kv_heads"] for row in kept)
    # Ratio 0.5: each layer keeps the framing and half of each document, summed over its KV heads.
    per_head = len(framing["prefix_ids"]) + sum(round(0.5 * d["tokens"]) for d in pack.manifest())
    for row in kept:
        assert sum(row) == per_head * m["num_kv_heads"]
    for li, entry in enumerate(cache["layers"]):
        for part in ("keys", "values"):
            assert entry[part]["codec"] == "fp16"
            name = entry[part]["tensors"]["data"]
            assert name == f"layers.{li}.{part}"
            dtype, shape, _, _ = c.entries[name]
            assert dtype == "F16" and shape == (sum(kept[li]), m["head_dim"])


def test_positions_tensor_follows_the_spec(pack):
    h, c = pack.header, pack.container
    kept, tokens = h["cache"]["kept"], h["cache"]["tokens"]
    frame = c.raw(h["cache"]["positions"])
    assert c.entries["positions"][0] == "U8"
    raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=1 << 24)
    assert len(raw) == 4 * sum(map(sum, kept))
    flat = torch.tensor(list(struct.unpack(f"<{len(raw) // 4}i", raw)))
    i = 0
    prefix = len(h["framing"]["prefix_ids"])
    per_head = _per_head(pack.positions, kept)
    for li, row in enumerate(kept):
        for hi, n in enumerate(row):
            run = flat[i : i + n]
            i += n
            assert run[0] >= 0 and bool((run[1:] >= 1).all())
            absolute = run.cumsum(0)
            assert int(absolute[-1]) < tokens
            assert torch.equal(absolute, per_head[li][hi])
            # The framing prefix (and the sinks) are always kept.
            assert torch.equal(absolute[:prefix], torch.arange(prefix))
    assert i == flat.numel()
    # Flat per layer: rows grouped by head, as many as kept.
    assert [p.shape for p in pack.positions] == [(sum(row),) for row in kept]
    assert all(p.dtype == torch.int64 for p in pack.positions)


def test_positions_take_less_than_two_bytes_each(pack):
    kept = sum(map(sum, pack.kept))
    stored = pack.container.nbytes("positions")
    assert stored / kept < 2.0, f"{stored} bytes for {kept} positions"
    assert pack.header["payload_bytes"]["positions"] == stored


def test_manifest_and_segments(pack, tiny_corpus):
    h = pack.header
    manifest = pack.manifest()
    files = sorted(p.name for p in tiny_corpus.iterdir())
    assert [d["path"] for d in manifest] == files
    assert h["corpus"]["documents"] == len(files)
    assert sum(d["tokens"] for d in manifest) == h["corpus"]["tokens"]
    for d in manifest:
        text = (tiny_corpus / d["path"]).read_text()
        assert len(d["sha256"]) == 64
        assert d["sha256"] in (hashlib.sha256(text.encode()).hexdigest(),
                               hashlib.sha256(text.strip().encode()).hexdigest(),
                               hashlib.sha256((text.strip() + "\n").encode()).hexdigest())
    raw = zstandard.ZstdDecompressor().decompress(pack.container.raw("manifest"), max_output_size=1 << 24)
    assert len(raw) == h["corpus"]["manifest_size"]
    assert hashlib.sha256(raw).hexdigest() == h["corpus"]["manifest_sha256"]
    # Segments tile the corpus tokens in order.
    offset = 0
    for seg, d in zip(h["segments"], manifest):
        assert seg["tokens"] == [offset, offset + d["tokens"]]
        assert len(seg["key"]) == 64
        offset += d["tokens"]
    assert offset == h["corpus"]["tokens"]
    assert len({s["key"] for s in h["segments"]}) == len(h["segments"])


def test_checksums_payload_bytes_and_sizes(pack, tiny_pack):
    h, c = pack.header, pack.container
    assert set(h["checksums"]) == set(c.entries)
    for name in c.entries:
        assert h["checksums"][name] == hashlib.sha256(c.raw(name)).hexdigest()
    layer_bytes = {part: sum(c.nbytes(f"layers.{li}.{part}") for li in range(len(pack.kept)))
                   for part in ("keys", "values")}
    assert h["payload_bytes"] == {**layer_bytes, "positions": c.nbytes("positions"), "manifest": c.nbytes("manifest"),
                                  "index": c.nbytes("index")}
    sizes = pack.sizes()
    m = pack.model
    assert sizes["file"] == tiny_pack.stat().st_size
    assert sizes["header"] == c.data_start
    assert sizes["full_fp16"] == 2 * m["num_layers"] * m["num_kv_heads"] * pack.layout["tokens"] * m["head_dim"] * 2
    assert sizes["keys"] == layer_bytes["keys"] and sizes["index"] == c.nbytes("index") and sizes["other"] == 0


# ----------------------------------------------------------------------------- versions


def test_newer_major_version_asks_to_upgrade(tiny_pack, tmp_path, rewrite_pack):
    path = rewrite_pack(tiny_pack, tmp_path / "v2.kvpack", set_field(["version"], [2, 0]))
    with pytest.raises(PackError, match="upgrade kvcompile") as e:
        kvcompile.load(path)
    assert "2.0" in str(e.value)


def test_newer_minor_version_with_unknown_keys_loads(tiny_pack, tmp_path, rewrite_pack, pack):
    def edit(header, tensors):
        header["version"] = [1, 7]
        header["future_section"] = {"anything": [1, 2, 3]}
        header["cache"]["future_field"] = "ignored"

    path = rewrite_pack(tiny_pack, tmp_path / "v17.kvpack", edit)
    newer = kvcompile.load(path)
    assert newer.header["version"] == [1, 7]
    assert newer.kept == pack.kept
    for li in range(len(pack.kept)):
        a, b = newer.layer(li), pack.layer(li)
        assert a.lengths == b.lengths
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.positions, b.positions)
    assert len(newer.positions) == len(pack.positions)
    assert all(torch.equal(a, b) for a, b in zip(newer.positions, pack.positions))


@pytest.mark.parametrize("version", [
    [1], "1.0", None, ["a", 0], [1, 0, 0], [-1, 0],
    pytest.param("10", id="string-10"),  # must not be read as [1, 0]
    pytest.param([1.5, 0], id="float"),  # must not be truncated to [1, 0]
])
def test_malformed_version_is_refused(tiny_pack, tmp_path, rewrite_pack, version):
    path = rewrite_pack(tiny_pack, tmp_path / "v.kvpack", set_field(["version"], version))
    with pytest.raises(PackError):
        kvcompile.load(path)


def test_other_format_is_refused(tiny_pack, tmp_path, rewrite_pack):
    path = rewrite_pack(tiny_pack, tmp_path / "f.kvpack", set_field(["format"], "gguf"))
    with pytest.raises(PackError, match="not a kvpack"):
        kvcompile.load(path)


def test_header_hash_mismatch_is_refused(tiny_pack, tmp_path):
    c = Container(tiny_pack)
    data = tiny_pack.read_bytes()
    old = c.metadata["kvpack_sha256"].encode()
    new = hashlib.sha256(b"something else").hexdigest().encode()
    assert data.count(old) == 1
    path = tmp_path / "h.kvpack"
    path.write_bytes(data.replace(old, new))
    with pytest.raises(PackError, match="header checksum"):
        kvcompile.load(path)


# ----------------------------------------------------------------------------- counts, codecs, tensors


@pytest.mark.parametrize("kept", [
    [[1, 1]],                      # one layer too few
    [[1, 1, 1], [1, 1, 1]],        # one head too many
    [[-1, 1], [1, 1]],             # negative
    [[10**9, 1], [1, 1]],          # beyond the cache
    [[1.5, 1], [1, 1]],            # not an integer
], ids=["layers", "heads", "negative", "too-many", "float"])
def test_kept_counts_of_the_wrong_shape_are_refused(tiny_pack, tmp_path, rewrite_pack, kept):
    path = rewrite_pack(tiny_pack, tmp_path / "k.kvpack", set_field(["cache", "kept"], kept))
    with pytest.raises(PackError, match=r"cache\.kept"):
        kvcompile.load(path)


def test_kept_counts_not_matching_the_tensors_are_refused(tiny_pack, tmp_path, rewrite_pack):
    def edit(header, tensors):
        header["cache"]["kept"][1][1] += 1  # one more than the tensors and positions hold

    path = rewrite_pack(tiny_pack, tmp_path / "k.kvpack", edit)
    with pytest.raises(PackError):
        kvcompile.load(path)


def test_kept_counts_not_matching_the_tensors_are_refused_at_load(tiny_pack, tmp_path, rewrite_pack, pack):
    # kept says one token fewer for layer 1, head 1 and the positions agree, but the
    # layer's key and value tensors still hold all the rows.
    positions = [[p.clone() for p in layer] for layer in _per_head(pack.positions, pack.kept)]
    positions[1][1] = positions[1][1][:-1]

    def edit(header, tensors):
        header["cache"]["kept"][1][1] -= 1
        tensors["positions"] = _positions_tensor(positions)

    path = rewrite_pack(tiny_pack, tmp_path / "k.kvpack", edit)
    with pytest.raises(PackError):
        kvcompile.load(path)


def test_head_dim_not_matching_the_tensors_is_refused_at_load(tiny_pack, tmp_path, rewrite_pack):
    path = rewrite_pack(tiny_pack, tmp_path / "d.kvpack", set_field(["model", "head_dim"], 8))
    with pytest.raises(PackError):
        kvcompile.load(path)


def test_layer_with_wrong_tensor_shape_is_refused_before_use(tiny_pack, tmp_path, rewrite_pack):
    # Whether at load or at first use, the shape mismatch must be a PackError.
    path = rewrite_pack(tiny_pack, tmp_path / "d.kvpack", set_field(["model", "head_dim"], 8))
    with pytest.raises(PackError):
        kvcompile.load(path).layer(0)


def test_unknown_codec_is_refused_naming_it(tiny_pack, tmp_path, rewrite_pack):
    def edit(header, tensors):
        header["cache"]["layers"][1]["values"]["codec"] = "rvq9"

    path = rewrite_pack(tiny_pack, tmp_path / "c.kvpack", edit)
    with pytest.raises(PackError, match="rvq9"):
        kvcompile.load(path)


def test_missing_tensor_is_refused(tiny_pack, tmp_path, rewrite_pack):
    def edit(header, tensors):
        del tensors["layers.1.values"]

    path = rewrite_pack(tiny_pack, tmp_path / "m.kvpack", edit)
    with pytest.raises(PackError, match="layers.1.values"):
        kvcompile.load(path)


def test_tensor_without_checksum_is_refused(tiny_pack, tmp_path, rewrite_pack):
    def edit(header, tensors):
        header["checksums"].pop("manifest")

    path = rewrite_pack(tiny_pack, tmp_path / "m.kvpack", edit, checksums=False)
    with pytest.raises(PackError, match=r"checksums: does not list exactly the pack's tensors \('manifest'\)"):
        kvcompile.load(path)


def test_tensor_checksum_mismatch_is_refused(tiny_pack, tmp_path, rewrite_pack):
    def edit(header, tensors):
        tensors["layers.0.keys"] = tensors["layers.0.keys"].clone()
        tensors["layers.0.keys"][3, 5] += 1  # the header's checksum is left as it was

    path = rewrite_pack(tiny_pack, tmp_path / "s.kvpack", edit, checksums=False)
    with pytest.raises(PackError, match="checksum mismatch in 'layers.0.keys'"):
        kvcompile.load(path)
    # verify=False skips the checksums: the same file then loads (so the check above is what refused it).
    assert kvcompile.load(path, verify=False).kept


def test_unknown_auxiliary_tensor_is_refused_naming_it(tiny_pack, tmp_path, rewrite_pack):
    def edit(header, tensors):
        tensors["aux.minmax"] = torch.zeros(8, dtype=torch.uint8)

    path = rewrite_pack(tiny_pack, tmp_path / "a.kvpack", edit)
    with pytest.raises(PackError, match="aux.minmax"):
        kvcompile.load(path)


def _tensors_not_a_map(value):
    def edit(header, tensors):
        header["cache"]["layers"][0]["keys"]["tensors"] = value

    return edit


@pytest.mark.parametrize("edit", [
    pytest.param(set_field(["cache"], []), id="cache-list"),
    pytest.param(set_field(["model"], "x"), id="model-str"),
    pytest.param(set_field(["model", "num_layers"], "two"), id="num-layers-str"),
    pytest.param(set_field(["cache", "tokens"], "846"), id="tokens-str"),
    pytest.param(set_field(["cache", "positions"], []), id="positions-list"),
    pytest.param(set_field(["cache", "positions"], "nope"), id="positions-missing"),
    pytest.param(set_field(["cache", "layers"], {}), id="layers-dict"),
    pytest.param(set_field(["corpus"], None), id="corpus-none"),
    pytest.param(lambda h, t: h["cache"]["layers"][0]["keys"].pop("codec"), id="codec-missing"),
    pytest.param(lambda h, t: h["cache"]["layers"][0].__setitem__("keys", ["fp16"]), id="part-list"),
    pytest.param(_tensors_not_a_map(["layers.0.keys"]), id="tensors-list"),
    pytest.param(_tensors_not_a_map("layers.0.keys"), id="tensors-str"),
    pytest.param(_tensors_not_a_map(None), id="tensors-none"),
])
def test_malformed_header_fields_are_refused(tiny_pack, tmp_path, rewrite_pack, edit):
    path = rewrite_pack(tiny_pack, tmp_path / "bad.kvpack", edit)
    with pytest.raises(PackError):
        kvcompile.load(path)


def test_checksums_that_are_not_a_map_are_refused(tiny_pack, tmp_path, rewrite_pack):
    def edit(header, tensors):
        header["checksums"] = sorted(header["checksums"])  # the names, without hashes

    path = rewrite_pack(tiny_pack, tmp_path / "bad.kvpack", edit, checksums=False)
    with pytest.raises(PackError):
        kvcompile.load(path)


# ----------------------------------------------------------------------------- positions


def _random_positions(seed: int, layers=2, heads=3, limit=1000):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        row = []
        for h in range(heads):
            n = 0 if h == 1 else int(torch.randint(1, 200, (1,), generator=g))
            row.append(torch.randperm(limit, generator=g)[:n].sort().values)
        out.append(row)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_positions_round_trip(seed):
    positions = _random_positions(seed)
    flat, kept = _flat(positions)
    data = encode_positions(flat, kept)
    assert len(data) == 4 * sum(map(sum, kept))
    decoded = decode_positions(data, kept, 1000, "x")
    assert len(decoded) == len(flat) and all(torch.equal(a, b) for a, b in zip(decoded, flat))
    nested = _per_head(decoded, kept)
    assert all(torch.equal(a, b) for ra, rb in zip(nested, positions) for a, b in zip(ra, rb))
    assert all(p.numel() == 0 for row in nested for p in row[1:2])  # head 1 keeps nothing
    # Delta coded: the first value of a run is the position, the rest are differences >= 1.
    flat = struct.unpack(f"<{len(data) // 4}i", data)
    first = positions[0][0]
    assert flat[0] == int(first[0]) and flat[1] == int(first[1] - first[0])


def test_positions_compress_below_two_bytes_each():
    # A realistic selection: half of 4000 positions, in runs, per head.
    g = torch.Generator().manual_seed(0)
    positions = [[torch.randperm(4000, generator=g)[:2000].sort().values for _ in range(3)] for _ in range(4)]
    stored = len(zstd_frame(_encode(positions)).numpy().tobytes())  # at the level packs are written with
    assert stored / (4 * 3 * 2000) < 2.0


@pytest.mark.parametrize("run", [[5, 3, 9], [0, 4, 4], [-1, 2, 3]], ids=["decreasing", "repeated", "negative"])
def test_non_increasing_positions_are_refused(run):
    data = struct.pack(f"<{len(run)}i", run[0], *[b - a for a, b in itertools.pairwise(run)])
    with pytest.raises(PackError, match="not increasing"):
        decode_positions(data, [[len(run)]], 100, "x")


def test_positions_beyond_the_cache_are_refused():
    data = encode_positions([torch.tensor([0, 5, 100])], [[3]])
    assert decode_positions(data, [[3]], 101, "x")[0].tolist() == [0, 5, 100]
    with pytest.raises(PackError, match="beyond the cache"):
        decode_positions(data, [[3]], 100, "x")


def test_decreasing_positions_in_a_pack_are_refused(tiny_pack, tmp_path, rewrite_pack, pack):
    positions = [[p.clone() for p in layer] for layer in _per_head(pack.positions, pack.kept)]
    p = positions[0][1]
    p[10], p[11] = p[11].clone(), p[10].clone()

    def edit(header, tensors):
        tensors["positions"] = _positions_tensor(positions)

    path = rewrite_pack(tiny_pack, tmp_path / "p.kvpack", edit)
    with pytest.raises(PackError, match="not increasing"):
        kvcompile.load(path)


def test_positions_of_the_wrong_length_are_refused(tiny_pack, tmp_path, rewrite_pack, pack):
    positions = [[p.clone() for p in layer] for layer in _per_head(pack.positions, pack.kept)]
    positions[0][0] = positions[0][0][:-1]

    def edit(header, tensors):
        tensors["positions"] = _positions_tensor(positions)

    path = rewrite_pack(tiny_pack, tmp_path / "p.kvpack", edit)
    with pytest.raises(PackError, match="positions"):
        kvcompile.load(path)


def test_positions_that_do_not_decompress_are_refused(tiny_pack, tmp_path, rewrite_pack):
    def edit(header, tensors):
        tensors["positions"] = torch.frombuffer(bytearray(b"not a zstd frame"), dtype=torch.uint8)

    path = rewrite_pack(tiny_pack, tmp_path / "p.kvpack", edit)
    with pytest.raises(PackError, match="does not decompress"):
        kvcompile.load(path)


def _frame_declaring(size: int) -> bytes:
    """A small zstd frame whose header declares ``size`` decompressed bytes (8-byte size field)."""
    small = zstandard.ZstdCompressor(level=19).compress(bytes(1000))
    assert small[4] == 0x60  # single segment, 2-byte content size, as python-zstandard writes it
    return small[:4] + bytes([0xE0]) + struct.pack("<Q", size) + small[7:]


def test_positions_frame_declaring_a_huge_size_is_refused(tiny_pack, tmp_path, rewrite_pack):
    frame = _frame_declaring(2**62)
    assert zstandard.frame_content_size(frame) == 2**62

    def edit(header, tensors):
        tensors["positions"] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)

    path = rewrite_pack(tiny_pack, tmp_path / "z.kvpack", edit)
    with pytest.raises(PackError):  # not MemoryError: the declared size is checked before decompressing
        kvcompile.load(path)


def test_positions_decompression_is_bounded(tiny_pack, tmp_path, rewrite_pack):
    # A 64 MiB frame of zeros compresses to a few KiB; the reader expects ~7 KiB.
    cctx = zstandard.ZstdCompressor(level=3)
    frame = cctx.compress(bytes(64 << 20))
    assert len(frame) < 1 << 20

    def edit(header, tensors):
        tensors["positions"] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)

    path = rewrite_pack(tiny_pack, tmp_path / "z.kvpack", edit)
    tracemalloc.start()
    try:
        with pytest.raises(PackError):
            kvcompile.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"loading allocated {peak >> 20} MiB"


def test_manifest_frame_declaring_a_huge_size_is_refused(tiny_pack, tmp_path, rewrite_pack):
    frame = _frame_declaring(2**62)

    def edit(header, tensors):
        tensors["manifest"] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)

    path = rewrite_pack(tiny_pack, tmp_path / "z.kvpack", edit)
    with pytest.raises(PackError, match="manifest declares 4611686018427387904 bytes"):  # at load
        kvcompile.load(path)


def test_manifest_larger_than_the_pack_is_refused_before_decompressing(tiny_pack, tmp_path, rewrite_pack):
    def edit(header, tensors):
        header["corpus"]["manifest_size"] = 2**40
        tensors["manifest"] = torch.frombuffer(bytearray(_frame_declaring(2**40)), dtype=torch.uint8)

    path = rewrite_pack(tiny_pack, tmp_path / "z.kvpack", edit)
    with pytest.raises(PackError, match="manifest_size: 1099511627776 bytes, more than the whole pack"):
        kvcompile.load(path)


def test_malformed_manifest_size_is_refused(tiny_pack, tmp_path, rewrite_pack):
    path = rewrite_pack(tiny_pack, tmp_path / "m.kvpack", set_field(["corpus", "manifest_size"], "many"))
    with pytest.raises(PackError, match="corpus.manifest_size: expected an integer"):
        kvcompile.load(path)


def test_manifest_checksum_mismatch_is_refused(tiny_pack, tmp_path, rewrite_pack):
    path = rewrite_pack(tiny_pack, tmp_path / "m.kvpack", set_field(["corpus", "manifest_sha256"], "0" * 64))
    with pytest.raises(PackError, match="manifest checksum"):
        kvcompile.load(path)


def test_tensor_bytes_are_little_endian():
    t = torch.tensor([1, 256], dtype=torch.int32)
    assert tensor_bytes(t) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
