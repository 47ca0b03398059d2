"""The seed scorers beside task-aware: SnapKV++ (RocketKV stage 1) and LagKV, each equal to a
direct, per-head implementation of its formula (methods.md sections 2 and 3), and usable
by a build."""

from __future__ import annotations

import pytest
import torch

import kvcompile
from kvcompile.builder import BuildOptions
from kvcompile.pipeline import build
from kvcompile.ragged import RaggedKV
from kvcompile.recipe import load_recipe
from kvcompile.scorers import LayerView, make_scorer
from kvcompile.scorers.lagkv import WINDOW_SCORE

D = 8


def _view(lengths, n_probe=4, group=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads, n = len(lengths), sum(lengths)
    positions = torch.cat([torch.arange(k) * 3 for k in lengths])
    candidates = RaggedKV.from_rows(torch.randn(n, D, generator=g), torch.randn(n, D, generator=g), positions,
                                    lengths)
    return LayerView(candidates, torch.randn(heads, n_probe, D, generator=g),
                     torch.randn(heads * group, n_probe, D, generator=g), D**-0.5)


def _snapkv_direct(view: LayerView, pool: int) -> torch.Tensor:
    """Per KV head, in float64: softmax of each window query over [candidates | window (causal)],
    summed over the window and the group, then max-pooled along the candidates."""
    c, out = view.candidates, []
    heads, n_probe = view.probe_keys.shape[:2]
    group = view.queries.shape[0] // heads
    for h, part in enumerate(c.split(heads)):
        keys = torch.cat([part.keys, view.probe_keys[h]]).double()
        total = torch.zeros(part.rows, dtype=torch.float64)
        for m in range(group):
            for i in range(n_probe):
                q = view.queries[h * group + m, i].double() * view.scaling
                logits = keys[: part.rows + i + 1] @ q
                total += torch.softmax(logits, dim=0)[: part.rows]
        if pool > 1 and part.rows:
            total = torch.stack([total[max(0, j - pool // 2) : j + pool // 2 + 1].max() for j in range(part.rows)])
        out.append(total)
    return torch.cat(out)


def _lagkv_direct(view: LayerView, lag: int, eps: float) -> torch.Tensor:
    """Per KV head and partition, in float64, as methods.md section 2 words it."""
    c, out = view.candidates, []

    def spread(rows, here, ref):
        total = torch.zeros(here.stop - here.start, dtype=torch.float64)
        for z in (rows.keys.double(), rows.values.double()):
            lo, hi = z[ref].min(dim=0).values, z[ref].max(dim=0).values
            normed = (z[here] - lo) / (hi - lo + eps)
            total += torch.softmax(normed.std(dim=1, unbiased=False), dim=0)
        return total

    for part in c.split(c.heads):
        n = part.rows
        s = torch.zeros(n, dtype=torch.float64)
        judged = max(0, n // lag - 1) * lag  # partitions that have a full next partition
        for start in range(0, n, lag):
            here = slice(start, min(start + lag, n))
            if start < judged:
                s[here] = spread(part, here, slice(start + lag, start + 2 * lag))
            else:  # the window: first, ordered by the spread against its own partition
                s[here] = WINDOW_SCORE + spread(part, here, here)
        out.append(s)
    return torch.cat(out)


@pytest.mark.parametrize("lengths", [(5, 0, 1, 30), (12,), (70, 64)], ids=str)
@pytest.mark.parametrize("pool", [1, 5, 63])
def test_snapkv_equals_the_direct_formula(lengths, pool):
    view = _view(lengths, seed=pool)
    got = make_scorer("snapkv", pool=pool).score(view)
    torch.testing.assert_close(got.double(), _snapkv_direct(view, pool), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lengths", [(5, 0, 1, 30), (40,), (33, 16, 64)], ids=str)
@pytest.mark.parametrize("lag", [4, 16])
def test_lagkv_equals_the_direct_formula(lengths, lag):
    view = _view(lengths, seed=lag)
    got = make_scorer("lagkv", lag=lag).score(view)
    torch.testing.assert_close(got.double(), _lagkv_direct(view, lag, 1e-6), rtol=1e-4, atol=1e-6)
    # The window (last full partition and the remainder) is kept first.
    for h, s in enumerate(got.split(list(lengths))):
        n = lengths[h]
        window, judged = s[max(0, (n // lag - 1) * lag):], s[: max(0, (n // lag - 1) * lag)]
        assert (window >= WINDOW_SCORE).all() and (judged < WINDOW_SCORE).all()


def test_lagkv_constant_channels_stay_finite():
    view = _view((32, 20), seed=3)
    c = view.candidates
    keys, values = c.keys.clone(), c.values.clone()
    keys[:, :3] = 1.0  # constant channels: max - min = 0
    values[:] = 0.5  # every channel constant
    view = LayerView(c.replace(keys=keys, values=values), view.probe_keys, view.queries, view.scaling)
    got = make_scorer("lagkv", lag=8).score(view)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _lagkv_direct(view, 8, 1e-6), rtol=1e-4, atol=1e-6)


def test_lagkv_scores_a_token_that_stands_out():
    """A token whose channels spread far from its reference outscores its partition's others."""
    view = _view((24,), seed=5)
    c = view.candidates
    keys = c.keys.clone()
    keys[3] = torch.linspace(-20, 20, D)
    got = make_scorer("lagkv", lag=8).score(LayerView(c.replace(keys=keys), None, None, 1.0))
    assert int(got[:8].argmax()) == 3


@pytest.mark.parametrize("scorer", ["snapkv", "lagkv"])
def test_a_build_with_each_scorer_keeps_the_budget(scorer, tiny_lm, tiny_corpus, tmp_path, torch_single_thread):
    path = tmp_path / f"{scorer}.kvpack"
    build([tiny_corpus], path, tiny_lm, load_recipe("qa"), BuildOptions(ratio=0.25, chunk_size=64, scorer=scorer))
    pack = kvcompile.load(path)
    assert pack.header["options"]["scorer"]["name"] == scorer
    share = sum(map(sum, pack.kept)) / (pack.layout["tokens"] * len(pack.kept) * len(pack.kept[0]))
    assert 0.2 < share < 0.35
    assert pack.session(tiny_lm).ask("When is payment due?", max_new_tokens=3).text is not None


def test_a_scorer_sees_each_heads_layer_and_the_chunk_boundary(tiny_lm, tiny_corpus, tmp_path, monkeypatch,
                                                              torch_single_thread):
    """Whatever way the builder splits heads into scorer calls, ``LayerView.layers()`` names each
    head's layer, and ``survivors()`` the rows kept from earlier chunks."""
    from kvcompile import builder
    from kvcompile.scorers import SCORERS

    seen = []

    class Spy(SCORERS["snapkv"]):
        def score(self, view):
            seen.append((view.layers().tolist(), view.survivors(), view.candidates.positions, view.chunk_start))
            return super().score(view)

    monkeypatch.setitem(SCORERS, "snapkv", Spy)
    monkeypatch.setitem(builder.SCORE_CALL_BYTES, "cpu", 1)  # one head per call: calls start mid-layer
    build([tiny_corpus], tmp_path / "spy.kvpack", tiny_lm, load_recipe("qa"),
          BuildOptions(ratio=0.25, chunk_size=16, scorer="snapkv", context="chained"))
    cap = tiny_lm.capability
    heads = cap.num_layers * cap.num_kv_heads
    layers = [layer for ls, *_ in seen for layer in ls]
    assert layers[:heads] == [h // cap.num_kv_heads for h in range(heads)]  # the first scored chunk, head by head
    later = [(s, p, start) for _, s, p, start in seen if s.any()]
    assert later, "a document longer than a chunk has survivors"
    for survivors, positions, start in later:
        assert torch.equal(survivors, positions < start) and (positions[~survivors] >= start).all()


def test_lagkv_ranks_its_window_by_content_not_position():
    """Candidates shorter than two partitions are all window: kept before anything judged, and a
    budget that cannot hold them all keeps the tokens that spread most in their own partition."""
    view = _view((12,), seed=7)
    c = view.candidates
    keys = c.keys.clone()
    keys[9] = torch.linspace(-20, 20, D)
    got = make_scorer("lagkv", lag=16).score(LayerView(c.replace(keys=keys), None, None, 1.0))
    assert (got >= WINDOW_SCORE).all() and int(got.argmax()) == 9
