"""RaggedKV, the one ragged KV type: every operation equals the same operation done head
by head on plain per-head tensors (the layout it replaced), including heads that hold no
rows or a single row."""

from __future__ import annotations

import pytest
import torch

from kvcompile.ragged import RaggedKV

HEAD_DIM = 4


def _heads(kv: RaggedKV) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per head ``(keys, values, positions)``, cut with the host lengths only."""
    out, at = [], 0
    for n in kv.lengths:
        out.append((kv.keys[at : at + n], kv.values[at : at + n], kv.positions[at : at + n]))
        at += n
    assert at == kv.keys.shape[0] == kv.values.shape[0] == kv.positions.shape[0]
    return out


def _check_layout(kv: RaggedKV) -> None:
    """Shapes, offsets and lengths agree; positions increase within each head."""
    assert kv.offsets.tolist() == [0, *torch.tensor(kv.lengths, dtype=torch.int64).cumsum(0).tolist()]
    assert kv.offsets.dtype == torch.int64
    assert kv.positions.dtype == torch.int64
    assert kv.heads == len(kv.lengths) and kv.rows == sum(kv.lengths) and kv.max_len == max(kv.lengths, default=0)
    assert kv.keys.shape == kv.values.shape == (kv.rows, kv.head_dim)
    for _, _, p in _heads(kv):
        assert bool((p[1:] > p[:-1]).all())


def _random(lengths, seed=0, limit=100) -> RaggedKV:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    positions = [torch.randperm(limit, generator=g)[:k].sort().values for k in lengths]
    kv = RaggedKV.from_rows(torch.randn(n, HEAD_DIM, generator=g), torch.randn(n, HEAD_DIM, generator=g),
                            torch.cat(positions) if positions else torch.empty(0, dtype=torch.int64), lengths)
    _check_layout(kv)
    return kv


def _equal_heads(a: RaggedKV, b: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    got = _heads(a)
    assert len(got) == len(b)
    for (k, v, p), (k2, v2, p2) in zip(got, b):
        assert torch.equal(k, k2) and torch.equal(v, v2) and torch.equal(p, p2)


LENGTHS = [(3, 0, 1, 5), (0, 0), (1,), (4, 4, 4), (0, 7), (2, 1, 0)]


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_head_ids_local_index_and_counts(lengths):
    kv = _random(lengths)
    assert kv.head_ids().tolist() == [h for h, n in enumerate(lengths) for _ in range(n)]
    assert kv.head_local_index().tolist() == [i for n in lengths for i in range(n)]
    mask = torch.arange(kv.rows) % 2 == 0
    per_head = [int(m.sum()) for m in mask.split(list(lengths))]
    assert kv.head_counts(mask).tolist() == per_head


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_padded_index_pads_each_head_to_the_longest(lengths):
    kv = _random(lengths, seed=1)
    index, valid = kv.padded_index()
    assert index.shape == valid.shape == (kv.heads, kv.max_len)
    assert valid.sum(1).tolist() == list(lengths)
    padded = kv.keys[index] if kv.rows else kv.keys.new_zeros(kv.heads, kv.max_len, HEAD_DIM)
    for h, (k, _, _) in enumerate(_heads(kv)):
        assert valid[h, : lengths[h]].all() and not valid[h, lengths[h] :].any()
        assert torch.equal(padded[h, : lengths[h]], k)
    # Round trips: the valid cells in row-major order are the rows, and (head, local index)
    # addresses each row's cell.
    assert torch.equal(index[valid], torch.arange(kv.rows))
    assert torch.equal(index[kv.head_ids(), kv.head_local_index()], torch.arange(kv.rows))
    assert bool(valid[kv.head_ids(), kv.head_local_index()].all())


@pytest.mark.parametrize("heads,t", [(2, 5), (3, 1), (4, 0), (1, 3)])
def test_from_dense_round_trips_through_padded_index(heads, t):
    g = torch.Generator().manual_seed(heads * 10 + t)
    keys, values = torch.randn(heads, t, HEAD_DIM, generator=g), torch.randn(heads, t, HEAD_DIM, generator=g)
    shared = torch.arange(10, 10 + t)
    kv = RaggedKV.from_dense(keys, values, shared)
    _check_layout(kv)
    assert kv.lengths == (t,) * heads
    _equal_heads(kv, [(keys[h], values[h], shared) for h in range(heads)])
    index, valid = kv.padded_index()
    assert bool(valid.all())
    if t:
        assert torch.equal(kv.keys[index], keys) and torch.equal(kv.values[index], values)
    # Per-head positions [heads, t].
    own = torch.stack([torch.arange(t) * (h + 1) for h in range(heads)])
    kv2 = RaggedKV.from_dense(keys, values, own)
    _equal_heads(kv2, [(keys[h], values[h], own[h]) for h in range(heads)])


def test_empty():
    kv = RaggedKV.empty(3, HEAD_DIM, torch.float16, "cpu")
    _check_layout(kv)
    assert kv.lengths == (0, 0, 0) and kv.keys.dtype == torch.float16 and kv.head_dim == HEAD_DIM
    index, valid = kv.padded_index()
    assert index.shape == valid.shape == (3, 0)
    assert kv.head_ids().numel() == 0 and kv.head_counts(torch.zeros(0, dtype=torch.bool)).tolist() == [0, 0, 0]


@pytest.mark.parametrize("parts", [
    [(3, 0, 1), (2, 2, 0), (0, 1, 4)],
    [(0, 0, 0), (1, 0, 2)],
    [(1, 0, 2), (0, 0, 0)],
    [(0, 0), (0, 0)],
    [(2, 5)],
    [(1, 1), (1, 1), (1, 1), (0, 3)],
], ids=str)
def test_cat_keeps_per_head_order(parts):
    # Parts cover increasing position ranges, as the builder concatenates them.
    layers = [_random(lengths, seed=i).shifted(100 * i) for i, lengths in enumerate(parts)]
    kv = RaggedKV.cat(layers)
    _check_layout(kv)
    heads = len(parts[0])
    assert kv.lengths == tuple(sum(p[h] for p in parts) for h in range(heads))
    expected = []
    for h in range(heads):
        rows = [_heads(layer)[h] for layer in layers]
        expected.append(tuple(torch.cat([r[i] for r in rows]) for i in range(3)))
    _equal_heads(kv, expected)
    # The device offsets are the sum of the parts' (the builder passes them on, never re-synced).
    assert kv.offsets.tolist() == torch.stack([p.offsets for p in layers]).sum(0).tolist()


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("pattern", ["random", "none", "all", "first-per-head"])
def test_take_and_where_equal_boolean_indexing_per_head(lengths, pattern):
    kv = _random(lengths, seed=2)
    g = torch.Generator().manual_seed(3)
    if pattern == "random":
        mask = torch.rand(kv.rows, generator=g) < 0.5
    elif pattern == "none":
        mask = torch.zeros(kv.rows, dtype=torch.bool)
    elif pattern == "all":
        mask = torch.ones(kv.rows, dtype=torch.bool)
    else:
        mask = kv.head_local_index() == 0
    expected = [(k[m], v[m], p[m]) for (k, v, p), m in zip(_heads(kv), mask.split(list(lengths)))]
    counts = kv.head_counts(mask)
    lengths_kept = counts.tolist()
    for got in (kv.take(mask, lengths_kept, counts), kv.take(mask, lengths_kept), kv.where(mask)):
        _check_layout(got)
        assert list(got.lengths) == lengths_kept
        _equal_heads(got, expected)


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("lo,hi", [(0, 100), (20, 60), (50, 51), (30, 30), (200, 300)])
def test_span_selects_positions_in_range(lengths, lo, hi):
    kv = _random(lengths, seed=4)
    got = kv.span(lo, hi)
    _check_layout(got)
    _equal_heads(got, [(k[(p >= lo) & (p < hi)], v[(p >= lo) & (p < hi)], p[(p >= lo) & (p < hi)])
                       for k, v, p in _heads(kv)])


def test_cat_then_span_recovers_each_segment():
    # A layer assembled from segments (the pack) and cut back into them (Pack.segments).
    segments = [_random((3, 0, 5), seed=5, limit=40), _random((0, 1, 2), seed=6, limit=40),
                _random((4, 4, 1), seed=7, limit=40)]
    starts = [10, 50, 90]
    layer = RaggedKV.cat([s.shifted(start) for s, start in zip(segments, starts)])
    for s, start in zip(segments, starts):
        back = layer.span(start, start + 40).shifted(-start)
        assert back.lengths == s.lengths
        _equal_heads(back, _heads(s))


def test_to_shifted_and_replace():
    kv = _random((2, 0, 3), seed=8)
    half = kv.to("cpu", torch.float16)
    assert half.keys.dtype == half.values.dtype == torch.float16 and half.positions.dtype == torch.int64
    assert half.lengths == kv.lengths and torch.equal(half.offsets, kv.offsets)
    assert torch.equal(half.keys.float(), kv.keys.half().float())
    assert kv.shifted(0) is kv
    moved = kv.shifted(7)
    assert torch.equal(moved.positions, kv.positions + 7) and torch.equal(moved.keys, kv.keys)
    keys = torch.zeros_like(kv.keys)
    other = kv.replace(keys=keys)
    assert other.keys is keys and other.values is kv.values and other.lengths == kv.lengths
