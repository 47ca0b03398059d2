"""Segments chosen per question (issue 15, first part): the pack's segment index and ``query --select``."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kvcompile
from kvcompile.builder import BuildOptions
from kvcompile.cli import app
from kvcompile.errors import OptionError, PackError
from kvcompile.pipeline import build
from kvcompile.ragged import RaggedKV
from kvcompile.recipe import load_recipe
from kvcompile.repair import Ape, ape_attention
from kvcompile.retrieval import SegmentIndex, Selector, choose, segment_terms

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def independent_pack(tiny_lm, tiny_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("select") / "ind.kvpack"
    build([tiny_corpus], path, tiny_lm, load_recipe("qa"),
          BuildOptions(ratio=1.0, chunk_size=64, codec="fp32", context="independent"))
    return kvcompile.load(path)


def test_segment_terms_count_each_texts_words_without_stop_words():
    terms = segment_terms(["The link is valid; the LINK expires.", "Orders ship from Rotterdam."])
    assert terms[0] == {"expires": 1, "link": 2, "valid": 1} and list(terms[0]) == sorted(terms[0])
    assert terms[1] == {"from": 1, "orders": 1, "rotterdam": 1, "ship": 1}  # bm25s keeps "from"
    assert segment_terms(["The link"]) == segment_terms(["The link"])


def test_the_index_ranks_the_segment_that_holds_the_question_s_words_first():
    index = SegmentIndex(segment_terms(["invoices are due monthly", "orders ship from rotterdam", "..."]))
    scores = index.scores("Where do orders ship from?")
    assert scores[1] > scores[0] == scores[2] == 0
    assert index.scores("the of and") == [0.0, 0.0, 0.0]  # stop words only


@pytest.mark.parametrize("seed", range(4))
def test_choose_fills_the_budget_best_first_and_keeps_corpus_order(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (12,), generator=g).tolist()  # ties on purpose
    sizes = torch.randint(1, 9, (12,), generator=g).tolist()
    chosen = choose(scores, sizes, 20, always=[5])
    assert chosen == sorted(chosen) and 5 in chosen and sum(sizes[i] for i in chosen) <= max(20, sizes[5])
    left = 20 - sum(sizes[i] for i in chosen)
    order = sorted(range(12), key=lambda i: (-scores[i], i))
    for i in order:  # nothing skipped that would have fitted before a worse-ranked pick
        if i not in chosen:
            assert sizes[i] > left or all(order.index(j) < order.index(i) or j == 5 for j in chosen)
    assert choose(scores, sizes, 20, always=[5]) == chosen


def test_selecting_every_segment_is_the_whole_pack_at_compact_positions(tiny_lm, independent_pack):
    question = "Where do orders ship from?"
    session, chosen = Selector(independent_pack, tiny_lm, 1e9).session(question)
    assert chosen.segments == list(range(5))
    whole = independent_pack.session(tiny_lm, positions="compact")
    assert session.start == whole.start
    torch.testing.assert_close(session.first_token_logits(question), whole.first_token_logits(question))


def test_a_question_attends_to_its_segment_within_the_budget(tiny_lm, independent_pack):
    manifest = independent_pack.manifest()
    shipping = next(d["segment"] for d in manifest if d["path"] == "shipping.txt")
    selector = Selector(independent_pack, tiny_lm, manifest[shipping]["tokens"])
    session, chosen = selector.session("Where do orders ship from, and how long does express delivery take?")
    assert chosen.segments == [shipping]
    framing = len(independent_pack.framing.prefix_ids)
    assert all(max(layer.lengths) == framing + manifest[shipping]["tokens"] for layer in session.kv)
    assert session.start == framing + manifest[shipping]["tokens"]
    always = next(d["segment"] for d in manifest if d["path"] == "billing.txt")
    _, chosen = Selector(independent_pack, tiny_lm, 0.99, always=[always]).session("shipping")
    assert always in chosen.segments


def test_a_pack_without_an_index_gets_one_clear_line(tiny_lm, independent_pack, tmp_path, rewrite_pack):
    def drop(h, t):
        del h["corpus"]["index"], t["index"]

    old = kvcompile.load(rewrite_pack(independent_pack.path, tmp_path / "old.kvpack", drop))
    with pytest.raises(OptionError, match="no segment index.*rebuild it"):
        Selector(old, tiny_lm, 0.5)

    def shorten(h, t):
        import hashlib

        from kvcompile.format import zstd_frame

        data = json.dumps(independent_pack.segment_terms()[:2]).encode()
        t["index"] = zstd_frame(data)
        h["corpus"]["index"].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())

    bad = kvcompile.load(rewrite_pack(independent_pack.path, tmp_path / "bad.kvpack", shorten))
    with pytest.raises(PackError, match="corpus.index.*lists 2 segments"):
        bad.segment_terms()


def test_cli_query_select(tiny_lm, independent_pack, tiny_model_dir):
    runner = CliRunner()
    pack = str(independent_pack.path)
    result = runner.invoke(app, ["query", pack, "Where do orders ship from?", "--select", "0.3", "--json", "-n", "2"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    shipping = next(d["segment"] for d in independent_pack.manifest() if d["path"] == "shipping.txt")
    assert shipping in out["segments"] and out["selected_tokens"] <= 0.3 * independent_pack.header["corpus"]["tokens"]
    assert out["select_s"] >= 0
    result = runner.invoke(app, ["query", pack, "Where?", "--select", "0.3", "--always", "nope.txt"])
    assert result.exit_code != 0 and "not a document" in result.stderr
    result = runner.invoke(app, ["query", pack, pack, "Where?", "--select", "0.3"])
    assert result.exit_code != 0 and "kvcompile merge" in result.stderr


def test_eval_adds_a_select_method(independent_pack, tiny_corpus, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": q, "answers": [a]}) for q, a in [
        ("Where do orders ship from?", "Rotterdam"), ("When was the company founded?", "1998")]) + "\n")
    result = CliRunner().invoke(app, ["eval", str(independent_pack.path), "--qa", str(qa), "--corpus",
                                      str(tiny_corpus), "--select", "0.3", "--ape", "0.9,0.9",
                                      "--baselines", "full,rag,none",
                                      "--max-new-tokens", "2", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    methods = {m["name"]: m for m in json.loads(result.stdout)["methods"]}
    assert {"select", "select[ape]", "full", "none"} <= set(methods) and methods["select"]["kind"] == "select"
    corpus_tokens = independent_pack.header["corpus"]["tokens"]
    framing = len(independent_pack.framing.prefix_ids)
    assert methods["select"]["kv_tokens"] <= framing + 0.3 * corpus_tokens
    assert methods["select"]["ttft_s"] > 0 and methods["select"]["questions"] == 2
    # rag at the selection's budget; not at the pack's, which holds the whole corpus (that is `full`)
    rags = [m for name, m in methods.items() if name.startswith("rag@")]
    assert len(rags) == 1 and rags[0]["kv_tokens"] <= framing + 0.3 * corpus_tokens


def test_ape_with_unit_temperature_and_scale_is_ordinary_attention(tiny_lm, independent_pack):
    question = "Where do orders ship from?"
    plain, _ = Selector(independent_pack, tiny_lm, 0.5).session(question)
    unit, _ = Selector(independent_pack, tiny_lm, 0.5, ape=Ape(1.0, 1.0)).session(question)
    assert unit.repair is not None and len(unit.repair) == len(unit.kv)
    torch.testing.assert_close(unit.first_token_logits(question), plain.first_token_logits(question),
                               atol=1e-4, rtol=1e-4)
    assert unit.answer_nll(question, "Rotterdam") == pytest.approx(plain.answer_nll(question, "Rotterdam"), abs=1e-4)
    sharp, _ = Selector(independent_pack, tiny_lm, 0.5, ape=Ape(0.5, 0.8)).session(question)
    assert not torch.allclose(sharp.first_token_logits(question), plain.first_token_logits(question), atol=1e-3)
    # The framing's rows come first in every head, and are what `shared` counts.
    framing = len(independent_pack.framing.prefix_ids)
    assert all(int(n) <= framing for layer in sharp.repair for n in layer.shared)


def test_ape_leaves_framing_alone_and_its_split_is_exact_at_unit_parameters():
    g = torch.Generator().manual_seed(0)
    lengths = (6, 9)
    rows = RaggedKV.from_rows(torch.randn(15, 16, generator=g), torch.randn(15, 16, generator=g), torch.arange(15),
                              lengths)
    query, keys, values = (torch.randn(1, 4, 2, 16, generator=g), torch.randn(1, 2, 3, 16, generator=g),
                           torch.randn(1, 2, 3, 16, generator=g))
    every = torch.tensor(lengths)
    plain = ape_attention(query, rows, every, keys, values, 0.25, Ape(1.0, 1.0))
    torch.testing.assert_close(ape_attention(query, rows, every, keys, values, 0.25, Ape(0.3, 0.5)), plain)
    # No segment row at all: only the framing and the new tokens, whatever T and S.
    mixed = ape_attention(query, rows, torch.tensor([2, 4]), keys, values, 0.25, Ape(1.0, 1.0))
    torch.testing.assert_close(mixed, plain)  # T = S = 1: the split is exact


def test_cli_query_select_with_ape(independent_pack):
    runner = CliRunner()
    pack = str(independent_pack.path)
    result = runner.invoke(app, ["query", pack, "Where do orders ship from?", "--select", "0.3", "--ape", "0.9,0.9",
                                 "--json", "-n", "2"])
    assert result.exit_code == 0, result.output
    for args, match in [(["--ape", "0.9"], "needs --select"), (["--select", "0.3", "--ape", "hot"], "--ape takes"),
                        (["--select", "0.3", "--ape", "0.9", "--sparse", "0.5"], "do not combine")]:
        result = runner.invoke(app, ["query", pack, "Where?", *args])
        assert result.exit_code != 0 and match in result.stderr, result.output
