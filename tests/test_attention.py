"""Attention over a ragged prefix, RoPE outside the model, and the budget policy."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvcompile.attention import causal_mask, kvcompile_attention, ragged_attention, use_pack_attention
from kvcompile.cache import PackCache, Prefix
from kvcompile.rope import Rotary
from kvcompile.selection import layer_budget, select

pytestmark = pytest.mark.usefixtures("torch_single_thread")

HEAD_DIM = 16


def _reference(query, prefix_keys, prefix_values, keys, values, scaling):
    """Head by head, in float64, with an explicit mask: query i is new token t - q_len + i."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads, t = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros(batch, q_heads, q_len, query.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for qh in range(q_heads):
            h = qh // group
            k = torch.cat([prefix_keys[h], keys[b, h]]).double()
            v = torch.cat([prefix_values[h], values[b, h]]).double()
            n = prefix_keys[h].shape[0]
            for i in range(q_len):
                visible = n + (t - q_len + i) + 1  # the whole prefix, then new tokens up to itself
                s = (k[:visible] @ query[b, qh, i].double()) * scaling
                out[b, qh, i] = torch.softmax(s, dim=0) @ v[:visible]
    return out


def _random(seed, batch, q_heads, kv_heads, q_len, t, prefix_lengths):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_heads, q_len, HEAD_DIM, generator=g)
    keys = torch.randn(batch, kv_heads, t, HEAD_DIM, generator=g)
    values = torch.randn(batch, kv_heads, t, HEAD_DIM, generator=g)
    pk = [torch.randn(n, HEAD_DIM, generator=g) for n in prefix_lengths]
    pv = [torch.randn(n, HEAD_DIM, generator=g) for n in prefix_lengths]
    return query, pk, pv, keys, values


# ----------------------------------------------------------------------------- ragged attention


@pytest.mark.parametrize("q_len,t", [(1, 1), (5, 5), (3, 7), (1, 4)])
def test_ragged_attention_equals_dense_causal_sdpa(q_len, t):
    # Every KV head's prefix holds all previous tokens: then it is ordinary causal attention.
    batch, q_heads, kv_heads, n = 2, 4, 2, 11
    g = torch.Generator().manual_seed(q_len * 10 + t)
    full_k = torch.randn(batch, kv_heads, n + t, HEAD_DIM, generator=g)
    full_v = torch.randn(batch, kv_heads, n + t, HEAD_DIM, generator=g)
    q_all = torch.randn(batch, q_heads, n + t, HEAD_DIM, generator=g)
    # The prefix is shared by the batch, so use batch element 0's prefix for all.
    full_k[1, :, :n] = full_k[0, :, :n]
    full_v[1, :, :n] = full_v[0, :, :n]
    scaling = HEAD_DIM**-0.5
    dense = F.scaled_dot_product_attention(
        q_all, full_k.repeat_interleave(2, dim=1), full_v.repeat_interleave(2, dim=1), is_causal=True, scale=scaling
    )[:, :, -q_len:]
    query = q_all[:, :, -q_len:]
    pk = [full_k[0, h, :n] for h in range(kv_heads)]
    pv = [full_v[0, h, :n] for h in range(kv_heads)]
    out = ragged_attention(query, pk, pv, full_k[:, :, n:], full_v[:, :, n:], scaling)
    assert out.shape == (batch, q_heads, q_len, HEAD_DIM)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len,t", [(1, 1), (5, 5), (2, 6)])
@pytest.mark.parametrize("prefix_lengths", [(7, 3), (0, 9), (12, 12)], ids=["7-3", "empty-9", "equal"])
def test_ragged_attention_with_per_head_prefixes_matches_the_reference(q_len, t, prefix_lengths):
    query, pk, pv, keys, values = _random(sum(prefix_lengths) + q_len, 2, 4, 2, q_len, t, prefix_lengths)
    scaling = 0.3
    out = ragged_attention(query, pk, pv, keys, values, scaling)
    torch.testing.assert_close(out.double(), _reference(query, pk, pv, keys, values, scaling), atol=1e-5, rtol=1e-5)


def test_ragged_attention_heads_are_independent():
    # Changing head 1's prefix changes only the query heads of its group (2 and 3).
    query, pk, pv, keys, values = _random(0, 1, 4, 2, 5, 5, (6, 4))
    before = ragged_attention(query, pk, pv, keys, values, 0.25)
    pk2 = [pk[0], torch.randn(4, HEAD_DIM)]
    after = ragged_attention(query, pk2, pv, keys, values, 0.25)
    torch.testing.assert_close(before[:, :2], after[:, :2])
    assert not torch.allclose(before[:, 2:], after[:, 2:])


def test_causal_mask_is_bottom_right_aligned():
    assert causal_mask(1, 5, torch.device("cpu")) is None
    m = causal_mask(2, 5, torch.device("cpu"))
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_kvcompile_attention_on_plain_tensors_is_causal_sdpa():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 6, HEAD_DIM, generator=g)
    k = torch.randn(1, 2, 6, HEAD_DIM, generator=g)
    v = torch.randn(1, 2, 6, HEAD_DIM, generator=g)
    out, _ = kvcompile_attention(None, q, k, v, None, scaling=0.25)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True,
                                           scale=0.25)
    torch.testing.assert_close(out, dense.transpose(1, 2))


@torch.no_grad()
def test_pack_cache_over_a_full_prefix_equals_a_plain_forward(tiny_lm):
    # The model with the "kvcompile" attention and a PackCache holding every context
    # token (post-RoPE, as a Prefix per KV head) gives the logits of one plain forward.
    model = tiny_lm.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=g)
    context, question = ids[:, :33], ids[:, 33:]
    use_pack_attention(model)
    full = model(ids, use_cache=False).logits[0, 33:]
    dc = DynamicCache(config=model.config)
    model(context, past_key_values=dc, use_cache=True)
    prefixes = [Prefix([layer.keys[0, h] for h in range(layer.keys.shape[1])],
                       [layer.values[0, h] for h in range(layer.values.shape[1])]) for layer in dc.layers]
    cache = PackCache(prefixes, start=33)
    assert cache.get_seq_length() == 33 and cache.prefix_tokens() == 2 * 2 * 33
    got = model(question, past_key_values=cache, use_cache=True).logits[0]
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
    # Dropping prefix tokens changes the answer: the comparison above can fail.
    pruned = [Prefix([k[5:] for k in p.keys], [v[5:] for v in p.values]) for p in prefixes]
    other = model(question, past_key_values=PackCache(pruned, start=33), use_cache=True).logits[0]
    assert not torch.allclose(other, full, atol=1e-3)


# ----------------------------------------------------------------------------- RoPE


@pytest.fixture(scope="module")
def rotary(tiny_lm):
    r = Rotary.of(tiny_lm.model)
    assert r is not None
    return r


def test_rope_round_trip(rotary):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, HEAD_DIM, generator=g)
    positions = torch.cat([torch.arange(8), torch.randperm(4096, generator=g)[:56]])
    rotated = rotary.apply(x, positions)
    assert not torch.allclose(rotated[8:], x[8:], atol=1e-3)  # it does rotate
    back = rotary.undo(rotated, positions)
    assert (back - x).abs().max() < 1e-5
    # Position 0 is the identity rotation.
    torch.testing.assert_close(rotated[0], x[0])


def test_rope_equals_the_models_rotation(rotary, tiny_lm):
    rope_module = tiny_lm.model.model.rotary_emb
    g = torch.Generator().manual_seed(1)
    heads, tokens = 2, 20
    q = torch.randn(1, heads, tokens, HEAD_DIM, generator=g)
    k = torch.randn(1, heads, tokens, HEAD_DIM, generator=g)
    positions = torch.randperm(4096, generator=g)[:tokens].sort().values
    cos, sin = rope_module(k, positions[None])
    _, k_model = apply_rotary_pos_emb(q, k, cos, sin)
    for h in range(heads):
        torch.testing.assert_close(rotary.apply(k[0, h], positions), k_model[0, h], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rotary.undo(k_model[0, h], positions), k[0, h], atol=1e-5, rtol=1e-5)


def test_rope_undo_inverts_scaled_rope():
    # YaRN scales cos and sin by attention_scaling != 1; undo must still invert apply.
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM, max_position_embeddings=4096,
                      rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                       "original_max_position_embeddings": 1024})
    module = LlamaRotaryEmbedding(cfg)
    assert module.attention_scaling != pytest.approx(1.0)
    r = Rotary(module, torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, HEAD_DIM, generator=g)
    p = torch.randperm(4096, generator=g)[:30]
    rotated = r.apply(x, p)
    assert float(rotated.norm()) == pytest.approx(module.attention_scaling * float(x.norm()), rel=1e-4)
    assert (r.undo(rotated, p) - x).abs().max() < 1e-5


# ----------------------------------------------------------------------------- selection


def _kept_total(kept):
    return sum(k.numel() for k in kept)


def test_select_keeps_protected_tokens_and_exactly_the_budget():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(50, generator=g), torch.rand(40, generator=g), torch.rand(30, generator=g)]
    protected = [torch.arange(50) < 4, torch.arange(40) < 4, torch.arange(30) < 4]
    for s in scores:
        s[:4] = -100.0  # the protected tokens score worst of all
    kept = select(scores, 36, protected, head_floor=0.2)
    assert _kept_total(kept) == 36
    for k in kept:
        assert set(range(4)) <= set(k.tolist())
        assert torch.equal(k, k.sort().values) and k.unique().numel() == k.numel()  # ascending, unique


def test_select_keeps_the_best_scores():
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(20, generator=g) for _ in range(2)]
    none = [torch.zeros(20, dtype=torch.bool)] * 2
    kept = select(scores, 10, none, head_floor=0.0)
    # Without a floor or protection: the 10 best of the layer, whichever head.
    flat = torch.cat(scores)
    best = set(flat.topk(10).indices.tolist())
    got = {h * 20 + i for h, k in enumerate(kept) for i in k.tolist()}
    assert got == best


def test_select_clamps_the_budget_to_what_exists():
    scores = [torch.rand(3), torch.rand(2)]
    kept = select(scores, 100, [torch.zeros(3, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)])
    assert [k.tolist() for k in kept] == [[0, 1, 2], [0, 1]]


def test_select_ties_are_deterministic_by_head_then_position():
    scores = [torch.ones(10), torch.ones(10)]
    none = [torch.zeros(10, dtype=torch.bool)] * 2
    a = select(scores, 8, none, head_floor=0.5)
    b = select([s.clone() for s in scores], 8, none, head_floor=0.5)
    assert [k.tolist() for k in a] == [k.tolist() for k in b]
    # floor = int(0.5 * 8 / 2) = 2 per head; the other 4 go to head 0 (first), lowest positions first.
    assert [k.tolist() for k in a] == [[0, 1, 2, 3, 4, 5], [0, 1]]
    c = select(scores, 8, none, head_floor=0.0)
    assert [k.tolist() for k in c] == [list(range(8)), []]


def test_select_honours_the_head_floor_and_lets_heads_differ():
    g = torch.Generator().manual_seed(2)
    heads, n, budget = 3, 100, 60
    # Head 0 scores far above the others: it takes everything beyond the floors.
    scores = [torch.rand(n, generator=g) + 10, torch.rand(n, generator=g), torch.rand(n, generator=g)]
    none = [torch.zeros(n, dtype=torch.bool)] * heads
    kept = select(scores, budget, none, head_floor=0.25)
    floor = int(0.25 * budget / heads)
    counts = [k.numel() for k in kept]
    assert counts == [budget - 2 * floor, floor, floor]
    assert sum(counts) == budget
    # The floor keeps each weak head's own best tokens.
    for h in (1, 2):
        assert set(kept[h].tolist()) == set(scores[h].topk(floor).indices.tolist())
    # With a floor of 1 every head gets its even share: no head can starve.
    even = select(scores, budget, none, head_floor=1.0)
    assert [k.numel() for k in even] == [budget // heads] * heads


def test_select_with_more_protected_tokens_than_budget_keeps_them_all():
    scores = [torch.rand(10), torch.rand(10)]
    protected = [torch.arange(10) < 6, torch.arange(10) < 6]
    kept = select(scores, 4, protected)
    assert [k.tolist() for k in kept] == [list(range(6)), list(range(6))]


def test_layer_budget_grows_with_the_corpus_seen():
    target, total, heads = 100, 1000, 2
    budgets = [layer_budget(target, seen, total, heads) for seen in range(0, total + 1, 64)] + \
        [layer_budget(target, total, total, heads)]
    assert budgets[0] == 0
    assert all(a <= b for a, b in itertools.pairwise(budgets))
    assert budgets[-1] == heads * target
    assert all(b % heads == 0 for b in budgets)
    assert layer_budget(target, 64, total, heads) == heads * math.ceil(target * 64 / total) == 14
    # Never below the share of the corpus seen so far.
    for seen in range(1, total + 1, 37):
        assert layer_budget(target, seen, total, heads) >= heads * target * seen / total
