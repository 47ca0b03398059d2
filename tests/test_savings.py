"""Real savings: a pack at ratio r takes r of the fp16 full cache, plus its header."""

from __future__ import annotations

import pytest

import kvcompile
from kvcompile.builder import BuildOptions
from kvcompile.pipeline import build
from kvcompile.recipe import load_recipe


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_pack_bytes_follow_ratio(tiny_lm, tiny_corpus, tmp_path, ratio):
    path = tmp_path / "p.kvpack"
    report = build([tiny_corpus], path, tiny_lm, load_recipe("qa"), BuildOptions(ratio=ratio, chunk_size=128))
    sizes = kvcompile.load(path).sizes()
    assert sizes["file"] == path.stat().st_size == report.bytes
    payload = sizes["file"] - sizes["header"] - sizes["index"]  # the segment index is word counts, not KV
    # The framing is kept whole, and `ratio` of every document.
    pack = kvcompile.load(path)
    total, corpus = pack.layout["tokens"], pack.header["corpus"]["tokens"]
    expected = (ratio * corpus + (total - corpus)) / total * sizes["full_fp16"]
    assert abs(payload - expected) <= 0.05 * expected
    # Every layer keeps its budget; heads differ (per-head budgets), nothing is padded.
    kept = pack.kept
    per_layer = {sum(row) for row in kept}
    assert len(per_layer) == 1
    assert sizes["keys"] == sizes["values"] == sum(map(sum, kept)) * pack.model["head_dim"] * 2
