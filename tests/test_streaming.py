"""Streaming compilation (issue 14, part 2): a corpus longer than the model's window, compiled
chunk by chunk after the compacted kept tokens, with every forward pass inside the window."""

from __future__ import annotations

import random
import re

import pytest
import torch
from typer.testing import CliRunner

import kvcompile
from kvcompile.builder import BuildOptions, _Compiler, tokenize
from kvcompile.cli import app
from kvcompile.corpus import read_corpus
from kvcompile.errors import CorpusError, OptionError, PackError
from kvcompile.models import load_model, make_tiny_model
from kvcompile.pipeline import build
from kvcompile.ragged import RaggedKV
from kvcompile.recipe import load_recipe
from kvcompile.selection import select

pytestmark = pytest.mark.usefixtures("torch_single_thread")
WINDOW = 512
CHUNK = 64
WORDS = ("password reset link account email support billing invoice refund plan upgrade team admin login "
         "token expires hours days settings profile security device browser cache error retry network").split()


@pytest.fixture(scope="module")
def small_lm(tmp_path_factory):
    """The tiny random model with a window of 512 positions."""
    path = make_tiny_model(tmp_path_factory.mktemp("window") / "llama", max_position_embeddings=WINDOW)
    return load_model(str(path), device="cpu", progress=False)


def corpus(root, documents: int, words: int, seed: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(documents):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)), encoding="utf-8")
    return root


@pytest.fixture
def forwards(monkeypatch):
    """Every prefill of the build: (its last position + 1, its longest prefix head)."""
    seen: list[tuple[int, int]] = []
    prefill = _Compiler.prefill

    def spy(self, ids, cache):
        seen.append((cache.layers[0].start + ids.numel(), max(layer.prefix.max_len for layer in cache.layers)))
        return prefill(self, ids, cache)

    monkeypatch.setattr(_Compiler, "prefill", spy)
    return seen


def room(lm, pack: kvcompile.Pack) -> int:
    """The rows a head may hold: the window less a chunk and the task prompt, as framed."""
    tk = tokenize([], load_recipe("qa"), lm)
    assert pack.header["recipe"]["task_prompt"] == load_recipe("qa").task_prompt()
    return lm.max_positions - CHUNK - len(tk.probe_ids)


@pytest.mark.parametrize("context", ["chained", "independent"])
def test_a_corpus_ten_times_the_window_compiles_within_it_and_answers(small_lm, tmp_path, forwards, context):
    path = tmp_path / "long.kvpack"
    report = build([corpus(tmp_path / "c", 4, 1300)], path, small_lm, load_recipe("qa"),
                   BuildOptions(ratio=0.02, chunk_size=CHUNK, codec="fp32", context=context))
    assert report.streamed and report.cache_tokens > 10 * WINDOW  # auto: it does not fit
    pack = kvcompile.load(path)
    assert pack.header["options"]["stream"] is True and pack.question_position > WINDOW
    # Every forward pass stayed in the window, and no head's context outgrew the room.
    most = room(small_lm, pack)
    assert max(end for end, _ in forwards) <= WINDOW
    assert max(prefix for _, prefix in forwards) <= most
    _, start = pack.attended_positions("auto")
    assert start == max(max(k) for k in pack.kept) <= most
    session = pack.session(small_lm)
    assert session.start == start and torch.isfinite(session.first_token_logits("When does the link expire?")).all()
    with pytest.raises(OptionError, match="longer than the model's window.*--positions compact"):
        pack.attended_positions("original")


def test_the_longest_context_does_not_grow_with_the_corpus(small_lm, tmp_path, forwards):
    """The memory bound, counted: a corpus 10x the window needs no larger forward than one that
    fits (the task-aware scorer streaming alone; the first pass of a stream scorer: below)."""
    sizes = {}
    for name, words in (("one", 60), ("ten", 1300)):
        forwards.clear()
        build([corpus(tmp_path / name, 4, words)], tmp_path / f"{name}.kvpack", small_lm, load_recipe("qa"),
              BuildOptions(ratio=0.02, chunk_size=CHUNK, codec="fp32", stream=True, stream_scorer="none"))
        sizes[name] = max(prefix for _, prefix in forwards), max(end for end, _ in forwards)
    assert sizes["ten"][1] <= WINDOW and sizes["ten"][0] <= room(small_lm, kvcompile.load(tmp_path / "ten.kvpack"))
    assert sizes["ten"][0] > sizes["one"][0]  # the longer corpus does fill its room, and no more


def test_with_every_token_kept_a_streamed_build_equals_the_plain_one(tiny_lm, tiny_corpus, tmp_path):
    packs = {}
    for stream in (False, True):
        path = tmp_path / f"{stream}.kvpack"
        build([tiny_corpus], path, tiny_lm, load_recipe("qa"),
              BuildOptions(ratio=1.0, chunk_size=CHUNK, codec="fp32", stream=stream))
        packs[stream] = kvcompile.load(path)
    assert "stream" not in packs[False].header["options"] and packs[True].header["options"]["stream"]
    assert packs[True].kept == packs[False].kept
    for li in range(len(packs[True].kept)):
        a, b = packs[True].layer(li), packs[False].layer(li)
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=1e-4)


def test_streamed_compaction_changes_what_a_selective_build_keeps(tiny_lm, tiny_corpus, tmp_path):
    """Below ratio 1 the two compiles see different positions: the option is not a no-op."""
    keys = []
    for stream in (False, True):
        path = tmp_path / f"{stream}.kvpack"
        build([tiny_corpus], path, tiny_lm, load_recipe("qa"),
              BuildOptions(ratio=0.25, chunk_size=CHUNK, codec="fp32", stream=stream))
        keys.append(kvcompile.load(path).layer(1).keys)
    assert keys[0].shape != keys[1].shape or not torch.allclose(keys[0], keys[1])


def test_a_ratio_too_high_is_refused_before_compiling_with_the_largest_that_fits(small_lm, tmp_path, forwards):
    docs = corpus(tmp_path / "c", 4, 1300)
    with pytest.raises(CorpusError, match="largest ratio that fits is") as e:
        build([docs], tmp_path / "p.kvpack", small_lm, load_recipe("qa"), BuildOptions(ratio=0.25, chunk_size=CHUNK))
    assert not forwards and not (tmp_path / "p.kvpack").exists()
    largest = float(re.search(r"largest ratio that fits is ([0-9.]+)", str(e.value)).group(1))
    assert 0 < largest < 0.25
    build([docs], tmp_path / "p.kvpack", small_lm, load_recipe("qa"), BuildOptions(ratio=largest, chunk_size=CHUNK))
    with pytest.raises(CorpusError, match=r"largest --budget that fits is (\d+)") as e:
        build([docs], tmp_path / "b.kvpack", small_lm, load_recipe("qa"), BuildOptions(budget=2000, chunk_size=CHUNK))
    budget = int(re.search(r"that fits is (\d+)", str(e.value)).group(1))
    build([docs], tmp_path / "b.kvpack", small_lm, load_recipe("qa"), BuildOptions(budget=budget, chunk_size=CHUNK))


def test_what_streaming_cannot_do_is_refused_in_one_line(small_lm, tmp_path):
    docs = corpus(tmp_path / "c", 2, 1000)
    recipe = load_recipe("qa")
    with pytest.raises(CorpusError, match="build with --stream"):
        build([docs], tmp_path / "p.kvpack", small_lm, recipe, BuildOptions(ratio=0.02, chunk_size=CHUNK, stream=False))
    with pytest.raises(OptionError, match="streamed compile avoids .*: use --budgets document, or --stream-scorer"):
        build([docs], tmp_path / "p.kvpack", small_lm, recipe,
              BuildOptions(ratio=0.02, chunk_size=CHUNK, budgets="corpus", stream_scorer="none"))
    with pytest.raises(OptionError, match="--context whole reads .*: use --context chained"):
        build([docs], tmp_path / "p.kvpack", small_lm, recipe,
              BuildOptions(ratio=0.02, chunk_size=CHUNK, context="whole"))
    with pytest.raises(OptionError, match="lower --chunk-size"):
        build([docs], tmp_path / "p.kvpack", small_lm, recipe, BuildOptions(ratio=0.02, chunk_size=400))
    gpt2 = make_tiny_model(tmp_path / "gpt2", arch="gpt2", max_position_embeddings=WINDOW)
    gpt2 = load_model(str(gpt2), device="cpu", progress=False)
    with pytest.raises(CorpusError, match="absolute positions"):
        build([docs], tmp_path / "p.kvpack", gpt2, recipe, BuildOptions(ratio=0.02, chunk_size=CHUNK))
    assert not (tmp_path / "p.kvpack").exists()


def test_cli_streams_and_queries_a_long_corpus(small_lm, tmp_path):
    docs, out = corpus(tmp_path / "c", 3, 1300), tmp_path / "cli.kvpack"
    model = small_lm.name
    runner = CliRunner()
    result = runner.invoke(app, ["build", str(docs), "-o", str(out), "--model", model, "--ratio", "0.02",
                                 "--chunk-size", str(CHUNK), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "streamed at compacted positions" in result.stderr
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and f"streamed past the window of {WINDOW}" in result.stdout
    result = runner.invoke(app, ["query", str(out), "When does the link expire?", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["query", str(out), "When does the link expire?", "--positions", "original"])
    assert result.exit_code != 0 and "--positions compact" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(app, ["build", str(docs), "-o", str(tmp_path / "x.kvpack"), "--model", model,
                                 "--ratio", "0.02", "--chunk-size", str(CHUNK), "--no-stream", "--quiet"])
    assert result.exit_code != 0 and "--stream" in result.stderr and not (tmp_path / "x.kvpack").exists()


def test_a_header_whose_longest_head_exceeds_the_window_is_corrupt(small_lm, tmp_path, rewrite_pack):
    path = tmp_path / "p.kvpack"
    build([corpus(tmp_path / "c", 2, 1000)], path, small_lm, load_recipe("qa"),
          BuildOptions(ratio=0.02, chunk_size=CHUNK, codec="fp32"))
    bad = rewrite_pack(path, tmp_path / "bad.kvpack", lambda h, t: h["model"].__setitem__("max_positions", 40))
    with pytest.raises(PackError, match="more tokens than the model's window"):
        kvcompile.load(bad)
    plain = rewrite_pack(path, tmp_path / "plain.kvpack", lambda h, t: h["options"].pop("stream"))
    with pytest.raises(PackError, match="question_position.*beyond the model's window"):
        kvcompile.load(plain)


# -- selection with a per-head cap ------------------------------------------------------------


def _greedy(scores: list[torch.Tensor], budget: int, cap: list[int]) -> list[set[int]]:
    """The rule, written directly (no floor, nothing protected): best scores first, skipping full heads."""
    rows = sorted(((float(s), h, i) for h, head in enumerate(scores) for i, s in enumerate(head)),
                  key=lambda r: (-r[0], r[1], r[2]))
    kept, left = [set() for _ in scores], budget
    for _, h, i in rows:
        if left and len(kept[h]) < cap[h]:
            kept[h].add(i)
            left -= 1
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_capped_selection_is_greedy_water_filling(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(1, 12, (4,), generator=g)]
    scores = [torch.rand(n, generator=g) for n in lengths]
    cap = [int(c) for c in torch.randint(0, 8, (4,), generator=g)]
    budget = int(torch.randint(1, sum(lengths) + 1, (1,), generator=g))
    n = sum(lengths)
    kv = RaggedKV.from_rows(torch.zeros(n, 2), torch.zeros(n, 2), torch.cat([torch.arange(k) for k in lengths]),
                            lengths)
    mask = select(torch.cat(scores), kv, budget, torch.zeros(n, dtype=torch.bool), head_floor=0.0,
                  head_cap=torch.tensor(cap))
    got = [set(torch.nonzero(m).flatten().tolist()) for m in torch.split(mask, lengths)]
    assert got == _greedy(scores, budget, cap)
    assert all(len(k) <= c for k, c in zip(got, cap))


def test_a_cap_at_least_the_budget_changes_nothing():
    g = torch.Generator().manual_seed(7)
    lengths = [9, 4, 12]
    n = sum(lengths)
    scores = torch.rand(n, generator=g)
    kv = RaggedKV.from_rows(torch.zeros(n, 2), torch.zeros(n, 2), torch.cat([torch.arange(k) for k in lengths]),
                            lengths)
    none = torch.zeros(n, dtype=torch.bool)
    assert torch.equal(select(scores, kv, 10, none, 0.3), select(scores, kv, 10, none, 0.3,
                                                                 head_cap=torch.full((3,), 10)))


# -- LagKV's recursion: what a chunk judged and kept is frozen -----------------------------------


@pytest.mark.parametrize("recursive", [True, False])
def test_lagkv_freezes_what_it_judged_and_kept(tiny_lm, tmp_path, monkeypatch, recursive):
    from kvcompile import builder
    from kvcompile.scorers.lagkv import WINDOW_SCORE

    calls = []

    def spy(scores, candidates, budget, protected, *args):
        keep = select(scores, candidates, budget, protected, *args)
        head = candidates.head_ids()
        rows = list(zip(head.tolist(), candidates.positions.tolist(), scores.tolist(), keep.tolist()))
        calls.append(rows)
        return keep

    monkeypatch.setattr(builder, "select", spy)
    docs = corpus(tmp_path / "c", 1, 500)
    build([docs], tmp_path / "p.kvpack", tiny_lm, load_recipe("qa"),
          BuildOptions(ratio=0.3, chunk_size=CHUNK, codec="fp32", context="chained", scorer="lagkv",
                       scorer_params={"lag": 8, "recursive": recursive}))
    assert len(calls) > 3
    judged_and_kept = 0
    for before, after in zip(calls, calls[1:]):
        later = {(h, p): s for h, p, s, _ in after}
        frozen = {(h, p) for h, p, s, k in before if k and s < WINDOW_SCORE}
        judged_and_kept += len(frozen)
        if recursive:  # never judged again, and kept
            assert all(later[r] == float("inf") for r in frozen)
            assert all(k for h, p, s, k in after if (h, p) in frozen)
        else:
            assert all(later[r] < WINDOW_SCORE for r in frozen if r in later)
    assert judged_and_kept > 0
    header = kvcompile.load(tmp_path / "p.kvpack").header
    assert header["options"]["scorer"]["recursive"] is recursive


@pytest.mark.parametrize("scorer,reads", [("lagkv", False), ("task_aware", True)])
def test_only_a_scorer_that_reads_the_task_prompt_forwards_it(tiny_lm, tmp_path, monkeypatch, scorer, reads):
    """LagKV scores without attention: its chunks are prefilled without the task prompt behind
    them (which, with short documents, is most of the compile's tokens)."""
    from kvcompile import builder

    forwards = []
    monkeypatch.setattr(builder._Compiler, "prefill", lambda self, ids, cache, real=builder._Compiler.prefill: (
        forwards.append(ids.tolist()), real(self, ids, cache))[1])
    docs = corpus(tmp_path / "c", 2, 300)
    for context in ("chained", "whole"):
        forwards.clear()
        build([docs], tmp_path / "p.kvpack", tiny_lm, load_recipe("qa"),
              BuildOptions(ratio=0.3, chunk_size=CHUNK, context=context, scorer=scorer))
        probe = tokenize(read_corpus([docs])[0], load_recipe("qa"), tiny_lm).probe_ids
        with_probe = [ids for ids in forwards if ids[-len(probe):] == probe]
        assert bool(with_probe) is reads, context


def test_an_edit_to_a_streamed_corpus_recompiles_from_that_document_on(small_lm, tmp_path):
    docs = corpus(tmp_path / "c", 4, 700)
    # fp16 storage: reused rows come back decoded. The task-aware scorer streams alone (with a
    # stream scorer, the default, the final selection makes every segment depend on every document).
    options = BuildOptions(ratio=0.02, chunk_size=CHUNK, stream_scorer="none")
    build([docs], tmp_path / "p.kvpack", small_lm, load_recipe("qa"), options)
    (docs / "doc03.txt").write_text((docs / "doc03.txt").read_text() + " refund", encoding="utf-8")
    report = build([docs], tmp_path / "p.kvpack", small_lm, load_recipe("qa"), options)
    assert report.streamed and sorted(report.plan.reuse) == [0, 1, 2]
    build([docs], tmp_path / "clean.kvpack", small_lm, load_recipe("qa"), options)
    assert (tmp_path / "p.kvpack").read_bytes() == (tmp_path / "clean.kvpack").read_bytes()


def test_a_transient_cache_holds_one_padded_prefix_at_a_time(tiny_lm, tiny_pack):
    """The compiler's forward passes read only their new tokens afterwards: each layer's padded
    copy of the context is dropped once the next layer starts, and nothing else changes."""
    from kvcompile.attention import pack_attention
    from kvcompile.cache import PackCache, forward

    pack = kvcompile.load(tiny_pack)
    kv = pack.place(tiny_lm)
    ids = torch.tensor([[5, 17, 230, 9, 4]])
    out = {}
    for transient in (False, True):
        cache = PackCache(kv, start=pack.question_position, transient=transient)
        with pack_attention(tiny_lm.model):
            logits = forward(tiny_lm.model, ids, cache).logits
        out[transient] = logits, [layer.new_keys.clone() for layer in cache.layers], cache
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(out[True][1], out[False][1]))
    held = [layer.buffer.shape[3] for layer in out[True][2].layers]
    assert held[:-1] == [5] * (len(held) - 1) and held[-1] > 5  # only the last layer still holds its prefix
    assert all(layer.buffer.shape[3] > 5 for layer in out[False][2].layers)


# -- A first pass while streaming (--stream-scorer), the build's scorer for the final selection ----


def test_lagkv_streams_and_the_task_prompt_makes_the_final_selection(small_lm, tmp_path, monkeypatch):
    """The default streamed build: LagKV compresses the stream to what the window holds without
    the task prompt; one forward of the task prompt after those survivors lets the task-aware
    scorer keep the budget among them."""
    from kvcompile import builder

    forwards, drafts = [], []
    real_prefill, real_documents = _Compiler.prefill, _Compiler.documents
    monkeypatch.setattr(_Compiler, "prefill", lambda self, ids, cache: (
        forwards.append((self.scorer.name, ids.numel(), cache.start + ids.numel(),
                         max(layer.prefix.max_len for layer in cache.layers))), real_prefill(self, ids, cache))[1])
    monkeypatch.setattr(_Compiler, "documents", lambda self, *args: (
        drafts.append(out := real_documents(self, *args)), out)[1])
    docs = corpus(tmp_path / "c", 4, 1300)
    report = build([docs], tmp_path / "p.kvpack", small_lm, load_recipe("qa"),
                   BuildOptions(ratio=0.02, chunk_size=CHUNK, codec="fp32"))
    assert report.streamed
    tk = tokenize(read_corpus([docs])[0], load_recipe("qa"), small_lm)
    n_probe = len(tk.probe_ids)
    firsts = [f for f in forwards if f[0] == "lagkv"]
    finals = [f for f in forwards if f[0] == "task_aware"]
    assert firsts and all(n <= CHUNK for _, n, _, _ in firsts)  # chunks alone: no task prompt behind them
    assert [n for _, n, _, _ in finals] == [len(tk.prefix_ids), n_probe]  # the framing, then one final forward
    assert max(end for _, _, end, _ in forwards) <= WINDOW

    pack = kvcompile.load(tmp_path / "p.kvpack")
    assert max(prefix for _, _, _, prefix in forwards) <= room(small_lm, pack)  # the first pass's bound holds
    o = pack.header["options"]
    assert o["stream_scorer"] == {"name": "lagkv", "lag": 128, "eps": 1e-6, "recursive": True}
    assert o["scorer"]["name"] == "task_aware" and o["scorer"]["recon"] == 0.0 and o["scorer"]["pool"] == 5
    (first,) = drafts
    cap = small_lm.capability
    n_prefix = len(tk.prefix_ids)
    for li in range(cap.num_layers):
        layer = pack.layer(li)
        kept = layer.positions.split(pack.kept[li])
        for h in range(cap.num_kv_heads):
            corpus_rows = kept[h][n_prefix:]
            parts = [(seg.split(cap.num_layers)[li], start) for seg, start in zip(first, builder.document_starts(tk))]
            survivors = torch.cat([p.positions.split(p.lengths)[h] + start for p, start in parts])
            assert set(corpus_rows.tolist()) <= set(survivors.tolist())  # chosen among the survivors
            assert len(survivors) > 1.5 * len(corpus_rows)  # of which the first pass kept more (the room)
    # Documents compete for the budget in the final selection (as when read whole): each layer
    # keeps its share of the corpus in every head, whatever each document got.
    assert o["selection"]["budgets"] == "corpus"
    target = round(0.02 * tk.corpus_tokens)
    assert all(k == n_prefix + target for kept in pack.kept for k in kept)
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "p.kvpack")])
    assert shown.exit_code == 0 and "lagkv while streaming, then task_aware over what it kept" in shown.output
    assert "shared by the corpus (one selection)" in shown.output

    # With --budgets document, each document keeps its own budget, among its own survivors.
    build([docs], tmp_path / "d.kvpack", small_lm, load_recipe("qa"),
          BuildOptions(ratio=0.02, chunk_size=CHUNK, codec="fp32", stream_scorer="lagkv", budgets="document"))
    budgets = builder.document_budgets([len(ids) for ids in tk.doc_ids], 0.02)
    assert [s["budget"] for s in kvcompile.load(tmp_path / "d.kvpack").header["segments"]] == budgets


def test_a_stream_scorer_is_recorded_only_where_the_build_streams(tiny_lm, tiny_corpus, small_lm, tmp_path):
    build([tiny_corpus], tmp_path / "fits.kvpack", tiny_lm, load_recipe("qa"),
          BuildOptions(ratio=0.3, stream_scorer="lagkv"))
    assert "stream_scorer" not in kvcompile.load(tmp_path / "fits.kvpack").header["options"]
    assert BuildOptions(stream_scorer="lagkv").resolved(fits=True).stream_scorer is None
    with pytest.raises(OptionError, match="--context chained"):
        BuildOptions(stream_scorer="lagkv", context="independent").resolved(fits=False)
    with pytest.raises(OptionError, match="unknown scorer 'lagg'"):
        BuildOptions(stream_scorer="lagg").validate()
    result = CliRunner().invoke(app, ["build", str(tiny_corpus), "-o", str(tmp_path / "x.kvpack"), "--stream",
                                      "--context", "independent", "--stream-scorer", "lagkv"])
    assert result.exit_code == 2 and "--context chained" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.kvpack").exists()


def test_an_edit_under_a_stream_scorer_recompiles_every_document(small_lm, tmp_path):
    """The final selection sees every document at once: no segment outlives an edit."""
    docs = corpus(tmp_path / "c", 3, 700)
    options = BuildOptions(ratio=0.02, chunk_size=CHUNK, codec="fp32", stream_scorer="lagkv")
    build([docs], tmp_path / "p.kvpack", small_lm, load_recipe("qa"), options)
    again = build([docs], tmp_path / "p.kvpack", small_lm, load_recipe("qa"), options)
    assert sorted(again.plan.reuse) == [0, 1, 2]
    (docs / "doc02.txt").write_text((docs / "doc02.txt").read_text() + " refund", encoding="utf-8")
    edited = build([docs], tmp_path / "p.kvpack", small_lm, load_recipe("qa"), options)
    assert not edited.plan.reuse


def test_the_first_pass_keeps_at_most_four_times_the_budget(small_lm, tmp_path, monkeypatch):
    """Where the window's room is larger, the first pass still keeps only FIRST_PASS_SHARE times
    the budget: memory and time follow the budget, not the window."""
    from kvcompile import builder

    budgets = []
    real = _Compiler.documents
    monkeypatch.setattr(_Compiler, "documents", lambda self, tk, framing, ctx, b, *rest: (
        budgets.append(list(b)), real(self, tk, framing, ctx, b, *rest))[1])
    docs = corpus(tmp_path / "c", 4, 150)
    build([docs], tmp_path / "p.kvpack", small_lm, load_recipe("qa"),
          BuildOptions(ratio=0.05, chunk_size=CHUNK, codec="fp32", stream=True))
    tk = tokenize(read_corpus([docs])[0], load_recipe("qa"), small_lm)
    lengths = [len(ids) for ids in tk.doc_ids]
    assert 4 * 0.05 * sum(lengths) < builder.stream_room(tk, BuildOptions(chunk_size=CHUNK), WINDOW)
    assert budgets == [builder.document_budgets(lengths, builder.FIRST_PASS_SHARE * 0.05)]
