"""Budgets shared among documents: the grid, the corpus-wide survey, and cheap rebuilds."""

from __future__ import annotations

import random

import pytest
import torch
from typer.testing import CliRunner

from kvcompile import builder
from kvcompile.budgets import EXACT_BELOW, GRID_STEP, corpus_budgets, document_budgets, quantize
from kvcompile.builder import BuildOptions, _Compiler, tokenize
from kvcompile.cli import app
from kvcompile.corpus import read_corpus
from kvcompile.pack import load
from kvcompile.pipeline import build
from kvcompile.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()
QA = load_recipe("qa")


def test_the_grid_is_monotone_exact_when_small_and_never_off_by_more_than_half_a_step():
    values = [quantize(x / 4) for x in range(1, 400_000)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert [quantize(x) for x in range(1, EXACT_BELOW)] == list(range(1, EXACT_BELOW))
    half_step = GRID_STEP**0.5
    for x in (16.0, 17.3, 100.0, 1234.5, 65_000.0):
        assert x / half_step - 1 <= quantize(x) <= x * half_step + 1
    assert len({quantize(x) for x in range(1000, 1060)}) <= 2  # a 6% nudge moves a budget at most one step


def test_corpus_budgets_sum_to_the_target_keep_the_floor_and_fit_their_documents():
    rng = random.Random(0)
    lengths = [rng.randint(50, 3000) for _ in range(200)]
    kept = [rng.random() ** 3 * n for n in lengths]  # a few documents matter much more than the rest
    ratio, floor = 0.25, 0.2
    budgets = corpus_budgets(kept, lengths, ratio, floor)
    target = ratio * sum(lengths)
    assert abs(sum(budgets) - target) <= 0.02 * target
    assert all(quantize(floor * ratio * n) <= b <= n for b, n in zip(budgets, lengths))
    # a floor of 1 is the document policy (on the grid): nothing is left to compete for
    assert corpus_budgets(kept, lengths, ratio, 1.0) == [quantize(ratio * n) for n in lengths]
    # with nothing kept anywhere (no scores), budgets follow length
    assert corpus_budgets([0] * 3, [100, 200, 300], 0.5, 0.0) == [quantize(50), quantize(100), quantize(150)]
    with pytest.raises(ValueError):
        corpus_budgets(kept, lengths, ratio, 1.5)


def test_the_survey_keeps_the_whole_budget_and_segments_keep_their_own(tiny_lm, tiny_corpus, tmp_path):
    options = BuildOptions(ratio=0.3, chunk_size=32, context="chained", budgets="corpus")
    documents, _ = read_corpus([tiny_corpus])
    tk = tokenize(documents, QA, tiny_lm)
    compiler = _Compiler(tk, options.resolved(fits=True), tiny_lm)  # as the build resolves them
    with builder.pack_attention(tiny_lm.model):
        kept = compiler.survey(tk, compiler.framing(tk)[1], 0.3)
    cap = tiny_lm.capability
    assert sum(kept) == cap.num_layers * cap.num_kv_heads * round(0.3 * tk.corpus_tokens)
    assert len(kept) == len(documents)

    report = build([tiny_corpus], tmp_path / "c.kvpack", tiny_lm, QA, options)
    pack = load(tmp_path / "c.kvpack")
    budgets = [s["budget"] for s in pack.header["segments"]]
    assert budgets == corpus_budgets(kept, [len(ids) for ids in tk.doc_ids], 0.3, options.doc_floor)
    assert report.seconds["survey"] > 0
    assert pack.header["options"]["selection"]["budgets"] == "corpus"
    n_prefix = pack.layout["tokens"] - tk.corpus_tokens
    for positions in pack.positions:  # per layer [N]
        for d, seg in enumerate(pack.header["segments"][1:], start=1):  # the first holds the sinks
            lo, hi = (n_prefix + t for t in seg["tokens"])
            assert int(((positions >= lo) & (positions < hi)).sum()) == cap.num_kv_heads * min(budgets[d], hi - lo)


@pytest.fixture
def corpus30(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        text = f"Document {i}. The keeper of lamp {i} lives in town {i * 7}. " * (1 + i % 4)
        (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return root


def corpus_options(context: str = "independent") -> BuildOptions:
    return BuildOptions(ratio=0.5, chunk_size=64, context=context, budgets="corpus")


def test_an_edit_recompiles_that_document_and_those_whose_budget_moved(tiny_lm, corpus30, tmp_path, monkeypatch):
    pack = tmp_path / "p.kvpack"
    build([corpus30], pack, tiny_lm, QA, corpus_options())
    before = [s["budget"] for s in load(pack).header["segments"]]

    def no_survey(*args, **kwargs):
        raise AssertionError("an unchanged corpus needs no survey")

    with monkeypatch.context() as m:
        m.setattr(_Compiler, "survey", no_survey)
        same = build([corpus30], pack, tiny_lm, QA, corpus_options())
    assert same.plan.up_to_date and same.seconds["survey"] == 0

    (corpus30 / "doc17.txt").write_text("Document 17 was rewritten: the lamp moved to town 3, by the river.",
                                        encoding="utf-8")
    again = build([corpus30], pack, tiny_lm, QA, corpus_options())
    after = [s["budget"] for s in load(pack).header["segments"]]
    moved = {i for i, (a, b) in enumerate(zip(before, after)) if a != b} - {17}
    assert len(moved) < 29  # the grid holds most budgets still
    recompiled = {i for i, (_, status) in enumerate(again.plan.status()) if status != "reused"}
    assert recompiled == moved | {17}
    clean = tmp_path / "clean.kvpack"
    build([corpus30], clean, tiny_lm, QA, corpus_options())
    assert pack.read_bytes() == clean.read_bytes()


def test_check_knows_an_unchanged_corpus_without_weights_and_warns_after_an_edit(tiny_lm, tiny_model_dir, corpus30,
                                                                                 tmp_path):
    pack = tmp_path / "p.kvpack"
    build([corpus30], pack, tiny_lm, QA, corpus_options("chained"))
    args = ["build", str(corpus30), "-o", str(pack), "--model", str(tiny_model_dir), "--budgets", "corpus",
            "--context", "chained", "--ratio", "0.5", "--chunk-size", "64", "--check"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "budgets are shared" not in result.output
    (corpus30 / "doc05.txt").write_text("Document 5, edited.", encoding="utf-8")
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "budgets are shared by the whole corpus" in result.output


def test_a_bad_policy_is_one_clear_line(tiny_corpus, tmp_path):
    result = runner.invoke(app, ["build", str(tiny_corpus), "-o", str(tmp_path / "x.kvpack"), "--budgets", "global"])
    assert result.exit_code != 0
    assert "--budgets must be one of auto, document, corpus" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(Exception, match="document floor"):
        BuildOptions(doc_floor=2.0).validate()


def test_document_budgets_are_what_the_builder_always_kept():
    assert document_budgets([10, 1, 333], 0.25) == [max(1, round(0.25 * n)) for n in (10, 1, 333)]
    assert torch.tensor(document_budgets([4], 0.1)).item() == 1
