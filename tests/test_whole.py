"""``--context whole``: one prefill of the whole corpus, one selection, cut into segments."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from kvcompile import builder
from kvcompile.builder import BuildOptions, _Compiler, tokenize
from kvcompile.cli import app
from kvcompile.corpus import read_corpus
from kvcompile.errors import OptionError
from kvcompile.pack import load
from kvcompile.pipeline import build
from kvcompile.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("torch_single_thread")
QA = load_recipe("qa")


def whole(ratio: float, budgets: str = "document") -> BuildOptions:
    return BuildOptions(ratio=ratio, chunk_size=48, context="whole", budgets=budgets)


def rows_by_place(pack, li: int) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Layer ``li``'s rows keyed by (KV head, position): (pre-RoPE key, value)."""
    kv = pack.layer(li)
    heads = kv.head_ids().tolist()
    return {(h, p): (k, v) for h, p, k, v in zip(heads, kv.positions.tolist(), kv.keys, kv.values)}


def test_every_token_kept_is_the_chained_pack(tiny_lm, tiny_corpus, tmp_path):
    """At ratio 1 no row was computed against a compressed context, so one reading of the
    corpus gives the rows that compiling each document after all the earlier ones gives."""
    build([tiny_corpus], tmp_path / "w.kvpack", tiny_lm, QA, whole(1.0))
    build([tiny_corpus], tmp_path / "c.kvpack", tiny_lm, QA, BuildOptions(ratio=1.0, chunk_size=48))
    w, c = load(tmp_path / "w.kvpack"), load(tmp_path / "c.kvpack")
    assert w.header["options"]["context"] == "whole"
    for li in range(tiny_lm.capability.num_layers):
        a, b = w.layer(li), c.layer(li)
        assert a.lengths == b.lengths and torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.keys, b.keys, atol=2e-3, rtol=2e-3)  # fp16 storage, other chunk cuts
        torch.testing.assert_close(a.values, b.values, atol=2e-3, rtol=2e-3)


def test_kept_rows_do_not_depend_on_what_else_is_kept(tiny_lm, tiny_corpus, tmp_path):
    """Unlike a chained build, the rows a whole build keeps are the full context's rows."""
    build([tiny_corpus], tmp_path / "all.kvpack", tiny_lm, QA, whole(1.0))
    build([tiny_corpus], tmp_path / "some.kvpack", tiny_lm, QA, whole(0.3))
    full, some = load(tmp_path / "all.kvpack"), load(tmp_path / "some.kvpack")
    for li in range(tiny_lm.capability.num_layers):
        every, kept = rows_by_place(full, li), rows_by_place(some, li)
        assert len(kept) < len(every)
        for place, (k, v) in kept.items():
            assert torch.equal(k, every[place][0]) and torch.equal(v, every[place][1])


def test_corpus_budgets_are_the_survey_selection_itself(tiny_lm, tiny_corpus, tmp_path):
    """Under ``whole`` one corpus-wide selection keeps the budget: the survey's, with no survey prefill."""
    options = whole(0.3, "corpus")
    documents, _ = read_corpus([tiny_corpus])
    tk = tokenize(documents, QA, tiny_lm)
    compiler = _Compiler(tk, options, tiny_lm)
    with builder.pack_attention(tiny_lm.model):
        surveyed = compiler.survey(tk, compiler.framing(tk)[1], 0.3)
    report = build([tiny_corpus], tmp_path / "w.kvpack", tiny_lm, QA, options)
    assert report.seconds["survey"] == 0
    pack = load(tmp_path / "w.kvpack")
    cap = tiny_lm.capability
    n_prefix = pack.layout["tokens"] - tk.corpus_tokens
    kept = [0] * len(documents)
    for positions in pack.positions:
        for d, seg in enumerate(pack.header["segments"]):
            lo, hi = (n_prefix + t for t in seg["tokens"])
            kept[d] += int(((positions >= lo) & (positions < hi)).sum())
        assert int((positions >= n_prefix).sum()) == cap.num_kv_heads * round(0.3 * tk.corpus_tokens)
    assert kept == surveyed
    per_head = cap.num_layers * cap.num_kv_heads
    assert [s["budget"] for s in pack.header["segments"]] == [round(k / per_head) for k in surveyed]


def test_document_budgets_hold_per_document(tiny_lm, tiny_corpus, tmp_path):
    build([tiny_corpus], tmp_path / "w.kvpack", tiny_lm, QA, whole(0.3))
    pack = load(tmp_path / "w.kvpack")
    kv_heads, n_prefix = tiny_lm.capability.num_kv_heads, pack.layout["tokens"] - pack.header["corpus"]["tokens"]
    for positions in pack.positions:
        for seg in pack.header["segments"][1:]:  # the first holds the sinks, kept beyond its budget
            lo, hi = (n_prefix + t for t in seg["tokens"])
            assert int(((positions >= lo) & (positions < hi)).sum()) == kv_heads * min(seg["budget"], hi - lo)


def test_an_edit_recompiles_every_document_and_an_unchanged_corpus_none(tiny_lm, tiny_corpus, tmp_path, monkeypatch):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    pack = tmp_path / "w.kvpack"
    build([corpus], pack, tiny_lm, QA, whole(0.4))
    with monkeypatch.context() as m:
        m.setattr(_Compiler, "read_corpus", lambda *a, **k: pytest.fail("an unchanged corpus is not read again"))
        same = build([corpus], pack, tiny_lm, QA, whole(0.4))
    assert same.plan.up_to_date
    first = sorted(corpus.iterdir())[0]
    first.write_text("The lighthouse keeper moved to the harbour.", encoding="utf-8")
    again = build([corpus], pack, tiny_lm, QA, whole(0.4))
    assert all(status != "reused" for _, status in again.plan.status())
    build([corpus], tmp_path / "clean.kvpack", tiny_lm, QA, whole(0.4))
    assert pack.read_bytes() == (tmp_path / "clean.kvpack").read_bytes()


def test_whole_is_refused_where_it_cannot_work(tiny_model_dir, tiny_corpus, tmp_path):
    result = CliRunner().invoke(app, ["build", str(tiny_corpus), "-o", str(tmp_path / "s.kvpack"), "--model",
                                      str(tiny_model_dir), "--context", "whole", "--stream", "--ratio", "0.1"])
    assert result.exit_code != 0
    assert "--context whole reads the whole corpus in one prefill" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s.kvpack").exists()
    with pytest.raises(OptionError, match="--context must be one of auto, independent, chained, whole"):
        BuildOptions(context="entire").validate()


def test_cli_builds_and_answers_from_a_whole_pack(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "w.kvpack"
    runner = CliRunner()
    result = runner.invoke(app, ["build", str(tiny_corpus), "-o", str(out), "--model", str(tiny_model_dir),
                                 "--context", "whole", "--ratio", "0.5", "--chunk-size", "64"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and "whole" in result.output, result.output
    result = runner.invoke(app, ["query", str(out), "Who keeps the lamp?", "--model", str(tiny_model_dir),
                                 "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output


def test_auto_reads_whole_what_fits_and_chains_what_does_not():
    fits, too_long = BuildOptions().resolved(True), BuildOptions().resolved(False)
    assert (fits.context, fits.budgets, fits.stream) == ("whole", "corpus", False)
    assert (too_long.context, too_long.budgets, too_long.stream, too_long.stream_scorer) == (
        "chained", "corpus", True, "lagkv")  # LagKV streams, then one selection: documents compete
    alone = BuildOptions(stream_scorer="none").resolved(False)
    assert (alone.budgets, alone.stream_scorer) == ("document", None)
    assert BuildOptions(scorer="lagkv").resolved(False).stream_scorer is None  # no task prompt to select with
    assert fits.stream_scorer is None
    mine = BuildOptions(context="independent", budgets="corpus", stream=False).resolved(True)
    assert (mine.context, mine.budgets, mine.stream) == ("independent", "corpus", False)
    assert BuildOptions(context="whole", budgets="document").resolved(True).budgets == "document"
    assert fits.resolved(False) == fits  # explicit choices stand
