"""Packs and corpora are untrusted input (issue 10): one test per family of hostile input.

Each pack here is edited as an attacker would, with every checksum and hash repaired
(``rewrite_pack``), so only the header's meaning is wrong. ``load``, ``inspect``,
``query`` and rebuilds must answer correctly or refuse with one line; tests/test_fuzz.py
runs random mutations of the same kinds.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time

import pytest
import torch
import zstandard
from conftest import set_field
from typer.testing import CliRunner

import kvcompile
from kvcompile.cli import app
from kvcompile.container import Container
from kvcompile.errors import PackError
from kvcompile.terminal import printable

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, *needles) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _raw_header(tiny_pack, dst, text: str):
    """``tiny_pack`` with its kvpack header replaced by ``text`` (hash repaired, never parsed
    here). The table is written with ASCII escapes, so ``text`` may hold lone surrogates."""
    c = Container(tiny_pack)
    blobs = {name: c.raw(name) for name in sorted(c.entries)}
    table, offset = {}, 0
    for name, blob in blobs.items():
        dtype, shape, _, _ = c.entries[name]
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    table["__metadata__"] = {"kvpack": text, "kvpack_sha256": digest}
    raw = json.dumps(table).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs.values()))
    return dst


def _with_field(tiny_pack, dst, field, value):
    header = json.loads(Container(tiny_pack).metadata["kvpack"])
    set_field(field, value)(header, None)
    return _raw_header(tiny_pack, dst, json.dumps(header))  # ASCII: "\\ud800", Infinity, 2^64 as written


# ----------------------------------------------------------------------------- JSON the parser must survive


@pytest.mark.parametrize("text, needle", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "kvpack", "version": [1, Infinity]}', "not valid JSON"),
    ('{"format": "kvpack", "version": [1, NaN]}', "not valid JSON"),
    ('{"format": "kvpack", "version": [1, ' + "9" * 5000 + "]}", "not valid JSON"),
    ('{"format": "kvpack", "format": "kvpack", "version": [1, 0]}', "duplicate key"),
    ('{"format": "kvpack", "version": [1, 18446744073709551616]}', "version"),
], ids=["depth-bomb", "infinity", "nan", "5000-digits", "duplicate-key", "2^64"])
def test_hostile_json_in_the_header_is_refused(tiny_pack, tmp_path, text, needle):
    path = _raw_header(tiny_pack, tmp_path / "h.kvpack", text)
    with pytest.raises(PackError, match=needle):
        kvcompile.load(path)
    one_error_line(invoke("inspect", path), "corrupt pack")


def test_unknown_keys_are_read_but_bounded_in_depth(tiny_pack, tmp_path, rewrite_pack):
    def nested(depth):
        return [nested(depth - 1)] if depth else []

    ok = rewrite_pack(tiny_pack, tmp_path / "ok.kvpack", set_field(["cache", "x_from_1_1"], nested(31)))
    kvcompile.load(ok)  # a newer minor version's key is ignored
    deep = rewrite_pack(tiny_pack, tmp_path / "deep.kvpack", set_field(["cache", "x_from_1_1"], nested(100)))
    with pytest.raises(PackError, match="cache.x_from_1_1: nested more than 32 levels deep"):
        kvcompile.load(deep)


def test_lone_surrogate_in_the_metadata_is_refused(tiny_pack, tmp_path):
    path = _raw_header(tiny_pack, tmp_path / "s.kvpack", '{"format": "kvpack\ud800"}')
    with pytest.raises(PackError, match="lone surrogate"):
        kvcompile.load(path)


@pytest.mark.parametrize("field, value, needle", [
    (["model", "name"], "\ud800", "model.name: string is not valid Unicode"),
    (["model", "num_layers"], 2**64, "model.num_layers: expected an integer"),
    (["cache", "tokens"], float("inf"), "Infinity is not a JSON number"),
], ids=["surrogate", "2^64", "infinity"])
def test_lone_surrogates_and_overflowing_numbers_are_refused(tiny_pack, tmp_path, field, value, needle):
    path = _with_field(tiny_pack, tmp_path / "v.kvpack", field, value)
    with pytest.raises(PackError, match=needle):
        kvcompile.load(path)


def test_a_table_of_a_million_entries_is_refused_in_under_a_second(tmp_path):
    entries = ",".join(f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(10**6))
    for name, table in (("plain", entries), ("escaped", entries.replace("data_offsets", "data\\u005foffsets"))):
        raw = ("{" + table + "}").encode()
        raw += b" " * (-len(raw) % 8)
        path = tmp_path / f"{name}.kvpack"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
        t0 = time.perf_counter()
        # plain: a byte count of the tensor entries; escaped: the count of lists and objects
        with pytest.raises(PackError, match=r"more than 65536 tensors|JSON values, more than"):
            Container(path)
        assert time.perf_counter() - t0 < 1.0


# ----------------------------------------------------------------------------- files that are not packs


def _within(seconds, fn):
    """``fn()``'s result, or a failure if it has not returned after ``seconds``."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_a_fifo_as_the_pack_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "p.kvpack"
    os.mkfifo(fifo)
    try:
        with pytest.raises(PackError, match="must be a regular file, this is a FIFO"):
            _within(5, lambda: kvcompile.load(fifo))
        one_error_line(_within(5, lambda: invoke("inspect", fifo)), "FIFO")
    finally:
        with open(os.open(fifo, os.O_RDWR | os.O_NONBLOCK), "wb"):
            pass  # a writer, in case anything still waits on the FIFO


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null", "dir"])
def test_devices_and_folders_as_the_pack_are_refused(tmp_path, target):
    path = tmp_path / "x.kvpack"
    if target == "dir":
        path.mkdir()
    else:
        path.symlink_to(target)
    with pytest.raises(PackError, match="must be a regular file"):
        _within(5, lambda: kvcompile.load(path))


def test_a_pack_swapped_after_validation_is_refused(tiny_pack, tmp_path):
    path = tmp_path / "a.kvpack"
    path.write_bytes(tiny_pack.read_bytes())
    pack = kvcompile.load(path, verify=False)
    data = bytearray(tiny_pack.read_bytes())
    data[-1] ^= 1
    os.replace(_write(tmp_path / "b.kvpack", bytes(data)), path)
    with pytest.raises(PackError, match="changed while it was being read"):
        pack.layer(0)


def _write(path, data):
    path.write_bytes(data)
    return path


def test_a_tensor_is_hashed_while_it_is_read(tiny_pack, tmp_path, rewrite_pack):
    # A big tensor with a wrong checksum is refused after one pass, in bounded chunks.
    def edit(header, tensors):
        tensors["aux.big"] = torch.zeros(40 << 20, dtype=torch.uint8)

    path = rewrite_pack(tiny_pack, tmp_path / "big.kvpack", edit)
    c = Container(path)
    with pytest.raises(PackError, match="checksum mismatch in 'aux.big'"):
        c.read("aux.big", sha256="0" * 64)
    assert c.read("aux.big", sha256=hashlib.sha256(bytes(40 << 20)).hexdigest()).numel() == 40 << 20


# ----------------------------------------------------------------------------- accepted-but-wrong, now refused


@pytest.mark.parametrize("edit, needle", [
    (set_field(["model", "num_layers"], "30"), "model.num_layers: expected an integer"),
    (set_field(["model", "fingerprint"], 5), "model.fingerprint: expected a string"),
    (set_field(["model", "name"], ["x"]), "model.name: expected a string"),
    (set_field(["model", "rope"], "yes"), "model.rope: expected true or false"),
    (lambda h, t: h["model"].pop("rope"), "model.rope: missing"),
    (set_field(["cache", "tokens"], 0), "cache.tokens: expected an integer in [1"),
    (set_field(["cache", "question_position"], 5), "cache.question_position: 5 is not cache.tokens"),
    (lambda h, t: h["cache"].__setitem__("tokens", h["cache"]["tokens"] + 1), "cache.tokens"),
    (set_field(["framing", "template"], "jinja"), "framing.template"),
    (set_field(["framing", "prefix_ids"], [-1]), "framing.prefix_ids[0]"),
    (set_field(["framing", "document_header"], "{path.__class__}"), "framing.document_header"),
    (set_field(["recipe", "probes"], "one"), "recipe.probes"),
    (set_field(["options", "context"], "both"), "options.context"),
    (set_field(["options", "scorer"], {"name": "x", "pool": [1, 2]}), "options.scorer.pool"),
    (set_field(["corpus", "documents"], 4), "segments: do not list documents"),
    (lambda h, t: h["segments"][2]["tokens"].__setitem__(1, 0), "segments[2].tokens"),
    (lambda h, t: h["segments"][0]["documents"].append(1), "segments: do not list documents"),
], ids=["layers-str", "fingerprint-int", "name-list", "rope-str", "rope-missing", "tokens-0", "question-pos",
        "tokens-vs-framing", "template", "prefix-ids", "format-field", "probes", "context", "scorer-param",
        "documents", "segment-end-0", "segment-docs"])
def test_wrong_header_fields_are_refused_at_load_naming_the_field(tiny_pack, tmp_path, rewrite_pack, edit, needle):
    path = rewrite_pack(tiny_pack, tmp_path / "w.kvpack", edit)
    with pytest.raises(PackError) as e:
        kvcompile.load(path)
    assert needle in str(e.value)
    one_error_line(invoke("inspect", path), needle)


@pytest.mark.parametrize("edit, needle", [
    (set_field(["payload_bytes", "keys"], 1), "payload_bytes"),
    (lambda h, t: h["checksums"].__setitem__("ghost", "0" * 64), "checksums: does not list exactly"),
], ids=["payload", "ghost-checksum"])
def test_sizes_and_checksums_must_describe_the_tensors(tiny_pack, tmp_path, rewrite_pack, edit, needle):
    path = rewrite_pack(tiny_pack, tmp_path / "w.kvpack", edit, checksums=False)
    with pytest.raises(PackError, match=needle):
        kvcompile.load(path)


def _edit_manifest(edit):
    """An edit of the manifest's JSON, with its frame, hash, size and tensor checksum repaired."""

    def apply(header, tensors):
        manifest = json.loads(zstandard.ZstdDecompressor().decompress(tensors["manifest"].numpy().tobytes()))
        edit(manifest)
        raw = json.dumps(manifest).encode()
        tensors["manifest"] = torch.frombuffer(bytearray(zstandard.ZstdCompressor().compress(raw)), dtype=torch.uint8)
        header["corpus"].update(manifest_sha256=hashlib.sha256(raw).hexdigest(), manifest_size=len(raw))

    return apply


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.pop(), "manifest: lists 4 documents"),
    (lambda m: m[1].__setitem__("segment", 0), "manifest[1].segment"),
    (lambda m: m[1].__setitem__("tokens", m[1]["tokens"] + 1), "segments[1].tokens"),
    (lambda m: m[0].__setitem__("path", 7), "manifest[0].path"),
    (lambda m: m[0].__setitem__("sha256", "abc"), "manifest[0].sha256"),
], ids=["one-short", "segment", "tokens", "path-int", "sha"])
def test_a_manifest_that_disagrees_with_the_header_is_refused_at_load(tiny_pack, tmp_path, rewrite_pack, edit,
                                                                        needle):
    path = rewrite_pack(tiny_pack, tmp_path / "m.kvpack", _edit_manifest(edit))
    with pytest.raises(PackError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        kvcompile.load(path)


# ----------------------------------------------------------------------------- display


def test_pack_strings_reach_the_terminal_escaped(tiny_pack, tmp_path, rewrite_pack):
    def edit(header, tensors):
        header["model"]["architecture"] = "Llama\x1b[2J\nForCausalLM"
        header["recipe"]["name"] = "[bold red]qa[/]"

    path = rewrite_pack(tiny_pack, tmp_path / "d.kvpack", _edit_manifest(lambda m: m[0].__setitem__(
        "path", "evil\x1b]0;title\x07\u202efdp.txt")))
    path = rewrite_pack(path, tmp_path / "e.kvpack", edit)
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout and "\u202e" not in result.stdout
    assert "Llama\\x1b[2J\\nForCausalLM" in result.stdout
    assert "evil\\x1b]0;title\\x07\\u202efdp.txt" in result.stdout
    assert "[bold red]qa[/]" in result.stdout  # shown, not interpreted as markup


@pytest.mark.parametrize("name", ["new\nline.kvpack", "ansi\x1b[31m.kvpack"])
def test_errors_about_odd_file_names_stay_on_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not a pack at all, but long enough")
    line = one_error_line(invoke("inspect", path))
    assert printable(name) in line and "\x1b" not in line


def test_trailing_bytes_message_reads_well(tiny_pack, tmp_path):
    path = _write(tmp_path / "t.kvpack", tiny_pack.read_bytes() + b"xx")
    with pytest.raises(PackError, match="pack is followed by trailing bytes"):
        kvcompile.load(path)


def test_printable_escapes_controls_and_keeps_text():
    assert (printable("a\nb\x1b[1m\x7f\x85\u2028\u202e\u2066\udcff")
            == "a\\nb\\x1b[1m\\x7f\\x85\\u2028\\u202e\\u2066\\udcff")
    assert printable("café 漢字 — ok") == "café 漢字 — ok"


# ----------------------------------------------------------------------------- rebuilds


def _kept_share(path) -> float:
    p = kvcompile.load(path)
    return sum(map(sum, p.kept)) / (p.layout["tokens"] * len(p.kept) * len(p.kept[0]))


@pytest.mark.parametrize("edit", [
    lambda h, t: h["segments"][2]["tokens"].__setitem__(1, 0),  # the example
    lambda h, t: h["model"].__setitem__("num_layers", "2"),
], ids=["segment-end-0", "layers-str"])
def test_check_never_calls_an_invalid_pack_up_to_date(tiny_pack, tiny_corpus, tiny_model_dir, tmp_path, rewrite_pack,
                                                      edit):
    out = rewrite_pack(tiny_pack, tmp_path / "out.kvpack", edit)
    result = invoke("build", tiny_corpus, "-o", out, "--model", tiny_model_dir, "--ratio", "0.5",
                    "--chunk-size", "64", "--check")
    assert result.exit_code == 1, result.output
    assert "up to date" not in result.stderr
    assert "warning:" in result.stderr and "compiling all 5 documents" in result.stderr


def test_rebuild_from_a_lying_pack_starts_from_scratch(tiny_pack, tiny_corpus, tiny_lm, tmp_path, rewrite_pack):
    """Keys moved between segments: each key now sits beside another document's rows. The
    pack validates (a key is only a hash), but contradicts its own manifest."""
    from kvcompile.builder import BuildOptions
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    def edit(header, tensors):
        s = header["segments"]
        s[1]["key"], s[2]["key"] = s[2]["key"], s[1]["key"]

    out = rewrite_pack(tiny_pack, tmp_path / "out.kvpack", edit)
    kvcompile.load(out)  # accepted on its own
    report = build([tiny_corpus], out, tiny_lm, load_recipe("qa"), BuildOptions(ratio=0.5, chunk_size=64))
    assert report.plan.warning and "cannot be trusted" in report.plan.note
    assert report.plan.counts()["reused"] == 0
    fresh = kvcompile.load(tiny_pack)
    rebuilt = kvcompile.load(out)
    assert rebuilt.kept == fresh.kept and _kept_share(out) == pytest.approx(_kept_share(tiny_pack))
    for li in range(len(fresh.kept)):
        assert rebuilt.positions[li].equal(fresh.positions[li])


def test_rebuild_from_an_invalid_pack_warns_and_keeps_it_until_the_new_one_is_written(
        tiny_pack, tiny_corpus, tiny_model_dir, tmp_path, rewrite_pack):
    out = rewrite_pack(tiny_pack, tmp_path / "out.kvpack", lambda h, t: h["segments"][2]["tokens"].__setitem__(1, 0))
    result = invoke("build", tiny_corpus, "-o", out, "--model", tiny_model_dir, "--ratio", "0.5",
                    "--chunk-size", "64", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert "warning: previous pack unusable" in result.stderr.replace("\n", " ")
    assert _kept_share(out) == pytest.approx(_kept_share(tiny_pack))


def test_corpus_files_over_the_cap_fifos_and_devices_are_skipped_by_name(tiny_corpus, tiny_model_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in tiny_corpus.iterdir():
        (corpus / f.name).write_bytes(f.read_bytes())
    (corpus / "big.txt").write_text("word " * 300_000)  # 1.5 MB
    (corpus / "zero.txt").symlink_to("/dev/zero")
    os.mkfifo(corpus / "pipe.txt")
    result = _within(60, lambda: invoke("build", corpus, "-o", tmp_path / "c.kvpack", "--model", tiny_model_dir,
                                        "--max-file-mib", "1", "--dry-run"))
    assert result.exit_code == 0, result.output
    err = result.stderr.replace("\n", " ")
    assert "skipped big.txt: larger than the 1 MiB cap per file" in err
    assert "skipped zero.txt: not a regular file (character device)" in err
    assert "skipped pipe.txt: not a regular file (FIFO)" in err
    assert "compiling all 5 documents" in err


# ----------------------------------------------------------------------------- found in review


@pytest.mark.parametrize("header", ["{", "}", "{path!r}", "{path:>999999}", "{0}", "{}"])
def test_document_header_takes_only_plain_path_fields(tiny_pack, tmp_path, rewrite_pack, header):
    path = rewrite_pack(tiny_pack, tmp_path / "d.kvpack", set_field(["framing", "document_header"], header))
    with pytest.raises(PackError, match="framing.document_header"):
        kvcompile.load(path)


def test_renamed_tensors_are_sized_by_role(tiny_pack, tmp_path, rewrite_pack):
    def edit(header, tensors):
        for part in ("keys", "values"):
            old = header["cache"]["layers"][0][part]["tensors"]["data"]
            header["cache"]["layers"][0][part]["tensors"]["data"] = f"layers.{part[0]}0"
            tensors[f"layers.{part[0]}0"] = tensors.pop(old)

    path = rewrite_pack(tiny_pack, tmp_path / "r.kvpack", edit)
    sizes, before = kvcompile.load(path).sizes(), kvcompile.load(tiny_pack).sizes()
    assert all(sizes[k] == before[k] for k in ("keys", "values", "positions", "manifest", "other"))
    assert invoke("inspect", path).exit_code == 0


def test_a_pack_whose_shape_is_not_its_models_is_refused_at_query(tiny_pack, tiny_lm, tmp_path, rewrite_pack):
    from kvcompile.errors import ModelMismatchError

    path = rewrite_pack(tiny_pack, tmp_path / "r.kvpack", set_field(["model", "rope"], False))
    with pytest.raises(ModelMismatchError, match="model.rope is False"):
        kvcompile.load(path).session(tiny_lm)


@pytest.mark.parametrize("bomb", ["lists", "documents"])
def test_json_bombs_are_refused_before_they_cost_memory(tiny_pack, tmp_path, bomb):
    header = json.loads(Container(tiny_pack).metadata["kvpack"])
    if bomb == "lists":
        header["x_from_1_1"] = [[]] * 2_000_000  # 6 MB of JSON, ~130 MB of Python lists
        needle = "JSON values"
    else:
        header["corpus"]["documents"] = 2**24  # checked by a count, not by building range(2^24)
        needle = "segments: do not list documents"
    path = _raw_header(tiny_pack, tmp_path / "b.kvpack", json.dumps(header))
    t0 = time.perf_counter()
    with pytest.raises(PackError, match=needle):
        kvcompile.load(path)
    assert time.perf_counter() - t0 < 2


def test_check_tokenizes_what_it_would_reuse(tiny_pack, tiny_corpus, tiny_model_dir, tmp_path, rewrite_pack):
    """Segment 0 one token short and segment 1 one longer, the manifest agreeing: consistent in
    itself, but not with the documents. --check must see it (it reads the tokenizer)."""
    def edit(header, tensors):
        s = header["segments"]
        s[0]["tokens"][1] -= 1
        s[1]["tokens"][0] -= 1

    def manifest(m):
        m[0]["tokens"] -= 1
        m[1]["tokens"] += 1

    out = rewrite_pack(tiny_pack, tmp_path / "m.kvpack", _edit_manifest(manifest))
    out = rewrite_pack(out, tmp_path / "out.kvpack", edit)
    kvcompile.load(out)  # consistent in itself
    result = invoke("build", tiny_corpus, "-o", out, "--model", tiny_model_dir, "--ratio", "0.5", "--chunk-size", "64",
                    "--check")
    assert result.exit_code == 1, result.output
    assert "cannot be trusted (segment 0 spans" in result.stderr.replace("\n", " ")


def test_answers_reach_the_terminal_escaped():
    assert printable("line one\n\tline two\x1b[2J", keep="\n\t") == "line one\n\tline two\\x1b[2J"


def test_a_kept_table_of_every_layer_and_head_is_refused_before_its_items(tiny_pack, tmp_path):
    header = json.loads(Container(tiny_pack).metadata["kvpack"])
    header["cache"]["kept"] = [[0] * 4096 for _ in range(4096)]  # 16M counts, 32 MB of JSON
    path = _raw_header(tiny_pack, tmp_path / "w.kvpack", json.dumps(header))
    t0 = time.perf_counter()
    with pytest.raises(PackError, match="JSON values"):
        kvcompile.load(path)
    assert time.perf_counter() - t0 < 2
    header["cache"]["kept"] = [[0] * 300 for _ in range(300)]  # under the value budget: the grid cap
    path = _raw_header(tiny_pack, tmp_path / "w2.kvpack", json.dumps(header))
    with pytest.raises(PackError, match="cache.kept: 300 rows of 90000 items in all"):
        kvcompile.load(path)
