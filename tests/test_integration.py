"""The README's demo, end to end, through the CLI with the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def kvcompile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcompile.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_build_query_inspect_example_corpus(tmp_path, kvcompile_cache):
    pack = tmp_path / "faq.kvpack"
    corpus = str(REPO / "docs" / "example-corpus")
    built = kvcompile("build", corpus, "--task", "faq", "-o", str(pack), "--ratio", "0.25")
    assert built.returncode == 0, built.stderr
    assert "wrote" in built.stderr and "skipped" in built.stderr  # questions.jsonl has no text field

    info = json.loads(kvcompile("inspect", str(pack), "--json").stdout)
    assert info["model"]["name"] == "smollm2-135m"
    assert {d["path"] for d in info["documents"]} >= {"account-security.md", "faq.html", "release-notes.txt"}
    assert info["kept_share"] == pytest.approx(0.25, abs=0.01)
    assert info["bytes"]["file"] < 0.27 * info["bytes"]["full_fp16"] + info["bytes"]["header"]

    answered = kvcompile("query", str(pack), "How do I reset my password?", "--json", "--max-new-tokens", "24")
    assert answered.returncode == 0, answered.stderr
    out = json.loads(answered.stdout)
    assert out["answer"].strip()
    assert out["timings"]["ttft_s"] > 0 and out["timings"]["tokens"] > 0
