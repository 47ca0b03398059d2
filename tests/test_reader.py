"""Reading packs: the reader needs no compiler, and a pack written by the previous
release (format 1.0, tests/data/tiny-v1.0.kvpack) still loads, verifies and answers.

The legacy pack was built from ``conftest.TINY_CORPUS`` (the ``tiny_corpus`` fixture)
with the ``tiny_model_dir`` model and ``BuildOptions(ratio=0.5, chunk_size=64)``, recipe
"qa": exactly the ``tiny_pack`` fixture, so a fresh build must agree with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kvcompile

pytestmark = pytest.mark.usefixtures("torch_single_thread")

REPO = Path(__file__).resolve().parent.parent
LEGACY = Path(__file__).resolve().parent / "data" / "tiny-v1.0.kvpack"
COMPILER = ["kvcompile.builder", "kvcompile.pipeline", "kvcompile.scorers", "kvcompile.selection",
            "kvcompile.writer", "kvcompile.rebuild", "kvcompile.corpus", "kvcompile.evaluation"]

# ----------------------------------------------------------------------------- no compiler in the reader

_READER = textwrap.dedent("""
    import contextlib, io, json, sys
    import kvcompile

    pack_path, model_dir = sys.argv[1], sys.argv[2]
    compiler = json.loads(sys.argv[3])
    loaded = lambda: sorted(m for m in compiler if m in sys.modules)
    result = {}

    p = kvcompile.load(pack_path)
    layer = p.layer(0)
    result["rows"] = layer.rows
    result["documents"] = len(p.manifest())
    result["after_load"] = loaded()

    from kvcompile.cli import app
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        app(["inspect", pack_path], standalone_mode=False)
    result["inspect"] = out.getvalue()
    result["after_inspect"] = loaded()

    session = p.session(model_dir)
    logits = session.first_token_logits("Where do orders ship from?")
    result["finite"] = bool(logits.isfinite().all())
    result["answer"] = session.ask("Where do orders ship from?", max_new_tokens=3).tokens
    result["after_query"] = loaded()
    print("RESULT" + json.dumps(result))
""")


def test_the_reader_imports_no_compiler(tiny_pack, tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-c", _READER, str(tiny_pack), str(tiny_model_dir), json.dumps(COMPILER)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"},  # wide: inspect's lines unwrapped
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["rows"] == sum(kvcompile.load(tiny_pack).kept[0]) and result["documents"] == 5
    assert "kvpack 1.5" in result["inspect"]
    assert result["finite"] and result["answer"] >= 0
    assert result["after_load"] == result["after_inspect"] == result["after_query"] == []


# ----------------------------------------------------------------------------- a pack of the previous release


@pytest.fixture(scope="module")
def legacy():
    return kvcompile.load(LEGACY)  # verify=True: every checksum


def legacy_options():
    """The options the legacy pack was built with: 1.0's defaults, spelled out since they moved."""
    from kvcompile.builder import BuildOptions

    return BuildOptions(ratio=0.5, chunk_size=64, context="chained", budgets="document", head_floor=0.2,
                        scorer_params={"pool": 41})


@pytest.fixture(scope="module")
def fresh(tiny_corpus, tiny_lm, tmp_path_factory):
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    path = tmp_path_factory.mktemp("fresh") / "fresh.kvpack"
    build([tiny_corpus], path, tiny_lm, load_recipe("qa"), legacy_options())
    return kvcompile.load(path)


def test_legacy_pack_loads_and_matches_a_fresh_build(legacy, fresh):
    assert tuple(legacy.header["version"]) == (1, 0)
    assert legacy.model["fingerprint"] == fresh.model["fingerprint"]
    assert legacy.kept == fresh.kept
    # Same content keys, so reusable; 1.1 adds each segment's budget.
    unbudgeted = [{k: v for k, v in s.items() if k != "budget"} for s in fresh.header["segments"]]
    assert legacy.header["segments"] == unbudgeted
    assert legacy.manifest() == fresh.manifest()
    assert len(legacy.positions) == len(fresh.positions)
    for li in range(len(legacy.kept)):
        assert torch.equal(legacy.positions[li], fresh.positions[li])
        a, b = legacy.layer(li), fresh.layer(li)
        assert a.lengths == b.lengths == tuple(legacy.kept[li])
        assert torch.equal(a.positions, b.positions) and torch.equal(a.offsets, b.offsets)
        assert a.keys.dtype == b.keys.dtype == torch.float16
        # The same selection; the rows agree within fp16 rounding.
        torch.testing.assert_close(a.keys.float(), b.keys.float(), atol=1e-3, rtol=0)
        torch.testing.assert_close(a.values.float(), b.values.float(), atol=1e-3, rtol=0)


def test_legacy_pack_answers_like_a_fresh_one(legacy, fresh, tiny_lm):
    old, new = legacy.session(tiny_lm), fresh.session(tiny_lm)
    assert [kv.lengths for kv in old.kv] == [tuple(k) for k in legacy.kept]
    for q in ("Where do orders ship from?", "When was the company founded?"):
        a, b = old.first_token_logits(q), new.first_token_logits(q)
        assert bool(a.isfinite().all())
        assert (a - b).abs().max() <= 1e-3
    answer = old.ask("Where do orders ship from?", max_new_tokens=4)
    assert answer.tokens >= 0 and isinstance(answer.text, str)


def test_legacy_pack_segments_are_reused_by_a_rebuild(tiny_corpus, tiny_lm, tmp_path, legacy):
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    out = tmp_path / "rebuilt.kvpack"
    report = build([tiny_corpus], out, tiny_lm, load_recipe("qa"), legacy_options(), reuse=LEGACY)
    assert report.plan.counts()["reused"] == 5
    rebuilt = kvcompile.load(out)
    assert rebuilt.kept == legacy.kept
    n_prefix = legacy.layout["tokens"] - legacy.header["corpus"]["tokens"]
    for li in range(len(legacy.kept)):
        a, b = rebuilt.layer(li), legacy.layer(li)
        assert torch.equal(a.positions, b.positions)
        # The documents' rows are copied from the legacy pack (only the framing is recomputed).
        docs = a.positions >= n_prefix
        assert torch.equal(a.keys[docs], b.keys[docs]) and torch.equal(a.values[docs], b.values[docs])
