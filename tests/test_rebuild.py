"""Nightly rebuilds: segments reused by content key, byte-identical to clean builds, --check, the lock."""

from __future__ import annotations

import fcntl
import os
import shutil

import pytest
from typer.testing import CliRunner

from kvcompile.builder import BuildOptions
from kvcompile.cli import app
from kvcompile.errors import OptionError
from kvcompile.pipeline import build
from kvcompile.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()
QA = load_recipe("qa")


@pytest.fixture
def corpus50(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(50):
        (root / f"doc{i:02d}.txt").write_text(f"Document {i}. The keeper of lamp {i} lives in town {i * 7}. "
                                              f"Its colour is shade {i % 9}.", encoding="utf-8")
    return root


def opts(context: str, quant: str = "none") -> BuildOptions:
    return BuildOptions(ratio=0.5, chunk_size=64, context=context, quant=quant, quant_group=4)


@pytest.mark.parametrize("context, recompiled, quant", [
    ("independent", 1, "none"), ("chained", 50 - 17, "none"),
    # quantised segments are copied as encoded bytes (never decoded and encoded again)
    ("independent", 1, "int3"), ("chained", 50 - 17, "int2")])
def test_one_edit_recompiles_what_the_mode_requires_and_matches_a_clean_build(
        tiny_lm, corpus50, tmp_path, context, recompiled, quant):
    pack = tmp_path / "p.kvpack"
    first = build([corpus50], pack, tiny_lm, QA, opts(context, quant))
    assert first.plan.counts() == {"reused": 0, "recompiled": 0, "added": 50, "dropped": 0}
    (corpus50 / "doc17.txt").write_text("Document 17 was rewritten: the lamp moved to town 3.", encoding="utf-8")
    again = build([corpus50], pack, tiny_lm, QA, opts(context, quant))
    assert again.plan.counts() == {"reused": 50 - recompiled, "recompiled": recompiled, "added": 0, "dropped": 0}
    clean = tmp_path / "clean.kvpack"
    build([corpus50], clean, tiny_lm, QA, opts(context, quant))
    assert pack.read_bytes() == clean.read_bytes()


@pytest.mark.parametrize("context", ["independent", "chained"])
def test_adding_and_deleting_documents(tiny_lm, corpus50, tmp_path, context):
    pack = tmp_path / "p.kvpack"
    build([corpus50], pack, tiny_lm, QA, opts(context))
    (corpus50 / "doc30.txt").unlink()
    (corpus50 / "doc99.txt").write_text("A new document about lamp 99.", encoding="utf-8")
    report = build([corpus50], pack, tiny_lm, QA, opts(context))
    c = report.plan.counts()
    assert (c["added"], c["dropped"]) == (1, 1)
    # independent: only the new one is compiled; chained: everything from doc30's old place on
    assert c["reused"] == (49 if context == "independent" else 30)
    clean = tmp_path / "clean.kvpack"
    build([corpus50], clean, tiny_lm, QA, opts(context))
    assert pack.read_bytes() == clean.read_bytes()


def test_reuse_from_another_pack(tiny_lm, corpus50, tmp_path):
    old = tmp_path / "old.kvpack"
    build([corpus50], old, tiny_lm, QA, opts("independent"))
    report = build([corpus50], tmp_path / "new.kvpack", tiny_lm, QA, opts("independent"), reuse=old)
    assert report.plan.counts()["reused"] == 50
    assert (tmp_path / "new.kvpack").read_bytes() == old.read_bytes()


def test_a_changed_option_reuses_nothing(tiny_lm, corpus50, tmp_path):
    pack = tmp_path / "p.kvpack"
    build([corpus50], pack, tiny_lm, QA, opts("independent"))
    report = build([corpus50], pack, tiny_lm, QA, BuildOptions(ratio=0.25, chunk_size=64))
    assert report.plan.counts()["reused"] == 0


def check(*args):
    return runner.invoke(app, ["build", *map(str, args), "--check"])


def test_check_exit_codes(tiny_model_dir, corpus50, tmp_path):
    pack = tmp_path / "p.kvpack"
    common = ["--model", tiny_model_dir, "--ratio", 0.5, "--chunk-size", 64]
    assert check(corpus50, "-o", pack, *common).exit_code == 1  # no pack yet
    assert runner.invoke(app, ["build", str(corpus50), "-o", str(pack), *map(str, common), "-q"]).exit_code == 0
    fresh = check(corpus50, "-o", pack, *common)
    assert fresh.exit_code == 0, fresh.output
    assert "up to date" in fresh.stderr.replace("\n", " ")
    assert check(corpus50, "-o", pack, *common, "--task", "faq").exit_code == 1  # recipe changed
    assert check(corpus50, "-o", pack, *common[2:]).exit_code == 1  # model changed (the default one)
    (corpus50 / "doc05.txt").write_text("Edited.", encoding="utf-8")
    edited = check(corpus50, "-o", pack, *common)
    assert edited.exit_code == 1 and "recompiled doc05.txt" in " ".join(edited.stdout.split())


def test_dry_run_builds_nothing(tiny_model_dir, corpus50, tmp_path):
    pack = tmp_path / "p.kvpack"
    result = runner.invoke(app, ["build", str(corpus50), "-o", str(pack), "--model", str(tiny_model_dir), "--dry-run"])
    assert result.exit_code == 0 and "added" in result.stdout
    assert not pack.exists()


def test_a_second_build_of_the_same_pack_is_refused(tiny_lm, corpus50, tmp_path):
    pack = tmp_path / "p.kvpack"
    fd = os.open(tmp_path / ".p.kvpack.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(OptionError, match="another build is writing"):
            build([corpus50], pack, tiny_lm, QA, opts("independent"))
    finally:
        os.close(fd)
    build([corpus50], pack, tiny_lm, QA, opts("independent"))  # the lock died with its holder


def test_stale_temporary_files_are_removed(tiny_lm, corpus50, tmp_path):
    pack = tmp_path / "p.kvpack"
    debris = tmp_path / ".p.kvpack.abc123.tmp"
    debris.write_bytes(b"half a pack")
    other = tmp_path / ".other.kvpack.abc123.tmp"  # another pack's: not ours to remove
    other.write_bytes(b"x")
    build([corpus50], pack, tiny_lm, QA, opts("independent"))
    assert not debris.exists() and other.exists()


def test_an_unreadable_document_does_not_discard_the_others(tiny_lm, corpus50, tmp_path):
    pack = tmp_path / "p.kvpack"
    build([corpus50], pack, tiny_lm, QA, opts("independent"))
    (corpus50 / "doc07.txt").write_bytes(b"\xff\xfe\x00broken \xc3\x28")
    report = build([corpus50], pack, tiny_lm, QA, opts("independent"))
    assert [s.path for s in report.skipped] == ["doc07.txt"]
    assert report.plan.counts() == {"reused": 49, "recompiled": 0, "added": 0, "dropped": 1}


def test_a_corrupt_previous_pack_is_rebuilt_from_scratch(tiny_lm, corpus50, tmp_path):
    pack = tmp_path / "p.kvpack"
    build([corpus50], pack, tiny_lm, QA, opts("independent"))
    good = tmp_path / "good.kvpack"
    shutil.copy(pack, good)
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    report = build([corpus50], pack, tiny_lm, QA, opts("independent"))
    assert report.plan.counts()["reused"] == 0 and "unusable" in report.plan.note
    assert pack.read_bytes() == good.read_bytes()
