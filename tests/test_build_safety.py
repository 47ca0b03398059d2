"""Builds are deterministic and atomic: equal inputs give equal bytes, and a failing,
interrupted or killed build never damages the pack already at the output path.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import kvcompile
import kvcompile.pipeline
import kvcompile.writer
from kvcompile.builder import BuildOptions
from kvcompile.errors import KvcompileError
from kvcompile.models import load_model
from kvcompile.pipeline import build
from kvcompile.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("torch_single_thread")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def qa():
    return load_recipe("qa")


@pytest.fixture
def existing(tiny_pack, tmp_path) -> Path:
    """A directory holding one good pack, ``out.kvpack``, that a later build will try to replace."""
    out = tmp_path / "packs" / "out.kvpack"
    out.parent.mkdir()
    shutil.copyfile(tiny_pack, out)
    return out


def _temp_files(directory: Path, name: str) -> list[Path]:
    return sorted(directory.glob(f".{name}.*.tmp"))


# ----------------------------------------------------------------------------- determinism


def test_rebuild_is_byte_identical(tiny_pack, tiny_corpus, tiny_lm, qa, tmp_path):
    again = tmp_path / "again.kvpack"
    build([tiny_corpus], again, tiny_lm, qa, BuildOptions(ratio=0.5, chunk_size=64))
    assert again.read_bytes() == tiny_pack.read_bytes()


def test_rebuild_with_a_freshly_loaded_model_and_several_chunks_is_byte_identical(
        tiny_model_dir, tiny_corpus, tiny_lm, qa, tmp_path):
    options = BuildOptions(ratio=0.25, chunk_size=96)
    a, b = tmp_path / "a" / "p.kvpack", tmp_path / "b.kvpack"
    report = build([tiny_corpus], a, tiny_lm, qa, options)
    assert report.cache_tokens > 5 * options.chunk_size  # several chunks, so selection ran several times
    fresh = load_model(str(tiny_model_dir), device="cpu", progress=False)
    build([tiny_corpus], b, fresh, qa, options)
    assert a.read_bytes() == b.read_bytes()


def test_different_options_give_different_bytes(tiny_pack, tiny_corpus, tiny_lm, qa, tmp_path):
    # The counterpart of the determinism tests: the bytes do depend on the options.
    other = tmp_path / "other.kvpack"
    build([tiny_corpus], other, tiny_lm, qa, BuildOptions(ratio=0.5, chunk_size=128, context="chained"))
    assert other.read_bytes() != tiny_pack.read_bytes()
    a, b = kvcompile.load(other), kvcompile.load(tiny_pack)

    def per_head(p):  # the kept positions of each (layer, head)
        return [run.tolist() for layer, kept in zip(p.positions, p.kept) for run in layer.split(kept)]

    # Not only the header: the selection itself differs.
    assert len(per_head(a)) == len(per_head(b)) and per_head(a) != per_head(b)


# ----------------------------------------------------------------------------- failures leave the old pack


def test_failure_during_compile_leaves_the_old_pack(existing, tiny_corpus, tiny_lm, qa, monkeypatch):
    before = existing.read_bytes()
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("boom in compile")

    monkeypatch.setattr(kvcompile.pipeline, "compile_corpus", broken)
    with pytest.raises(RuntimeError, match="boom in compile"):
        build([tiny_corpus], existing, tiny_lm, qa, BuildOptions(ratio=0.25, chunk_size=2048))
    assert calls == [1]
    assert existing.read_bytes() == before
    assert files_beside(existing) == ["out.kvpack"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_failure_midway_through_writing_leaves_the_old_pack(existing, tiny_corpus, tiny_lm, qa, monkeypatch, error):
    before = existing.read_bytes()
    real = kvcompile.writer.write_container
    seen = {}

    def half_then_fail(f, tensors, metadata):
        import io

        buf = io.BytesIO()
        real(buf, tensors, metadata)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        seen["temp"] = _temp_files(existing.parent, existing.name)
        raise error

    monkeypatch.setattr(kvcompile.writer, "write_container", half_then_fail)
    # A failed write may be reported as the OSError itself or as a one-line KvcompileError.
    expected = (OSError, KvcompileError) if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        build([tiny_corpus], existing, tiny_lm, qa, BuildOptions(ratio=0.25, chunk_size=2048))
    # The half-written file was a temporary one next to the pack, and it is gone.
    assert len(seen["temp"]) == 1
    assert not seen["temp"][0].exists()
    assert existing.read_bytes() == before
    assert files_beside(existing) == ["out.kvpack"]
    kvcompile.load(existing)


def test_successful_build_replaces_the_old_pack_and_leaves_no_temp_files(existing, tiny_corpus, tiny_lm, qa):
    before = existing.read_bytes()
    build([tiny_corpus], existing, tiny_lm, qa, BuildOptions(ratio=0.25, chunk_size=2048))
    assert existing.read_bytes() != before
    assert kvcompile.load(existing).header["options"]["ratio"] == 0.25
    assert files_beside(existing) == ["out.kvpack"]


def test_build_creates_missing_output_directories(tiny_corpus, tiny_lm, qa, tmp_path):
    out = tmp_path / "a" / "b" / "p.kvpack"
    build([tiny_corpus], out, tiny_lm, qa, BuildOptions(ratio=0.25, chunk_size=2048))
    assert kvcompile.load(out).kept


def test_written_pack_has_the_usual_file_mode(tiny_corpus, tiny_lm, qa, tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "mode.kvpack"
    build([tiny_corpus], out, tiny_lm, qa, BuildOptions(ratio=0.25, chunk_size=2048))
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")  # what open() gives under the same umask
    assert (out.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == (0o666 & ~umask)


# ----------------------------------------------------------------------------- SIGKILL mid-write

_SLOW_BUILD = textwrap.dedent("""
    import io, os, sys, time
    import kvcompile.writer as writer
    from kvcompile.builder import BuildOptions
    from kvcompile.models import load_model
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    real = writer.write_container

    def slow(f, tensors, metadata):
        buf = io.BytesIO()
        size = real(buf, tensors, metadata)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print(f"HALF {len(data)}", flush=True)
        time.sleep(120)
        f.write(data[len(data) // 2 :])
        return size

    writer.write_container = slow
    model_dir, corpus, out = sys.argv[1:4]
    lm = load_model(model_dir, device="cpu", progress=False)
    build([corpus], out, lm, load_recipe("qa"), BuildOptions(ratio=0.25, chunk_size=2048))
    print("DONE", flush=True)
""")


def test_sigkill_mid_write_leaves_the_old_pack(existing, tiny_model_dir, tiny_corpus, tiny_lm, qa, tmp_path):
    before = existing.read_bytes()
    log = tmp_path / "child.log"
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", _SLOW_BUILD, str(tiny_model_dir), str(tiny_corpus), str(existing)],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )
    try:
        deadline = time.monotonic() + 150
        temp = []
        while time.monotonic() < deadline:
            temp = [p for p in _temp_files(existing.parent, existing.name) if p.stat().st_size > 0]
            # The whole line: an unbuffered print may reach the log in pieces.
            if temp and re.search(rb"HALF \d+\n", log.read_bytes()):
                break
            assert child.poll() is None, f"the child build ended early:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        assert temp, f"no temporary file appeared:\n{log.read_text()[-3000:]}"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    # The kill happened mid-write: a partial temporary file exists (its cleanup is not tested here).
    half, full = temp[0].stat().st_size, int(re.search(r"HALF (\d+)\n", log.read_text()).group(1))
    assert 0 < half < full
    assert b"DONE" not in log.read_bytes()
    # The old pack is untouched and still loads.
    assert existing.read_bytes() == before
    assert kvcompile.load(existing).header["options"]["ratio"] == 0.5
    # A second build to the same path succeeds despite the stale temporary file.
    build([tiny_corpus], existing, tiny_lm, qa, BuildOptions(ratio=0.25, chunk_size=2048))
    rebuilt = kvcompile.load(existing)
    assert rebuilt.header["options"]["ratio"] == 0.25
    assert existing.read_bytes() != before


def files_beside(pack: Path) -> list[str]:
    """Names in the pack's folder, but the build lock (it stays, empty, by design: see rebuild.py)."""
    return sorted(p.name for p in pack.parent.iterdir() if p.name != f".{pack.name}.lock")
