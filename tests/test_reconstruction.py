"""Reconstruction attention (KVzip): the score equals its direct formula, the task-aware
scorer blends it as documented, and builds use it exactly where the corpus is read whole."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from kvcompile import reconstruction
from kvcompile.builder import BuildOptions, tokenize
from kvcompile.cli import app
from kvcompile.corpus import read_corpus
from kvcompile.errors import OptionError
from kvcompile.pack import load
from kvcompile.pipeline import build
from kvcompile.ragged import RaggedKV
from kvcompile.recipe import load_recipe
from kvcompile.scorers import LayerView, make_scorer

pytestmark = pytest.mark.usefixtures("torch_single_thread")
QA = load_recipe("qa")
D = 8


def _direct(queries, prefix, chunk, own, scaling):
    """Per KV head, group member and query, in float64: softmax over [prefix | chunk | own up to
    itself], the chunk's part, max over the group's queries."""
    heads, n, _ = own.shape
    group = queries.shape[0] // heads
    out = torch.zeros(heads, chunk.shape[1], dtype=torch.float64)
    for h in range(heads):
        for m in range(group):
            for i in range(n):
                keys = torch.cat([prefix[h], chunk[h], own[h, : i + 1]]).double()
                a = torch.softmax(keys @ queries[h * group + m, i].double() * scaling, dim=0)
                out[h] = torch.maximum(out[h], a[prefix.shape[1] : prefix.shape[1] + chunk.shape[1]])
    return out


@pytest.mark.parametrize("max_bytes", [1, 1 << 30])  # a block per query, and one block for all
@pytest.mark.parametrize("heads,group,p,w,n", [(2, 3, 4, 11, 7), (1, 1, 0, 5, 5), (3, 2, 2, 1, 9)])
def test_max_attention_equals_the_direct_formula(max_bytes, heads, group, p, w, n):
    g = torch.Generator().manual_seed(heads * 100 + w)
    q = torch.randn(heads * group, n, D, generator=g)
    prefix, chunk, own = (torch.randn(heads, k, D, generator=g) for k in (p, w, n))
    got = reconstruction.max_attention(q, prefix, chunk, own, D**-0.5, max_bytes)
    torch.testing.assert_close(got.double(), _direct(q, prefix, chunk, own, D**-0.5), atol=1e-6, rtol=1e-5)


def test_repeat_ids_quote_the_previous_chunk(tiny_lm):
    tok = tiny_lm.tokenizer
    corpus = list(range(100, 140))
    first = reconstruction.repeat_ids(tok, corpus, 0, 16)
    later = reconstruction.repeat_ids(tok, corpus, 16, 32)
    assert first[-16:] == corpus[:16] and later[-16:] == corpus[16:32]
    assert later[-16 - reconstruction.OVERLAP : -16] == corpus[16 - reconstruction.OVERLAP : 16]
    assert max(len(first) - 16, len(later) - 16) == reconstruction.prompt_tokens(tok)


def _view(lengths, recon, seed=0, group=2, n_probe=3):
    g = torch.Generator().manual_seed(seed)
    heads, n = len(lengths), sum(lengths)
    positions = torch.cat([torch.arange(k) for k in lengths])
    c = RaggedKV.from_rows(torch.randn(n, D, generator=g), torch.randn(n, D, generator=g), positions, lengths)
    r = torch.rand(n, generator=g) if recon else None
    probe_keys = torch.randn(heads, n_probe, D, generator=g)
    queries = torch.randn(heads * group, n_probe, D, generator=g)
    return LayerView(c, probe_keys, queries, D**-0.5, reconstruction=r)


def test_the_task_aware_score_blends_each_heads_normalised_terms():
    view = _view([5, 9, 1], recon=True)
    task = make_scorer("task_aware", recon=0.0).score(view)
    head = view.candidates.head_ids()
    r = view.reconstruction / torch.zeros(3).index_add_(0, head, view.reconstruction)[head]
    torch.testing.assert_close(make_scorer("task_aware", recon=1.0).score(view), r)
    torch.testing.assert_close(make_scorer("task_aware", recon=0.25).score(view), 0.75 * task + 0.25 * r)
    assert not make_scorer("task_aware", recon=0.0).reads_reconstruction
    with pytest.raises(OptionError, match="read whole"):
        make_scorer("task_aware", recon=0.5).score(_view([5, 9, 1], recon=False))
    with pytest.raises(OptionError, match=r"\[0, 1\]"):
        make_scorer("task_aware", recon=1.5)


def test_only_a_whole_build_reads_reconstruction():
    """``auto`` gives builds that do not read the corpus whole the scorer's defaults for that
    (no reconstruction, pool 41; after a stream scorer, no reconstruction only), recorded as
    used; explicit choices stand, and an explicit reconstruction term there is refused."""
    whole = BuildOptions().resolved(fits=True)
    assert whole.context == "whole" and whole.make_scorer().params() == {
        "value_norm": True, "pool": 5, "row_norm": True, "recon": 0.5}
    assert whole.key_json()["scorer_params"]["recon"] == 0.5
    streamed = BuildOptions().resolved(fits=False)
    assert streamed.stream_scorer == "lagkv" and streamed.make_scorer().params() == {
        "value_norm": True, "pool": 5, "row_norm": True, "recon": 0.0}
    chained = BuildOptions(stream_scorer="none").resolved(fits=False)
    assert chained.context == "chained"
    assert chained.make_scorer().recon == 0.0 and chained.make_scorer().pool == 41
    assert chained.to_json()["scorer_params"] == {"value_norm": True, "pool": 41, "row_norm": True, "recon": 0.0}
    # keys leave the term out where it is off: packs from before it existed stay reusable
    assert chained.key_json()["scorer_params"] == {"value_norm": True, "pool": 41, "row_norm": True}
    assert BuildOptions(context="independent").resolved(fits=True).make_scorer().pool == 41
    assert BuildOptions(context="chained", scorer_params={"pool": 5}).resolved(fits=True).make_scorer().pool == 5
    with pytest.raises(OptionError, match="--context whole"):
        BuildOptions(context="chained", scorer_params={"recon": 0.3}).resolved(fits=True)


def test_a_whole_build_reads_the_corpus_repeated(tiny_lm, tiny_corpus, tmp_path, monkeypatch):
    """The default (whole) build repeats the corpus once, a chunk per forward; the pack records
    the weight; the term changes what is kept; the window's room bounds the chunks."""
    from kvcompile import builder

    calls = []
    real = builder._Compiler.reconstruct

    def spy(self, tk, *args):
        out = real(self, tk, *args)
        calls.append((tk.corpus_tokens, out))
        return out

    monkeypatch.setattr(builder._Compiler, "reconstruct", spy)
    opts = dict(ratio=0.3, chunk_size=48)
    build([tiny_corpus], tmp_path / "r.kvpack", tiny_lm, QA, BuildOptions(**opts))
    (n, scores), = calls
    cap = tiny_lm.capability
    assert scores.shape == (cap.num_layers * cap.num_kv_heads * n,)
    assert bool(((scores >= 0) & (scores <= 1)).all()) and bool((scores > 0).any())
    with_term = load(tmp_path / "r.kvpack")
    assert with_term.header["options"]["scorer"]["recon"] == 0.5
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "r.kvpack")])
    assert shown.exit_code == 0 and "scorer task_aware with reconstruction 0.5" in shown.output
    build([tiny_corpus], tmp_path / "t.kvpack", tiny_lm, QA, BuildOptions(**opts, scorer_params={"recon": 0.0}))
    assert len(calls) == 1  # recon 0: no repeat
    without = load(tmp_path / "t.kvpack")
    assert any(not torch.equal(with_term.positions[i], without.positions[i]) for i in range(cap.num_layers))

    # A window that the corpus and task prompt just fit: the repeat goes in chunks of the room
    # left after the corpus (several forwards), and every token is scored.
    tk = tokenize(read_corpus([tiny_corpus])[0], QA, tiny_lm)
    room = len(tk.probe_ids) + 1 - reconstruction.prompt_tokens(tiny_lm.tokenizer)
    assert 0 < room < tk.corpus_tokens / 2
    forwards = []
    monkeypatch.setattr(builder._Compiler, "prefill", lambda self, ids, cache, real=builder._Compiler.prefill: (
        forwards.append((cache.start, ids.numel())), real(self, ids, cache))[1])
    monkeypatch.setattr(tiny_lm, "max_positions", tk.total + len(tk.probe_ids) + 1)
    build([tiny_corpus], tmp_path / "s.kvpack", tiny_lm, QA, BuildOptions(ratio=0.3, chunk_size=4096))
    assert calls[-1][1].shape == scores.shape and bool((calls[-1][1] > 0).all())
    repeats = [n for start, n in forwards if start == tk.total][:-1]  # the last is the task prompt
    assert len(repeats) > 1 and tk.total + max(repeats) <= tiny_lm.max_positions


def test_a_whole_build_that_keeps_everything_scores_nothing(tiny_lm, tiny_corpus, tmp_path, monkeypatch):
    """At ratio 1 the selection cannot depend on scores: neither the repeat nor the task prompt
    is run, and every corpus token is stored in every head."""
    from kvcompile import builder

    def refuse(*args):
        raise AssertionError("scored a corpus whose every token is kept")

    monkeypatch.setattr(builder._Compiler, "score_corpus", refuse)
    build([tiny_corpus], tmp_path / "all.kvpack", tiny_lm, QA, BuildOptions(ratio=1.0))
    tk = tokenize(read_corpus([tiny_corpus])[0], QA, tiny_lm)
    pack = load(tmp_path / "all.kvpack")
    assert all(int(p.numel()) == tiny_lm.capability.num_kv_heads * (tk.corpus_tokens + len(tk.prefix_ids))
               for p in pack.positions)
    with pytest.raises(AssertionError, match="scored"):
        build([tiny_corpus], tmp_path / "most.kvpack", tiny_lm, QA, BuildOptions(ratio=0.99))


@pytest.mark.parametrize("args,message", [
    (["--context", "chained", "--recon", "0.5"], "--context whole"),
    (["--recon", "2"], "[0, 1]"),
    (["--scorer", "snapkv", "--recon", "0.5"], "task_aware"),
])
def test_the_cli_refuses_a_recon_it_cannot_use_before_loading_a_model(tiny_corpus, tmp_path, args, message):
    out = tmp_path / "x.kvpack"
    result = CliRunner().invoke(app, ["build", str(tiny_corpus), "-o", str(out), "--model", "no-such-model", *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not out.exists()
