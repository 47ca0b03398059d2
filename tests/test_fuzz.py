"""The pack fuzzer (tests/packfuzz.py), seeded and bounded, as part of ``make test``.

It runs in a child process: every case forks from it, so that a hang can be killed and a
case's memory measured on its own. ``make fuzz`` runs the same test for longer, with
KVCOMPILE_FUZZ_CASES, KVCOMPILE_FUZZ_BUDGET (seconds) and KVCOMPILE_FUZZ_SEED.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = {"bytes", "table", "header", "manifest", "positions", "rebuild"}


def test_mutated_packs_load_inspect_query_and_rebuild_safely(tiny_pack, tiny_corpus, tiny_model_dir, tmp_path):
    out = tmp_path / "fuzz.json"
    env = os.environ.get
    budget = env("KVCOMPILE_FUZZ_BUDGET", "40")
    proc = subprocess.run(
        [sys.executable, str(HERE / "packfuzz.py"), "--pack", str(tiny_pack), "--corpus", str(tiny_corpus),
         "--model", str(tiny_model_dir), "--cases", env("KVCOMPILE_FUZZ_CASES", "400"), "--budget", budget,
         "--seed", env("KVCOMPILE_FUZZ_SEED", "2026"), "--case-timeout", "10", "--json", str(out)],
        capture_output=True, text=True, timeout=float(budget) + 260, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.exists(), proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["failures"] == [], json.dumps(summary["failures"], indent=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["cases"] >= 100, summary
    assert set(summary["families"]) == FAMILIES, summary["families"]
    assert summary["outcomes"].get("refused", 0) > 0 and summary["outcomes"].get("accepted", 0) > 0
