"""Corpus intake: folders, file types, skipping rules, errors, determinism."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from kvcompile.corpus import MAX_FILE_BYTES, Document, Skipped, html_to_text, read_corpus
from kvcompile.errors import CorpusError

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "example-corpus"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def paths(docs: list[Document]) -> list[str]:
    return [d.path for d in docs]


# --- folders -----------------------------------------------------------------------


def test_folder_is_walked_recursively_sorted_and_hidden_entries_skipped(tmp_path):
    write(tmp_path / "b.md", "bee")
    write(tmp_path / "a.txt", "ay")
    write(tmp_path / "sub" / "z.rst", "zed")
    write(tmp_path / "sub" / "deeper" / "c.txt", "see")
    write(tmp_path / ".hidden.txt", "secret")
    write(tmp_path / ".git" / "config.txt", "git stuff")
    write(tmp_path / "sub" / ".cache" / "x.md", "cached")

    docs, skipped = read_corpus([tmp_path])

    assert paths(docs) == ["a.txt", "b.md", "sub/deeper/c.txt", "sub/z.rst"]
    assert [d.text for d in docs] == ["ay", "bee", "see", "zed"]
    assert skipped == []  # hidden entries are left out without a report


def test_unsupported_extension_in_folder_is_reported(tmp_path):
    write(tmp_path / "a.txt", "text")
    write(tmp_path / "image.png", b"\x89PNG")
    docs, skipped = read_corpus([tmp_path])
    assert paths(docs) == ["a.txt"]
    assert skipped == [Skipped("image.png", "unsupported extension")]


def test_single_file_path_is_its_name(tmp_path):
    f = write(tmp_path / "deep" / "notes.MD", "hello")
    docs, _ = read_corpus([str(f)])
    assert paths(docs) == ["notes.MD"]


def test_single_file_with_unsupported_extension_is_an_error(tmp_path):
    f = write(tmp_path / "report.pdf", b"%PDF")
    with pytest.raises(CorpusError, match="unsupported extension"):
        read_corpus([f])


def test_colliding_paths_from_two_inputs_are_prefixed(tmp_path):
    write(tmp_path / "alpha" / "a.txt", "one")
    write(tmp_path / "beta" / "a.txt", "two")
    write(tmp_path / "beta" / "b.pdf", "pdf")
    docs, skipped = read_corpus([tmp_path / "alpha", tmp_path / "beta"])
    assert paths(docs) == ["alpha/a.txt", "beta/a.txt"]
    assert skipped == [Skipped("beta/b.pdf", "unsupported extension")]
    assert len(set(paths(docs))) == 2


def test_colliding_inputs_with_the_same_name_get_their_index(tmp_path):
    write(tmp_path / "x" / "docs" / "a.txt", "one")
    write(tmp_path / "y" / "docs" / "a.txt", "two")
    docs, _ = read_corpus([tmp_path / "x" / "docs", tmp_path / "y" / "docs"])
    assert paths(docs) == ["0-docs/a.txt", "1-docs/a.txt"]


def test_file_reached_twice_is_read_once(tmp_path):
    f = write(tmp_path / "c" / "a.txt", "one")
    docs, _ = read_corpus([tmp_path / "c", f])
    assert paths(docs) == ["a.txt"]


# --- text files --------------------------------------------------------------------


def test_text_is_normalised_bom_and_newlines(tmp_path):
    write(tmp_path / "a.txt", b"\xef\xbb\xbfline one\r\nline two\rline three\n")
    docs, _ = read_corpus([tmp_path])
    assert docs[0].text == "line one\nline two\nline three\n"


def test_sha256_is_of_the_utf8_text(tmp_path):
    write(tmp_path / "a.md", "caf\u00e9 \u2014 na\u00efve\n")
    (doc,), _ = read_corpus([tmp_path])
    assert doc.sha256 == hashlib.sha256(doc.text.encode("utf-8")).hexdigest()


def test_undecodable_file_is_skipped_with_reason(tmp_path):
    write(tmp_path / "good.txt", "fine")
    write(tmp_path / "bad.txt", b"hello \xff world")
    docs, skipped = read_corpus([tmp_path])
    assert paths(docs) == ["good.txt"]
    assert skipped == [Skipped("bad.txt", "not valid UTF-8 (byte 0xff at offset 6)")]


def test_error_when_nothing_is_left_says_what_was_skipped(tmp_path):
    write(tmp_path / "a.txt", b"\xff\xfe")
    write(tmp_path / "b.txt", b"\xc3\x28")
    write(tmp_path / "c.doc", "word")
    with pytest.raises(CorpusError) as err:
        read_corpus([tmp_path])
    message = str(err.value)
    assert "no readable documents" in message
    assert "3 files skipped" in message
    assert "2 not valid UTF-8" in message and "1 unsupported extension" in message
    assert "\n" not in message


def test_empty_and_whitespace_documents_are_skipped(tmp_path):
    write(tmp_path / "a.txt", "real text")
    write(tmp_path / "empty.md", "")
    write(tmp_path / "blank.md", "  \n\t\n")
    docs, skipped = read_corpus([tmp_path])
    assert paths(docs) == ["a.txt"]
    assert skipped == [Skipped("blank.md", "empty"), Skipped("empty.md", "empty")]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads everything")
def test_unreadable_file_is_skipped(tmp_path):
    write(tmp_path / "a.txt", "ok")
    locked = write(tmp_path / "locked.txt", "secret")
    locked.chmod(0)
    try:
        docs, skipped = read_corpus([tmp_path])
    finally:
        locked.chmod(0o644)
    assert paths(docs) == ["a.txt"]
    assert skipped[0].path == "locked.txt" and "cannot be read" in skipped[0].reason


def test_read_error_is_skipped_with_reason(tmp_path, monkeypatch):
    # Works as root too, where chmod cannot make a file unreadable.
    write(tmp_path / "a.txt", "ok")
    write(tmp_path / "b.txt", "secret")
    real = os.open

    def fake_open(path, *args, **kwargs):
        if Path(path).name == "b.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    docs, skipped = read_corpus([tmp_path])
    assert paths(docs) == ["a.txt"]
    assert skipped == [Skipped("b.txt", "cannot be read (Permission denied)")]


# --- special and oversized files ----------------------------------------------------

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
DEV_ZERO = Path("/dev/zero")
PROC_FILE = Path("/proc/self/status")


def read_corpus_promptly(*args, fifos=(), **kwargs):
    """read_corpus, failing (not hanging) if it blocks: opening a FIFO waits for a writer."""
    result: dict = {}

    def target():
        try:
            result["value"] = read_corpus(*args, **kwargs)
        except BaseException as e:  # handed to the test thread below
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        for fifo in fifos:  # be the writer it waits for, so the thread can end
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_corpus blocked")
    if "error" in result:
        raise result["error"]
    return result["value"]


@needs_fifo
@pytest.mark.parametrize("name", ["pipe.md", "pipe.jsonl"])
def test_fifo_in_a_folder_is_skipped_without_blocking(tmp_path, name):
    write(tmp_path / "a.md", "doc")
    os.mkfifo(tmp_path / name)
    docs, skipped = read_corpus_promptly([tmp_path], fifos=[tmp_path / name])
    assert paths(docs) == ["a.md"]
    assert skipped == [Skipped(name, "not a regular file (FIFO)")]


@needs_fifo
def test_fifo_named_explicitly_is_skipped_without_blocking(tmp_path):
    a = write(tmp_path / "a.md", "doc")
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    docs, skipped = read_corpus_promptly([fifo, a], fifos=[fifo])
    assert paths(docs) == ["a.md"]
    assert skipped == [Skipped("pipe.txt", "not a regular file (FIFO)")]
    # Alone, it leaves nothing: the usual error, which names it.
    with pytest.raises(CorpusError, match="pipe.txt.*not a regular file"):
        read_corpus_promptly([fifo], fifos=[fifo])


def test_socket_in_a_folder_is_skipped(tmp_path):
    socket = pytest.importorskip("socket")
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("no Unix sockets here")
    write(tmp_path / "a.md", "doc")
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.bind(str(tmp_path / "s.md"))
        except OSError as e:  # e.g. a path too long for sun_path
            pytest.skip(f"cannot bind a Unix socket here ({e})")
        docs, skipped = read_corpus_promptly([tmp_path])
    assert paths(docs) == ["a.md"]
    assert skipped == [Skipped("s.md", "not a regular file (socket)")]


@pytest.mark.skipif(not DEV_ZERO.exists(), reason="no /dev/zero here")
@pytest.mark.parametrize("name", ["zero.md", "zero.parquet"])
def test_link_to_a_device_is_skipped(tmp_path, name):
    write(tmp_path / "a.md", "doc")
    (tmp_path / name).symlink_to(DEV_ZERO)
    docs, skipped = read_corpus_promptly([tmp_path])
    assert paths(docs) == ["a.md"]
    assert skipped == [Skipped(name, "not a regular file (character device)")]
    # Named explicitly (through the link), the same.
    docs, skipped = read_corpus_promptly([tmp_path / name, tmp_path / "a.md"])
    assert skipped == [Skipped(name, "not a regular file (character device)")]


@pytest.mark.skipif(not PROC_FILE.is_file(), reason="no /proc here")
def test_link_to_a_proc_file_is_skipped(tmp_path):
    # /proc files are regular, with st_size 0 whatever they hold: caught by where they are.
    write(tmp_path / "a.md", "doc")
    (tmp_path / "status.txt").symlink_to(PROC_FILE)
    docs, skipped = read_corpus_promptly([tmp_path])
    assert paths(docs) == ["a.md"]
    assert skipped == [Skipped("status.txt", "on a special file system (/proc)")]
    docs, skipped = read_corpus_promptly([tmp_path / "status.txt", tmp_path / "a.md"])
    assert paths(docs) == ["a.md"]
    assert skipped == [Skipped("status.txt", "on a special file system (/proc)")]


def test_file_over_the_cap_is_skipped(tmp_path):
    write(tmp_path / "a.md", "x" * 100)  # exactly at the cap: read
    write(tmp_path / "b.md", "x" * 101)
    write(tmp_path / "c.jsonl", json.dumps({"text": "x" * 100}) + "\n")
    docs, skipped = read_corpus([tmp_path], max_file_bytes=100)
    assert paths(docs) == ["a.md"]
    assert skipped == [
        Skipped("b.md", "larger than the 100-byte cap per file"),
        Skipped("c.jsonl", "larger than the 100-byte cap per file"),
    ]
    # Named explicitly: skipped as well, like an unreadable file.
    docs, skipped = read_corpus([tmp_path / "b.md", tmp_path / "a.md"], max_file_bytes=100)
    assert skipped == [Skipped("b.md", "larger than the 100-byte cap per file")]


def test_default_cap_is_64_mib(tmp_path):
    assert MAX_FILE_BYTES == 64 * 1024 * 1024
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no 64 MiB written
    write(tmp_path / "a.md", "doc")
    docs, skipped = read_corpus([tmp_path])
    assert paths(docs) == ["a.md"]
    assert skipped == [Skipped("big.txt", "larger than the 64 MiB cap per file")]


@pytest.mark.parametrize("name", ["big.md", "big.jsonl"])
def test_cap_holds_while_reading_when_st_size_lies(tmp_path, monkeypatch, name):
    # As /proc files do, and as a file growing after the check does: st_size says 0.
    write(tmp_path / "a.md", "doc")
    big = write(tmp_path / name, json.dumps({"text": "x" * 200}) + "\n")
    inode = big.stat().st_ino

    def shrunk(real):
        def fake(*args, **kwargs):
            st = real(*args, **kwargs)
            if st.st_ino != inode:
                return st
            fields = list(st)
            fields[stat.ST_SIZE] = 0
            return os.stat_result(fields)

        return fake

    monkeypatch.setattr(os, "stat", shrunk(os.stat))
    monkeypatch.setattr(os, "fstat", shrunk(os.fstat))
    docs, skipped = read_corpus([tmp_path], max_file_bytes=100)
    assert paths(docs) == ["a.md"]
    assert skipped == [Skipped(name, "larger than the 100-byte cap per file")]


def test_path_swapped_for_a_fifo_after_the_check_is_caught(tmp_path, monkeypatch):
    # The descriptor is checked too: a FIFO put in place after os.stat is never read.
    write(tmp_path / "a.md", "doc")
    target = write(tmp_path / "b.md", "doc")
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    real = os.open

    def swap_then_open(path, *args, **kwargs):
        if Path(path).name == "b.md":
            os.unlink(target)
            os.mkfifo(target)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", swap_then_open)
    docs, skipped = read_corpus_promptly([tmp_path], fifos=[target])
    assert paths(docs) == ["a.md"]
    assert skipped == [Skipped("b.md", "not a regular file (FIFO)")]


# --- errors on input ---------------------------------------------------------------


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus([tmp_path / "nope"])


def test_no_paths_is_an_error():
    with pytest.raises(CorpusError, match="no corpus paths"):
        read_corpus([])


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no documents"):
        read_corpus([tmp_path / "empty"])


# --- HTML --------------------------------------------------------------------------


HTML = """<!DOCTYPE html>
<html><head><title>Page title</title>
<style>body { color: red; }</style>
<script>var hidden = "script text";</script></head>
<body>
  <h1>Main   heading</h1>
  <p>First paragraph with <b>bold</b> words.<br>After a break &amp; an entity.</p>
  <script>document.write("<p>not shown</p>");</script>
  <ul><li>apple</li><li>pear</li></ul>
  <ol><li>first step</li><li>second step</li></ol>
  <table><tr><th>Plan</th><th>Price</th></tr><tr><td>Pro</td><td>$8</td></tr></table>
  <div>last</div>
</body></html>"""


def test_html_keeps_visible_text_and_drops_script_style_head():
    text = html_to_text(HTML)
    assert "script text" not in text and "not shown" not in text
    assert "color: red" not in text and "Page title" not in text
    assert text == (
        "Main heading\n\n"
        "First paragraph with bold words.\nAfter a break & an entity.\n\n"
        "- apple\n- pear\n"
        "1. first step\n2. second step\n"
        "Plan | Price\nPro | $8\n"
        "last\n"
    )


def test_html_file_is_read(tmp_path):
    write(tmp_path / "page.htm", HTML)
    (doc,), _ = read_corpus([tmp_path])
    assert doc.path == "page.htm"
    assert doc.text.startswith("Main heading\n")
    assert "var hidden" not in doc.text


def test_html_with_unclosed_head_still_shows_body():
    assert html_to_text("<html><head><title>t</title><body><p>visible</p>") == "visible\n"


# --- data files --------------------------------------------------------------------


def test_jsonl_records_are_documents(tmp_path):
    rows = [{"text": "first"}, {"text": "  "}, {"text": "third", "id": 3}]
    write(tmp_path / "data.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    docs, skipped = read_corpus([tmp_path])
    assert paths(docs) == ["data.jsonl#0", "data.jsonl#2"]
    assert [d.text for d in docs] == ["first", "third"]
    assert skipped == [Skipped("data.jsonl#1", "empty")]


def test_json_csv_parquet_and_text_field(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    write(tmp_path / "a.json", json.dumps([{"body": "json one"}, {"body": "json two"}]))
    write(tmp_path / "b.csv", 'id,body\n1,csv one\n2,"csv\r\ntwo"\n')
    pd.DataFrame({"body": ["pq one", "pq two"], "n": [1, 2]}).to_parquet(tmp_path / "c.parquet")

    docs, skipped = read_corpus([tmp_path], text_field="body")

    assert skipped == []
    assert paths(docs) == ["a.json#0", "a.json#1", "b.csv#0", "b.csv#1", "c.parquet#0", "c.parquet#1"]
    assert [d.text for d in docs] == ["json one", "json two", "csv one", "csv\ntwo", "pq one", "pq two"]


def test_data_file_with_glob_characters_in_its_name(tmp_path):
    f = write(tmp_path / "report[1].jsonl", '{"text": "bracketed"}\n')
    docs, _ = read_corpus([f])
    assert paths(docs) == ["report[1].jsonl#0"]


def test_loading_data_is_quiet(tmp_path, capfd):
    write(tmp_path / "data.jsonl", '{"text": "x"}\n')
    write(tmp_path / "broken.jsonl", '{"text": "x"}\nnot json\n')
    _, skipped = read_corpus([tmp_path])
    out, errout = capfd.readouterr()
    assert out == "" and errout == ""
    assert skipped[0].path == "broken.jsonl" and skipped[0].reason.startswith("cannot be parsed as .jsonl")


def test_missing_text_field_in_named_file_is_an_error(tmp_path):
    f = write(tmp_path / "data.jsonl", '{"body": "x", "id": 1}\n')
    with pytest.raises(CorpusError) as err:
        read_corpus([f])
    message = str(err.value)
    assert "data.jsonl" in message and "'text'" in message
    assert "'body'" in message and "'id'" in message and "--text-field" in message


def test_missing_text_field_in_folder_is_skipped(tmp_path):
    write(tmp_path / "a.md", "doc")
    write(tmp_path / "questions.jsonl", '{"question": "q?"}\n')
    docs, skipped = read_corpus([tmp_path])
    assert paths(docs) == ["a.md"]
    assert skipped[0].path == "questions.jsonl" and "--text-field" in skipped[0].reason


# --- determinism -------------------------------------------------------------------


def test_reading_twice_gives_identical_results(tmp_path):
    for name in ["z.txt", "a/b.md", "a/c.txt", "m.html"]:
        write(tmp_path / name, f"<p>content of {name}</p>\r\n")
    write(tmp_path / "d.jsonl", '{"text": "r0"}\n{"text": "r1"}\n')
    first = read_corpus([tmp_path])
    second = read_corpus([str(tmp_path)])
    assert first == second
    assert paths(first[0]) == sorted(paths(first[0]))


# --- the example corpus ------------------------------------------------------------


def test_example_corpus_loads_and_every_answer_is_in_it():
    docs, skipped = read_corpus([EXAMPLE])
    assert len(docs) >= 6
    assert {Path(d.path).suffix for d in docs} >= {".md", ".txt", ".html"}
    # questions.jsonl sits in the folder and has no "text" column: skipped, not read.
    assert [s.path for s in skipped] == ["questions.jsonl"]

    words = sum(len(d.text.split()) for d in docs)
    assert 3000 <= words * 1.3 <= 4500, words

    corpus = " ".join(" ".join(d.text.split()) for d in docs).lower()
    lines = (EXAMPLE / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert 25 <= len(records) <= 40
    assert len({r["id"] for r in records}) == len(records)
    assert any(r["question"] == "How do I reset my password?" for r in records)
    for r in records:
        assert r["answers"], r["id"]
        for answer in r["answers"]:
            assert " ".join(answer.split()).lower() in corpus, (r["id"], answer)


def test_a_parquet_file_that_decompresses_past_the_cap_is_skipped(tmp_path):
    import pandas as pd

    # 400 KB of text that compresses to a few KB: under a 64 KiB cap on disk, far over it loaded.
    pd.DataFrame({"text": ["word " * 20_000] * 4}).to_parquet(tmp_path / "big.parquet", compression="zstd")
    (tmp_path / "small.txt").write_text("A real document.")
    assert (tmp_path / "big.parquet").stat().st_size < 64 << 10
    docs, skipped = read_corpus([tmp_path], max_file_bytes=64 << 10)
    assert [d.path for d in docs] == ["small.txt"]
    assert len(skipped) == 1 and skipped[0].path == "big.parquet"
    assert skipped[0].reason.startswith("larger than the 64 KiB cap per file once decompressed")
