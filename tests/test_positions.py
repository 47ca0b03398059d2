"""Compacted positions (issue 14, part 1): kept keys at contiguous positions in corpus order,
chosen when a pack is loaded (``--positions``)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kvcompile
from kvcompile.builder import BuildOptions
from kvcompile.cli import app
from kvcompile.encoded import EncodedKV
from kvcompile.errors import OptionError
from kvcompile.models import load_model, make_tiny_model
from kvcompile.pipeline import build
from kvcompile.recipe import load_recipe
from kvcompile.rope import rotaries

pytestmark = pytest.mark.usefixtures("torch_single_thread")
QUESTION = "How long is the password reset link valid?"


def test_compact_positions_are_each_kept_tokens_rank_within_its_head(tiny_pack):
    pack = kvcompile.load(tiny_pack)
    at, start = pack.attended_positions("compact")
    assert start == max(max(k) for k in pack.kept) < pack.question_position  # ratio 0.5: shorter than the corpus
    for stored, compact, kept in zip(pack.positions, at, pack.kept):
        heads = torch.split(stored, list(kept))
        assert compact.tolist() == [i for head in heads for i in range(len(head))]
        assert all(bool((h.diff() > 0).all()) for h in heads)  # ranks follow corpus order
    assert pack.attended_positions("original") == (pack.positions, pack.question_position)
    assert pack.attended_positions("auto") == pack.attended_positions("compact")  # the default for RoPE models


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_keys_are_rotated_to_their_compact_positions(tiny_lm, tiny_corpus, tmp_path, quant):
    path = tmp_path / "p.kvpack"
    build([tiny_corpus], path, tiny_lm, load_recipe("qa"),
          BuildOptions(ratio=0.5, chunk_size=64, codec="fp32", quant=quant, quant_group=8))
    pack = kvcompile.load(path)
    session = pack.session(tiny_lm, positions="compact")
    at, start = pack.attended_positions("compact")
    assert session.start == start and session.cache().get_seq_length() == start
    rotary = rotaries(tiny_lm.model)[0]
    for li, placed in enumerate(session.kv):
        stored = pack.layer(li)
        if isinstance(placed, EncodedKV):
            placed = placed.materialise()
        torch.testing.assert_close(placed.positions, at[li])
        torch.testing.assert_close(placed.keys, rotary.apply(stored.keys, at[li]), atol=1e-5, rtol=1e-5)
    # moving the keys changes the answer (the question now follows the kept tokens)
    original = pack.session(tiny_lm, positions="original").first_token_logits(QUESTION)
    assert (session.first_token_logits(QUESTION) - original).abs().max() > 1e-4


def test_with_every_token_kept_compact_is_original(tiny_lm, tiny_corpus, tmp_path):
    path = tmp_path / "p.kvpack"
    build([tiny_corpus], path, tiny_lm, load_recipe("qa"), BuildOptions(ratio=1.0, chunk_size=64, codec="fp32"))
    pack = kvcompile.load(path)
    assert pack.attended_positions("compact")[1] == pack.question_position
    torch.testing.assert_close(pack.session(tiny_lm, positions="compact").first_token_logits(QUESTION),
                               pack.session(tiny_lm, positions="original").first_token_logits(QUESTION),
                               atol=0, rtol=0)


def test_a_window_counts_from_the_compacted_question(tiny_corpus, tmp_path):
    """Sliding-window layers drop at load the rows no question can see, counted from where the
    question starts, at the positions the keys are attended at."""
    lm = load_model(str(make_tiny_model(tmp_path / "m", arch="mistral", sliding_window=48)), device="cpu",
                    progress=False)
    path = tmp_path / "p.kvpack"
    build([tiny_corpus], path, lm, load_recipe("qa"), BuildOptions(ratio=0.5, chunk_size=64, codec="fp32"))
    pack = kvcompile.load(path)
    original, compact = (pack.session(lm, positions=m) for m in ("original", "compact"))
    at, start = pack.attended_positions("compact")
    assert compact.kv[0].rows == int((at[0] > start - 48).sum()) > 0
    assert original.kv[0].rows == int((pack.positions[0] > pack.question_position - 48).sum())
    assert int(compact.kv[0].positions.max()) < start < pack.question_position
    assert torch.isfinite(compact.first_token_logits(QUESTION)).all()


def test_an_unknown_mode_is_refused(tiny_pack, tiny_lm):
    with pytest.raises(OptionError, match="positions must be one of auto, original, compact"):
        kvcompile.load(tiny_pack).session(tiny_lm, positions="dense")


def test_cli_query_and_eval_take_positions(tiny_model_dir, tiny_pack, tiny_corpus, tmp_path):
    runner = CliRunner()
    answered = runner.invoke(app, ["query", str(tiny_pack), QUESTION, "--positions", "compact", "-n", "2",
                                   "--model", str(tiny_model_dir), "--json"])
    assert answered.exit_code == 0, answered.output
    assert json.loads(answered.stdout)["timings"]["tokens"] >= 1
    refused = runner.invoke(app, ["query", str(tiny_pack), QUESTION, "--positions", "dense",
                                  "--model", str(tiny_model_dir)])
    assert refused.exit_code != 0 and "positions must be one of" in refused.stderr
    assert "Traceback" not in refused.output
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": QUESTION, "answers": ["24 hours"]}) + "\n")
    evaluated = runner.invoke(app, ["eval", str(tiny_pack), "--qa", str(qa), "--corpus", str(tiny_corpus),
                                    "--baselines", "full,none", "--positions", "auto,original", "--json",
                                    "--model", str(tiny_model_dir), "--quiet", "--max-new-tokens", "2"])
    assert evaluated.exit_code == 0, evaluated.output
    names = [m["name"] for m in json.loads(evaluated.stdout)["methods"]]
    assert "kvcompile@0.5" in names and "kvcompile[original]@0.5" in names
    compared = {c["method"]: c["reference"] for c in json.loads(evaluated.stdout)["comparisons"]}
    assert compared["kvcompile[original]@0.5"] == "kvcompile@0.5"


def test_keys_are_rotated_in_blocks_to_the_same_values(tiny_lm, monkeypatch):
    """A room-sized context is rotated a block of rows at a time (bounded memory), bit for bit
    as in one call, and back."""
    from kvcompile import rope
    from kvcompile.ragged import RaggedKV

    cap = tiny_lm.capability
    heads, d = cap.num_layers * cap.num_kv_heads, cap.head_dim
    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(0, 40, (heads,), generator=g)]
    rows = sum(lengths)
    kv = RaggedKV.from_rows(torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g),
                            torch.randint(0, 500, (rows,), generator=g), lengths)
    per_layer = rotaries(tiny_lm.model)
    whole = rope.place(kv, per_layer, "cpu", torch.float32)
    monkeypatch.setattr(rope, "ROTATE_ROWS", 7)
    blocks = rope.place(kv, per_layer, "cpu", torch.float32)
    assert torch.equal(blocks.keys, whole.keys) and not torch.equal(blocks.keys, kv.keys)
    torch.testing.assert_close(rope.unrotate(blocks, per_layer), kv.keys, rtol=1e-5, atol=1e-5)
