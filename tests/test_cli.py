"""The command line: build, inspect, query, and one clean line for every user mistake.

Most tests run ``kvcompile.cli.app`` in-process with typer's CliRunner (stdout and stderr
are separate); the ones about real exit codes, stderr and tracebacks run
``python -m kvcompile.cli`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kvcompile
from kvcompile.cli import app
from kvcompile.container import Container

pytestmark = pytest.mark.usefixtures("torch_single_thread")

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_error_line(result, *needles) -> str:
    """Assert a clean failure: non-zero exit, exactly one 'error:' line on stderr, no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no escaped exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def cli_pack(tiny_model_dir, tiny_corpus, tmp_path_factory):
    """A pack built through the CLI, with the result of the build command."""
    out = tmp_path_factory.mktemp("cli") / "cli.kvpack"
    result = invoke("build", tiny_corpus, "-o", out, "--model", tiny_model_dir, "--ratio", "0.5",
                    "--chunk-size", "64", "--device", "cpu", "--quiet")
    return out, result


@pytest.fixture
def build_args(tiny_model_dir, tiny_corpus, tmp_path):
    def args(*extra, corpus=None):
        return ["build", corpus or tiny_corpus, "-o", tmp_path / "out.kvpack", "--model", tiny_model_dir,
                "--device", "cpu", "--quiet", *extra]

    return args


def _flipped(src: Path, dst: Path, offset: int) -> Path:
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


# ----------------------------------------------------------------------------- build, inspect, query


def test_build_writes_a_pack_and_says_so(cli_pack, tiny_corpus):
    out, result = cli_pack
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.stat().st_size > 0
    assert result.stderr.count("wrote") == 1 and str(out) in result.stderr
    assert "5 documents" in result.stderr
    assert "skipped" not in result.stderr and "error" not in result.stderr


def test_inspect_text(cli_pack, tiny_model_dir):
    out, _ = cli_pack
    result = invoke("inspect", out)
    assert result.exit_code == 0, result.output
    assert "kvpack 1.5" in result.stdout
    assert str(tiny_model_dir) in result.stdout
    assert "billing.txt" in result.stdout and "support.txt" in result.stdout
    assert "recipe    qa" in result.stdout
    pack = kvcompile.load(out)
    compact = pack.attended_positions("compact")[1]
    assert f"questions start at {compact} (compact" in result.stdout
    assert f"or {pack.question_position} (--positions original)" in result.stdout


def test_inspect_json(cli_pack):
    out, _ = cli_pack
    result = invoke("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    header = json.loads(Container(out).metadata["kvpack"])
    assert info["question_position"]["original"] == header["cache"]["question_position"]
    assert info["question_position"]["compact"] == max(max(layer) for layer in header["cache"]["kept"])
    m = info["model"]
    layers, kv_heads, head_dim = m["num_layers"], m["num_kv_heads"], m["head_dim"]
    assert (layers, kv_heads, head_dim) == (2, 2, 16)
    tokens = info["cache_tokens"]
    assert tokens == header["cache"]["tokens"] > 500
    assert len(info["kept"]) == layers and all(len(row) == kv_heads for row in info["kept"])
    assert info["kept"] == header["cache"]["kept"]
    assert info["kept_share"] == pytest.approx(0.5, abs=0.03)  # half of each document, and the framing whole
    assert info["bytes"]["file"] == out.stat().st_size
    assert info["bytes"]["full_fp16"] == 2 * layers * kv_heads * tokens * head_dim * 2
    assert len(info["documents"]) == 5 and info["recipe"] == "qa" and info["version"] == [1, 5]


def test_query_json(cli_pack):
    out, _ = cli_pack
    result = invoke("query", out, "When was the company founded?", "--json", "--max-new-tokens", "3",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["question"] == "When was the company founded?"
    assert isinstance(answer["answer"], str)
    t = answer["timings"]
    for key in ("pack_load_s", "ttft_s", "tokens_per_s", "decode_s"):
        assert isinstance(t[key], (int, float)) and t[key] >= 0, key
    assert t["pack_load_s"] > 0 and t["ttft_s"] > 0
    assert 0 <= t["tokens"] <= 3


def test_query_streams_plain_text(cli_pack):
    out, _ = cli_pack
    result = invoke("query", out, "Where is the warehouse?", "--max-new-tokens", "3", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_query_interactive(cli_pack):
    out, _ = cli_pack
    result = invoke("query", out, "--max-new-tokens", "2", "--device", "cpu", input="q1\n\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("? ") == 2  # asked, answered, asked again, then the empty line ends it
    assert "5 documents" in result.stderr


def test_query_interactive_survives_a_bad_question(cli_pack):
    out, _ = cli_pack
    long = "word " * 5000
    result = invoke("query", out, "--max-new-tokens", "2", "--device", "cpu", input=f"{long}\nq2\n\n")
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "shorten it" in errors[0]
    assert result.stdout.count("? ") == 3


# ----------------------------------------------------------------------------- corpus errors


def test_missing_corpus_path(build_args, tmp_path):
    one_error_line(invoke(*build_args(corpus=tmp_path / "nope")), "does not exist")
    assert not (tmp_path / "out.kvpack").exists()


def test_empty_corpus_folder(build_args, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(invoke(*build_args(corpus=empty)), "no documents")


def test_corpus_with_only_an_undecodable_file(build_args, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.txt").write_bytes(b"\xff\xfe\xfa")
    one_error_line(invoke(*build_args(corpus=bad)), "x.txt")


def test_undecodable_file_next_to_a_good_one_is_skipped(build_args, tmp_path):
    corpus = tmp_path / "mixed"
    corpus.mkdir()
    (corpus / "x.txt").write_bytes(b"\xff\xfe\xfa")
    (corpus / "good.txt").write_text("The office is in Lyon. It opens at nine. " * 10)
    result = invoke(*build_args(corpus=corpus))
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "x.txt" in skipped[0]
    assert "wrote" in result.stderr and "1 documents" in result.stderr
    assert (tmp_path / "out.kvpack").is_file()


# ----------------------------------------------------------------------------- pack errors


@pytest.mark.parametrize("command", ["query", "inspect"])
def test_flipped_byte_pack(cli_pack, tmp_path, command):
    out, _ = cli_pack
    c = Container(out)
    bad = _flipped(out, tmp_path / "bad.kvpack", c.size - 100)  # in the tensor data
    args = [command, bad] + (["q", "--device", "cpu"] if command == "query" else [])
    one_error_line(invoke(*args), "checksum mismatch", str(bad))


@pytest.mark.parametrize("command", ["query", "inspect"])
def test_flipped_byte_in_the_header(cli_pack, tmp_path, command):
    out, _ = cli_pack
    bad = _flipped(out, tmp_path / "bad.kvpack", 8 + 200)
    args = [command, bad] + (["q"] if command == "query" else [])
    one_error_line(invoke(*args), "corrupt")


@pytest.mark.parametrize("command", ["query", "inspect"])
def test_truncated_pack(cli_pack, tmp_path, command):
    out, _ = cli_pack
    cut = tmp_path / "cut.kvpack"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    args = [command, cut] + (["q"] if command == "query" else [])
    one_error_line(invoke(*args), "truncated")


def test_missing_pack(tmp_path):
    one_error_line(invoke("inspect", tmp_path / "none.kvpack"), "none.kvpack")


@pytest.mark.parametrize("command", ["query", "inspect"])
def test_newer_major_pack(cli_pack, tmp_path, rewrite_pack, command):
    out, _ = cli_pack
    newer = rewrite_pack(out, tmp_path / "v2.kvpack", lambda h, t: h.__setitem__("version", [2, 0]))
    args = [command, newer] + (["q"] if command == "query" else [])
    one_error_line(invoke(*args), "upgrade")


def test_query_pack_with_malformed_question_position(cli_pack, tmp_path, rewrite_pack):
    out, _ = cli_pack
    bad = rewrite_pack(out, tmp_path / "qp.kvpack", lambda h, t: h["cache"].__setitem__("question_position", "end"))
    one_error_line(invoke("query", bad, "q", "--device", "cpu"), "corrupt")


def test_inspect_pack_with_malformed_manifest_size(cli_pack, tmp_path, rewrite_pack):
    out, _ = cli_pack
    bad = rewrite_pack(out, tmp_path / "ms.kvpack", lambda h, t: h["corpus"].__setitem__("manifest_size", "many"))
    one_error_line(invoke("inspect", bad), "corrupt")


def test_query_with_another_model_names_both(cli_pack, tiny_model_dir, tmp_path_factory):
    from kvcompile.models import make_tiny_model

    other = make_tiny_model(tmp_path_factory.mktemp("other") / "llama1", seed=1)
    out, _ = cli_pack
    line = one_error_line(invoke("query", out, "q", "--model", other, "--device", "cpu"))
    assert str(tiny_model_dir) in line and str(other) in line


def test_empty_question(cli_pack):
    out, _ = cli_pack
    one_error_line(invoke("query", out, "", "--device", "cpu"), "empty")
    one_error_line(invoke("query", out, "   ", "--device", "cpu"), "empty")


def test_question_too_long_for_the_window(cli_pack):
    out, _ = cli_pack
    line = one_error_line(invoke("query", out, "word " * 5000, "--device", "cpu"), "shorten it")
    assert "4096" in line


# ----------------------------------------------------------------------------- option errors


@pytest.mark.parametrize("extra,needle", [
    (["--ratio", "0"], "--ratio"),
    (["--ratio", "1.5"], "--ratio"),
    (["--budget", "0"], "--budget"),
    (["--budget", "-3"], "--budget"),
    (["--chunk-size", "4"], "--chunk-size"),
    (["--sinks", "-1"], "--sinks"),
    (["--scorer", "nope"], "nope"),
    (["--dtype", "int3"], "int3"),
    (["--task", "nope"], "nope"),
    (["--task-file", "missing.toml"], "missing.toml"),
    (["--task", "qa", "--task-file", "x.toml"], "not both"),
    (["--chunk-size", "0"], "--chunk-size"),
], ids=["ratio-0", "ratio-1.5", "budget-0", "budget-neg", "chunk-4", "sinks-neg", "scorer", "dtype", "task",
        "task-file", "task-and-file", "chunk-0"])
def test_bad_options(build_args, tmp_path, extra, needle):
    one_error_line(invoke(*build_args(*extra)), needle)
    assert not (tmp_path / "out.kvpack").exists()


def test_output_path_that_is_a_directory(build_args, tmp_path, tiny_model_dir, tiny_corpus):
    target = tmp_path / "adir"
    target.mkdir()
    result = invoke("build", tiny_corpus, "-o", target, "--model", tiny_model_dir, "--device", "cpu", "--quiet")
    one_error_line(result, str(target))


def test_error_line_keeps_brackets_in_paths(cli_pack, tmp_path):
    out, _ = cli_pack
    bad = tmp_path / "notes[v2].kvpack"
    bad.write_bytes(out.read_bytes()[:100])
    one_error_line(invoke("inspect", bad), "notes[v2].kvpack")


# ----------------------------------------------------------------------------- real processes


def _run(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kvcompile.cli", *map(str, args)], check=False,
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=180)


def test_process_exit_code_and_stderr(cli_pack, tmp_path):
    out, _ = cli_pack
    bad = _flipped(out, tmp_path / "bad.kvpack", out.stat().st_size - 1)
    proc = _run("inspect", bad)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "checksum mismatch" in lines[0]


def test_debug_shows_a_traceback(cli_pack, tmp_path):
    out, _ = cli_pack
    bad = _flipped(out, tmp_path / "bad.kvpack", out.stat().st_size - 1)
    proc = _run("inspect", bad, "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "PackError" in proc.stderr and "checksum mismatch" in proc.stderr


def test_pack_built_by_the_cli_is_moved_not_copied(cli_pack, tmp_path):
    # inspect works on a copy in another directory: nothing in a pack refers to its location.
    out, _ = cli_pack
    moved = tmp_path / "moved.kvpack"
    shutil.copyfile(out, moved)
    result = invoke("inspect", moved, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["path"] == str(moved)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_a_cuda_device_where_there_is_none_is_one_clear_line(cli_pack, tiny_model_dir, tiny_corpus, tmp_path):
    out, _ = cli_pack
    one_error_line(invoke("query", out, "Where?", "--model", tiny_model_dir, "--device", "cuda"),
                   "CUDA is not available", "use 'cpu'")
    one_error_line(invoke("build", tiny_corpus, "-o", tmp_path / "x.kvpack", "--model", tiny_model_dir,
                          "--device", "cuda", "--quiet"), "CUDA is not available")
