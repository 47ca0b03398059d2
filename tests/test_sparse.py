"""Sparse decode (issue 15, RocketKV's hybrid sparse attention): page summaries, approximate
scores, the choice of rows, and the identity with exact attention when every row is chosen."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import kvcompile
from kvcompile.cli import app
from kvcompile.errors import OptionError
from kvcompile.ragged import RaggedKV
from kvcompile.sparse import (
    PageSummary,
    Sparse,
    attend,
    choose_rows,
    gathered_attention,
    page_logits,
    query_channels,
    stage_two,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def ragged(lengths, head_dim=16, seed=0) -> RaggedKV:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    return RaggedKV.from_rows(torch.randn(n, head_dim, generator=g), torch.randn(n, head_dim, generator=g),
                              torch.arange(n), lengths)


def dense_attention(query, kv: RaggedKV, keys, values, scaling):
    """Every prefix row of a head, then the causal new tokens: ``[B, q_len, Hq, D]``, one head at a time."""
    b, hq, q_len, d = query.shape
    h, t = keys.shape[1], keys.shape[2]
    out = torch.empty(b, q_len, hq, d)
    for qh in range(hq):
        kh = qh // (hq // h)
        lo, hi = kv.offsets[kh], kv.offsets[kh + 1]
        for i in range(q_len):
            k = torch.cat([kv.keys[lo:hi], keys[0, kh, : t - q_len + i + 1]])
            v = torch.cat([kv.values[lo:hi], values[0, kh, : t - q_len + i + 1]])
            out[0, i, qh] = torch.softmax(query[0, qh, i] @ k.T * scaling, -1) @ v
    return out


def test_the_budget_split_is_the_papers():
    # c = 64: stage 1 removes 64 ** 0.56 = 10.3x, stage 2 the remaining 6.2x.
    assert stage_two(64 ** -0.56) == pytest.approx(64 / 64 ** 0.56)
    assert stage_two(1.0) == 1.0
    assert stage_two(2.0 ** -12) == pytest.approx(2.0 ** (12 / 0.8 - 12))  # alpha capped at 0.8
    sparse = Sparse.auto(0.25, 64)  # c = 20.3, stage 2 = 5.07
    c2 = stage_two(0.25)
    assert c2 == pytest.approx(5.07, abs=0.01)
    assert sparse == Sparse(1 / (2 * c2), 3, math.ceil(3 * 64 / (2 * c2)))
    assert Sparse.auto(0.25, 64, top_k=128, page=8).top_k == 128 and Sparse.auto(0.25, 64, page=8).page == 8
    for bad, match in [(dict(top_k=1.5), "share"), (dict(page=0), "page"), (dict(channels=65), "channels")]:
        with pytest.raises(OptionError, match=match):
            Sparse.auto(0.25, 64, **bad)


def test_page_summaries_bound_every_row_of_their_page():
    kv = ragged((11, 0, 8))
    summary = PageSummary.of(kv, Sparse(0.5, 4, 16))
    assert summary.pages == (3, 0, 2) and summary.page_offsets.tolist() == [0, 3, 3, 5]
    assert summary.take.tolist() == [2, 0, 1]  # ceil(ceil(0.5 * n) / 4) pages
    for h, (n, first) in enumerate([(11, 0), (0, 11), (8, 11)]):
        for j in range(n):
            page = summary.page_offsets[h] + j // 4
            lo, hi = summary.bounds[page, :16], summary.bounds[page, 16:]
            assert (lo <= kv.keys[first + j]).all() and (kv.keys[first + j] <= hi).all()
    assert summary.log_counts.exp().round().tolist() == [[4, 4, 3], [1, 1, 1], [4, 4, 1]]  # 1: no page


def test_with_pages_of_one_row_and_every_channel_the_logits_are_the_attention_logits():
    kv = ragged((7, 5))
    summary = PageSummary.of(kv, Sparse(1.0, 1, 16))
    query = torch.randn(1, 4, 1, 16)
    columns, inv_temp = query_channels(query, 2, 16)
    assert inv_temp == pytest.approx(torch.full((1, 4), 16 ** -0.5))  # all of |q| kept: the plain 1/sqrt(D)
    logits = page_logits(query, summary.bounds, summary.page_offsets, columns, inv_temp, 7)
    for qh in range(4):
        h = qh // 2
        keys = kv.keys[kv.offsets[h] : kv.offsets[h + 1]]
        want = keys @ query[0, qh, 0] / 4
        torch.testing.assert_close(logits[0, qh, : len(keys)], want)
        assert (logits[0, qh, len(keys):] == -math.inf).all()


def test_page_logits_bound_the_scores_of_a_lone_query_head():
    kv = ragged((40,), seed=3)
    summary = PageSummary.of(kv, Sparse(1.0, 5, 16))
    query = torch.randn(1, 1, 1, 16)
    columns, inv_temp = query_channels(query, 1, 6)
    logits = page_logits(query, summary.bounds, summary.page_offsets, columns, inv_temp, 8)[0, 0] / inv_temp[0, 0]
    channels = columns[0, 0].long() % 16
    assert set(channels.tolist()) == set(query[0, 0, 0].abs().topk(6).indices.tolist())
    partial = kv.keys[:, channels] @ query[0, 0, 0, channels]  # each row's score on the chosen channels
    assert (logits.repeat_interleave(5) >= partial - 1e-5).all()


def test_each_head_keeps_its_best_pages_in_row_order():
    kv = ragged((30, 9, 0), seed=1)
    query = torch.randn(1, 6, 1, 16)
    # Plant one key that every query of head 0's group aligns with: its page must be chosen.
    keys = kv.keys.clone()
    keys[17] = 50 * query[0, :2, 0].sum(0)
    kv = kv.replace(keys=keys)
    summary = PageSummary.of(kv, Sparse(8, 4, 16))  # 8 rows -> 2 pages a head
    columns, inv_temp = query_channels(query, 3, 8)
    rows = choose_rows(page_logits(query, summary.bounds, summary.page_offsets, columns, inv_temp, 8), summary)
    assert rows.shape == (1, 3, 8)
    head0, head1, head2 = (r[r >= 0].tolist() for r in rows[0])
    assert 17 in head0 and len(head0) == 8 and head0 == sorted(head0) and all(0 <= r < 30 for r in head0)
    assert len(head1) == 8 and all(30 <= r < 39 for r in head1) and head1 == sorted(head1)
    assert head2 == []
    assert summary.rows_read() == 16


@pytest.mark.parametrize("lengths", [(13, 0, 6), (1, 40, 22)])
def test_choosing_every_row_is_exact_attention(lengths):
    kv = ragged(lengths, seed=2)
    query, keys, values = torch.randn(1, 6, 1, 16), torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16)
    summary = PageSummary.of(kv, Sparse(1.0, 3, 5))
    out = attend(query, kv, summary, keys, values, 0.25)
    torch.testing.assert_close(out, dense_attention(query, kv, keys, values, 0.25))
    rows = torch.full((1, 3, 2), -1)  # no prefix row at all: only the new tokens
    torch.testing.assert_close(gathered_attention(query, kv.keys, kv.values, rows, keys, values, 0.25),
                               dense_attention(query, ragged((0, 0, 0)), keys, values, 0.25))


@pytest.fixture(scope="module")
def pack(tiny_pack):
    return kvcompile.load(tiny_pack)


def test_a_session_that_chooses_every_row_answers_as_the_dense_one(tiny_lm, pack):
    question = "Where do orders ship from?"
    dense = pack.session(tiny_lm)
    every = pack.session(tiny_lm).sparsify(top_k=1.0, page=4, channels=8)
    assert every.answer_nll(question, "Rotterdam") == pytest.approx(dense.answer_nll(question, "Rotterdam"), abs=1e-4)
    timings: dict = {}
    assert list(every.stream(question, 6, timings)) == list(dense.stream(question, 6))
    report = pack.session(tiny_lm).sparsify(top_k=0.25, page=4).sparse_report()
    assert report["rows_per_step"] < 0.4 * report["prefix_rows"]
    assert report["bytes_per_step"] < 0.5 * report["dense_bytes_per_step"]
    sparse = pack.session(tiny_lm).sparsify()
    assert sparse.sparse == Sparse.auto(pack.kept_ratio(), tiny_lm.capability.head_dim)
    assert math.isfinite(sparse.answer_nll(question, "Rotterdam"))


def test_models_with_sliding_windows_are_refused(tiny_lm, pack, monkeypatch):
    from dataclasses import replace

    session = pack.session(tiny_lm)
    monkeypatch.setitem(vars(tiny_lm), "capability", replace(tiny_lm.capability, windows=(4,) * 2))
    with pytest.raises(OptionError, match="--sparse does not support.*sliding windows"):
        session.sparsify()


def test_cli_query_and_eval_sparse(pack, tiny_corpus, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["query", str(pack.path), "Where do orders ship from?", "--sparse", "0.25",
                                 "--sparse-page", "4", "--json", "-n", "3"])
    assert result.exit_code == 0, result.output
    sparse = json.loads(result.stdout)["sparse"]
    assert sparse["top_k"] == 0.25 and sparse["page"] == 4 and sparse["rows_per_step"] < sparse["prefix_rows"]
    for args, match in [(["--sparse", "lots"], "--sparse takes auto"), (["--sparse-page", "4"], "need --sparse"),
                        (["--sparse", "0.5", "--sparse-channels", "999"], "--sparse-channels must be")]:
        result = runner.invoke(app, ["query", str(pack.path), "Where?", *args])
        assert result.exit_code != 0 and match in result.stderr, result.output
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Where do orders ship from?", "answers": ["Rotterdam"]}) + "\n")
    result = runner.invoke(app, ["eval", str(pack.path), "--qa", str(qa), "--corpus", str(tiny_corpus),
                                 "--sparse", "auto", "--baselines", "", "--max-new-tokens", "3", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    names = [m["name"] for m in json.loads(result.stdout)["methods"]]
    assert any(n.startswith("kvcompile[sparse]@") for n in names) and any(n.startswith("kvcompile@") for n in names)


def test_a_quantised_pack_decodes_sparsely_from_its_decoded_rows(tiny_lm, tiny_corpus, tmp_path):
    from kvcompile.builder import BuildOptions
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    path = tmp_path / "int4.kvpack"
    build([tiny_corpus], path, tiny_lm, load_recipe("qa"), BuildOptions(ratio=0.5, chunk_size=64, quant="int4"))
    pack = kvcompile.load(path)
    question = "How long is the password reset link valid?"
    dense = pack.session(tiny_lm).answer_nll(question, "24 hours")
    every = pack.session(tiny_lm).sparsify(top_k=1.0).answer_nll(question, "24 hours")
    assert every == pytest.approx(dense, abs=1e-4)
