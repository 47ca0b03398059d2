"""Attention over a ragged prefix (through the pack's cache), its scope on the model,
RoPE outside the model, and the budget policy."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvcompile.attention import (
    ATTN_IMPLEMENTATION,
    causal_mask,
    kvcompile_attention,
    pack_attention,
    padded_attention,
    padding_bias,
    uses_kernel,
)
from kvcompile.cache import PackCache, _cache_argument, forward
from kvcompile.ragged import RaggedKV
from kvcompile.rope import Rotary, rotaries
from kvcompile.selection import layer_budget, select

pytestmark = pytest.mark.usefixtures("torch_single_thread")

HEAD_DIM = 16


def _per_head(kv: RaggedKV) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per KV head, its prefix keys and values (cut with the host lengths)."""
    cut = list(kv.lengths)
    return list(kv.keys.split(cut)), list(kv.values.split(cut))


def _reference(query, prefix_keys, prefix_values, keys, values, scaling):
    """Head by head, in float64, with an explicit mask: query i is new token t - q_len + i.

    query ``[batch, q_heads, q_len, D]``; prefix_keys/values: per KV head ``[n_h, D]``;
    keys/values: every new token so far, ``[batch, kv_heads, t, D]``.
    """
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


def _prefix(lengths, seed: int) -> RaggedKV:
    """A random ragged prefix with ``lengths[h]`` rows for KV head ``h``."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    positions = torch.cat([torch.arange(k) for k in lengths]) if lengths else torch.empty(0, dtype=torch.int64)
    return RaggedKV.from_rows(torch.randn(n, HEAD_DIM, generator=g), torch.randn(n, HEAD_DIM, generator=g),
                              positions, lengths)


def _run(prefix: RaggedKV, steps, batch: int, group: int, capacity: int, seed: int, scaling: float = 0.3):
    """Append each step's ``t`` new tokens to a PackCache over ``prefix`` and attend with the
    last ``q_len`` of them through ``kvcompile_attention``; compare every step with the
    float64 reference. Returns the cache's layer."""
    g = torch.Generator().manual_seed(seed)
    kv_heads, q_heads = prefix.heads, prefix.heads * group
    pk, pv = _per_head(prefix)
    cache = PackCache([prefix], start=1000, capacity=capacity)
    layer = cache.layers[0]
    assert not uses_kernel(prefix.keys.device) and layer.pad == prefix.max_len  # the reference path on CPU
    new_k, new_v = [], []
    for t, q_len in steps:
        k = torch.randn(batch, kv_heads, t, HEAD_DIM, generator=g)
        v = torch.randn(batch, kv_heads, t, HEAD_DIM, generator=g)
        q = torch.randn(batch, q_heads, q_len, HEAD_DIM, generator=g)
        got_k, got_v = layer.update(k, v)
        assert got_k is layer and got_v is layer
        out, weights = kvcompile_attention(None, q, got_k, got_v, None, scaling=scaling)
        assert weights is None and out.shape == (batch, q_len, q_heads, HEAD_DIM)
        new_k.append(k)
        new_v.append(v)
        expected = _reference(q, pk, pv, torch.cat(new_k, 2), torch.cat(new_v, 2), scaling)
        torch.testing.assert_close(out.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)
    total = sum(t for t, _ in steps)
    assert layer.length == total and cache.get_seq_length() == 1000 + total
    assert torch.equal(layer.new_keys, torch.cat(new_k, 2)) and torch.equal(layer.new_values, torch.cat(new_v, 2))
    return layer


# ----------------------------------------------------------------------------- the padded reference


@pytest.mark.parametrize("lengths", [(7, 3), (0, 9), (1, 0, 4, 1), (5,), (0, 0), (12, 12)], ids=str)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("steps", [((1, 1),), ((5, 5),), ((7, 3),), ((4, 4), (1, 1), (1, 1), (6, 6), (2, 1))],
                         ids=["decode", "prefill", "q<t", "several"])
def test_padded_attention_through_the_cache_matches_a_float64_reference(lengths, group, batch, steps):
    seed = sum(lengths) * 100 + group * 10 + batch + len(steps)
    # capacity 2 is less than the first step of all but "decode": every buffer grows at least once.
    _run(_prefix(lengths, seed), steps, batch, group, capacity=2, seed=seed)


def test_the_cache_grows_repeatedly_and_keeps_every_token():
    prefix = _prefix((3, 0, 1, 6), seed=5)
    steps = [(2, 2), (1, 1), (300, 2), (1, 1), (700, 1), (3, 3)]
    capacities = []
    g = torch.Generator().manual_seed(6)
    cache = PackCache([prefix], start=10, capacity=4)
    layer = cache.layers[0]
    for t, _ in steps:
        layer.update(torch.randn(2, 4, t, HEAD_DIM, generator=g), torch.randn(2, 4, t, HEAD_DIM, generator=g))
        capacities.append(layer.buffer.shape[3] - layer.pad)
    assert capacities[0] == 4 and len(set(capacities)) >= 3  # grown twice at least
    # The same appends, checked step by step against the reference (batch 2, GQA 4 -> 16 query heads).
    _run(prefix, steps, batch=2, group=4, capacity=4, seed=7)
    # The padded prefix survives every reallocation in front of the new tokens.
    index, valid = prefix.padded_index()
    padded = layer.padded_keys[:, :, : layer.pad]
    assert torch.equal(padded[..., :-1][:, valid], prefix.keys[index][valid].expand(2, -1, -1))
    # The bias channel: 0 on real rows and on new tokens, a large negative on padding.
    assert (padded[..., -1][:, valid] == 0).all() and (padded[..., -1][:, ~valid] < -1e3).all()
    assert (layer.padded_keys[:, :, layer.pad :, -1] == 0).all()


@pytest.mark.parametrize("q_len,t", [(1, 1), (5, 5), (3, 7), (1, 4)])
def test_padded_attention_over_a_full_prefix_equals_dense_causal_sdpa(q_len, t):
    # Every KV head's prefix holds all previous tokens: then it is ordinary causal attention.
    batch, q_heads, kv_heads, n = 2, 4, 2, 11
    g = torch.Generator().manual_seed(q_len * 10 + t)
    full_k = torch.randn(batch, kv_heads, n + t, HEAD_DIM, generator=g)
    full_v = torch.randn(batch, kv_heads, n + t, HEAD_DIM, generator=g)
    q_all = torch.randn(batch, q_heads, n + t, HEAD_DIM, generator=g)
    scaling = HEAD_DIM**-0.5
    dense = F.scaled_dot_product_attention(
        q_all, full_k.repeat_interleave(2, dim=1), full_v.repeat_interleave(2, dim=1), is_causal=True, scale=scaling
    )[:, :, -q_len:]
    out = padded_attention(q_all[:, :, -q_len:], _with_bias(full_k), _with_bias(full_v), scaling)
    assert out.shape == (batch, q_len, q_heads, HEAD_DIM)
    torch.testing.assert_close(out, dense.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_padded_attention_ignores_what_the_mask_hides():
    # Garbage in the padding of a short head changes nothing.
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 3, HEAD_DIM, generator=g)
    k = torch.randn(1, 2, 6 + 3, HEAD_DIM, generator=g)
    v = torch.randn(1, 2, 6 + 3, HEAD_DIM, generator=g)
    padding = torch.zeros(1, 2, 9, dtype=torch.bool)
    padding[:, 1, 2:6] = True  # KV head 1 (query heads 2, 3) holds 2 prefix rows of 6
    before = padded_attention(q, _with_bias(k, padding), _with_bias(v), 0.25)
    k2, v2 = k.clone(), v.clone()
    k2[:, 1, 2:6] = 30.0  # scores far above the real rows'
    v2[:, 1, 2:6] = -1e4
    after = padded_attention(q, _with_bias(k2, padding), _with_bias(v2), 0.25)
    torch.testing.assert_close(before, after)
    # Without the bias the padding would dominate: the check can fail.
    assert not torch.allclose(before, padded_attention(q, _with_bias(k2), _with_bias(v2), 0.25))


def _with_bias(x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
    """``x [batch, kv_heads, rows, D]`` with the bias channel of the padded layout (0, or the
    padding bias where ``padding [batch, kv_heads, rows]``)."""
    bias = torch.zeros(*x.shape[:-1], 1, dtype=x.dtype)
    if padding is not None:
        bias[padding] = padding_bias(x.dtype)
    return torch.cat([x, bias], dim=-1)


def test_heads_are_independent():
    # Changing KV head 1's prefix changes only the query heads of its group (2 and 3).
    prefix = _prefix((6, 4), seed=0)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 5, HEAD_DIM, generator=g)
    k = torch.randn(1, 2, 5, HEAD_DIM, generator=g)
    v = torch.randn(1, 2, 5, HEAD_DIM, generator=g)

    def attend(p):
        layer = PackCache([p], start=10).layers[0]
        layer.update(k, v)
        return kvcompile_attention(None, q, layer, layer, None, scaling=0.25)[0]

    before = attend(prefix)
    keys = prefix.keys.clone()
    keys[6:] = torch.randn(4, HEAD_DIM, generator=g)
    after = attend(prefix.replace(keys=keys))
    torch.testing.assert_close(before[:, :, :2], after[:, :, :2])
    assert not torch.allclose(before[:, :, 2:], after[:, :, 2:])


def test_the_cache_captures_the_probe_queries():
    prefix = _prefix((2, 5), seed=2)
    cache = PackCache([prefix], start=7, capture_queries=3)
    layer = cache.layers[0]
    q = torch.randn(1, 4, 8, HEAD_DIM)
    layer.update(torch.randn(1, 2, 8, HEAD_DIM), torch.randn(1, 2, 8, HEAD_DIM))
    kvcompile_attention(None, q, layer, layer, None, scaling=0.25)
    assert torch.equal(layer.queries, q[:, :, -3:])
    assert cache.prefix_tokens() == 7 and cache.get_seq_length() == 15


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


# ----------------------------------------------------------------------------- on the model


@torch.no_grad()
def test_pack_cache_over_a_full_prefix_equals_a_plain_forward(tiny_lm):
    # The model with the "kvcompile" attention and a PackCache holding every context
    # token (post-RoPE, one RaggedKV per layer) gives the logits of one plain forward.
    model = tiny_lm.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=g)
    context, question = ids[:, :33], ids[:, 33:]
    full = model(ids, use_cache=False).logits[0, 33:]
    dc = DynamicCache(config=model.config)
    forward(model, context, dc)
    positions = torch.arange(33)
    kv = [RaggedKV.from_dense(layer.keys[0], layer.values[0], positions) for layer in dc.layers]
    cache = PackCache(kv, start=33)
    assert cache.get_seq_length() == 33 and cache.prefix_tokens() == 2 * 2 * 33
    with pack_attention(model):
        got = forward(model, question, cache).logits[0]
        torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
        # Dropping prefix tokens changes the answer: the comparison above can fail.
        pruned = [layer.span(5, 33) for layer in kv]
        assert all(p.lengths == (28, 28) for p in pruned)
        other = forward(model, question, PackCache(pruned, start=33)).logits[0]
    assert not torch.allclose(other, full, atol=1e-3)


@torch.no_grad()
def test_a_pack_cache_outside_pack_attention_fails_loudly(tiny_lm):
    # PackLayer.update hands the layer itself to the attention: any other implementation
    # errors instead of silently attending without the pack.
    model = tiny_lm.model
    assert model.config._attn_implementation == "sdpa"
    kv = [RaggedKV.empty(2, HEAD_DIM, torch.float32, "cpu")] * 2
    with pytest.raises((AttributeError, TypeError, RuntimeError)):
        forward(model, torch.tensor([[5, 6, 7]]), PackCache(kv, start=3))


# ----------------------------------------------------------------------------- scope


def test_pack_attention_is_scoped_and_restored_on_errors(tiny_lm):
    model = tiny_lm.model
    assert model.config._attn_implementation == "sdpa"
    with pack_attention(model) as m:
        assert m is model and model.config._attn_implementation == ATTN_IMPLEMENTATION
        with pack_attention(model):  # nested: the inner exit keeps the outer's
            assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(KeyError):
        with pack_attention(model):
            raise KeyError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_sessions_attend_with_the_pack_only_while_answering(tiny_lm, tiny_pack, monkeypatch):
    import kvcompile

    model = tiny_lm.model
    session = kvcompile.load(tiny_pack).session(tiny_lm)
    assert model.config._attn_implementation == "sdpa"
    assert session.ask("Where do orders ship from?", max_new_tokens=3).tokens >= 0
    assert model.config._attn_implementation == "sdpa"
    assert torch.isfinite(session.first_token_logits("Where do orders ship from?")).all()
    assert model.config._attn_implementation == "sdpa"
    assert math.isfinite(session.answer_nll("Where do orders ship from?", "Rotterdam"))
    assert model.config._attn_implementation == "sdpa"

    # A failure mid-question restores it too (and the block was entered).
    seen = []

    def failing_cache(capacity=0):
        seen.append(model.config._attn_implementation)
        raise RuntimeError("no cache today")

    monkeypatch.setattr(session, "cache", failing_cache)
    for call in (lambda: session.ask("Where?", max_new_tokens=2), lambda: session.first_token_logits("Where?"),
                 lambda: session.answer_nll("Where?", "Here")):
        with pytest.raises(RuntimeError, match="no cache today"):
            call()
        assert model.config._attn_implementation == "sdpa"
    assert seen == [ATTN_IMPLEMENTATION] * 3


def test_two_answers_streamed_in_turn_on_one_model(tiny_lm, tiny_pack):
    # Each stream holds the scope while it is open; interleaved, they must not switch the
    # model back under each other's feet, and both must equal their answers asked alone.
    import kvcompile

    session = kvcompile.load(tiny_pack).session(tiny_lm)
    alone = [session.ask(q, max_new_tokens=6).text for q in ("Where do orders ship from?", "Who founded it?")]
    a = session.stream("Where do orders ship from?", 6)
    b = session.stream("Who founded it?", 6)
    pieces_a, pieces_b = [next(a)], [next(b)]
    pieces_a += list(a)
    assert tiny_lm.model.config._attn_implementation == ATTN_IMPLEMENTATION  # b is still open
    pieces_b += list(b)
    assert ["".join(pieces_a).strip(), "".join(pieces_b).strip()] == alone
    assert tiny_lm.model.config._attn_implementation == "sdpa"


def test_a_build_attends_with_the_pack_only_while_compiling(tiny_lm, tiny_corpus, tmp_path, monkeypatch):
    import kvcompile.builder
    from kvcompile.builder import BuildOptions
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    model = tiny_lm.model
    build([tiny_corpus], tmp_path / "a.kvpack", tiny_lm, load_recipe("qa"), BuildOptions(ratio=0.5, chunk_size=256))
    assert model.config._attn_implementation == "sdpa"
    seen = []

    def failing_select(*args, **kwargs):
        seen.append(model.config._attn_implementation)
        raise RuntimeError("selection failed")

    monkeypatch.setattr(kvcompile.builder, "select", failing_select)
    with pytest.raises(RuntimeError, match="selection failed"):
        build([tiny_corpus], tmp_path / "b.kvpack", tiny_lm, load_recipe("qa"), BuildOptions(ratio=0.5, chunk_size=256))
    assert seen == [ATTN_IMPLEMENTATION]
    assert model.config._attn_implementation == "sdpa"
    assert not (tmp_path / "b.kvpack").exists()


# ----------------------------------------------------------------------------- the cache argument


class _CacheModel(torch.nn.Module):
    """A model of a transformers that calls the cache ``cache``."""

    def forward(self, input_ids, cache=None, use_cache=None, **kwargs):
        return {"cache": cache, "use_cache": use_cache, **kwargs}


class _PastKeyValuesModel(torch.nn.Module):
    """A model of a transformers that calls it ``past_key_values``."""

    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        return {"past_key_values": past_key_values, "use_cache": use_cache, **kwargs}


def test_forward_passes_the_cache_under_the_name_the_model_declares(tiny_lm):
    ids, cache = torch.tensor([[1, 2]]), object()
    got = forward(_CacheModel(), ids, cache, logits_to_keep=1)
    assert got == {"cache": cache, "use_cache": True, "logits_to_keep": 1}
    got = forward(_PastKeyValuesModel(), ids, cache, logits_to_keep=1)
    assert got == {"past_key_values": cache, "use_cache": True, "logits_to_keep": 1}
    assert forward(_CacheModel(), ids, None) == {"cache": None, "use_cache": False}
    assert forward(_PastKeyValuesModel(), ids, None) == {"past_key_values": None, "use_cache": False}
    # The real model gets an argument its forward declares.
    model = type(tiny_lm.model)
    assert _cache_argument(model) in inspect.signature(model.forward).parameters


# ----------------------------------------------------------------------------- RoPE


@pytest.fixture(scope="module")
def rotary(tiny_lm):
    r = rotaries(tiny_lm.model)[0]
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


def _candidates(sizes) -> RaggedKV:
    """Candidates with ``sizes[h]`` rows for head ``h`` (select reads only the layout)."""
    n = sum(sizes)
    positions = torch.cat([torch.arange(k) for k in sizes])
    return RaggedKV.from_rows(torch.zeros(n, HEAD_DIM), torch.zeros(n, HEAD_DIM), positions, sizes)


def _select(scores: list[torch.Tensor], budget: int, protected: list[torch.Tensor],
            head_floor: float = 0.2) -> list[torch.Tensor]:
    """``select`` on per-head scores; the kept row indices of each head, ascending."""
    sizes = [s.shape[0] for s in scores]
    mask = select(torch.cat(scores), _candidates(sizes), budget, torch.cat(protected), head_floor)
    assert mask.dtype == torch.bool and mask.shape == (sum(sizes),)
    return [m.nonzero().flatten() for m in mask.split(sizes)]


def _select_reference(scores: list[torch.Tensor], budget: int, protected: list[torch.Tensor],
                      head_floor: float) -> list[list[int]]:
    """The per-head semantics, written out with loops: protected rows are always kept;
    each head then takes its best unprotected rows up to ``floor`` (counting its protected
    ones), floor = int(head_floor * max(0, budget - n_protected) / heads); then the best
    remaining rows of any head until min(budget, N) are kept. Scores compare as float32;
    ties go to the lower (head, position)."""
    heads = len(scores)
    budget = min(budget, sum(len(s) for s in scores))
    rows = [(float(s), h, i) for h in range(heads) for i, s in enumerate(scores[h].float().tolist())]
    order = sorted(rows, key=lambda r: (-r[0], r[1], r[2]))  # best first
    kept = {(h, i) for h in range(heads) for i in range(len(scores[h])) if protected[h][i]}
    floor = int(head_floor * max(0, budget - len(kept)) / heads)
    for h in range(heads):
        want = floor - sum(1 for hh, _ in kept if hh == h)
        for _, hh, i in order:
            if want <= 0 or len(kept) >= budget:
                break
            if hh == h and (h, i) not in kept:
                kept.add((h, i))
                want -= 1
    for _, h, i in order:
        if len(kept) >= budget:
            break
        kept.add((h, i))
    return [sorted(i for hh, i in kept if hh == h) for h in range(heads)]


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("head_floor", [0.0, 0.2, 1.0])
def test_select_equals_the_per_head_reference(seed, head_floor):
    g = torch.Generator().manual_seed(seed)
    heads = 2 + seed % 4
    sizes = [int(torch.randint(0, 25, (1,), generator=g)) for _ in range(heads)]
    sizes[seed % heads] = seed % 2  # a head with no rows or a single row
    n = sum(sizes)
    if seed % 3 == 0:  # heavy ties: few distinct values
        scores = [torch.randint(0, 4, (k,), generator=g).float() / 3 for k in sizes]
    else:  # ties only in part; float64 scores that tie once cast to float32
        scores = [torch.rand(k, generator=g, dtype=torch.float64) for k in sizes]
        for s in scores:
            if len(s) > 3:
                s[1] = s[3] = 0.5
                s[2] = 0.5 + 1e-12
    # Heads on different scales (as normalised scores of heads of different lengths are), so
    # that the floor binds for the weak heads.
    scores = [s * 10.0 ** int(torch.randint(-2, 3, (1,), generator=g)) for s in scores]
    protected = [(torch.rand(k, generator=g) < 0.1) | (torch.arange(k) < seed % 3) for k in sizes]
    n_protected = int(sum(p.sum() for p in protected))
    budgets = {0, 1, max(0, n_protected - 1), n_protected, n_protected + 1, (n_protected + n) // 2, n - 1, n, n + 10,
               3 * heads, n // 4, n // 2, 3 * n // 4}
    for budget in sorted(budgets):
        got = [k.tolist() for k in _select(scores, budget, protected, head_floor)]
        assert got == _select_reference(scores, budget, protected, head_floor), (budget, sizes)
        assert sum(map(len, got)) == max(min(budget, n), n_protected)


@pytest.mark.parametrize("head_floor", [0.0, 0.2])
def test_select_over_stacked_layers_equals_one_select_per_layer(head_floor):
    # The compiler selects every layer at once (RaggedKV.stack); each layer keeps its own budget.
    g = torch.Generator().manual_seed(11)
    layers, heads = [], 3
    for li in range(4):
        lengths = [int(torch.randint(0, 30, (1,), generator=g)) for _ in range(heads)]
        lengths[li % heads] = li % 2  # empty and single-row heads
        n = sum(lengths)
        layers.append(RaggedKV.from_rows(torch.zeros(n, HEAD_DIM), torch.zeros(n, HEAD_DIM),
                                         torch.arange(n), lengths))
    stacked = RaggedKV.stack(layers)
    scores = torch.rand(stacked.rows, generator=g)
    scores[::7] = 0.5  # ties across layers too
    protected = torch.rand(stacked.rows, generator=g) < 0.1
    for budget in (0, 5, 20, 1000):
        got = select(scores, stacked, budget, protected, head_floor, layers=len(layers))
        expected, row = [], 0
        for layer in layers:
            part = slice(row, row + layer.rows)
            expected.append(select(scores[part], layer, budget, protected[part], head_floor))
            row += layer.rows
        assert torch.equal(got, torch.cat(expected)), budget


def test_select_keeps_protected_tokens_and_exactly_the_budget():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(50, generator=g), torch.rand(40, generator=g), torch.rand(30, generator=g)]
    protected = [torch.arange(50) < 4, torch.arange(40) < 4, torch.arange(30) < 4]
    for s in scores:
        s[:4] = -100.0  # the protected tokens score worst of all
    kept = _select(scores, 36, protected, head_floor=0.2)
    assert _kept_total(kept) == 36
    for k in kept:
        assert set(range(4)) <= set(k.tolist())
        assert torch.equal(k, k.sort().values) and k.unique().numel() == k.numel()  # ascending, unique


def test_select_keeps_the_best_scores():
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(20, generator=g) for _ in range(2)]
    none = [torch.zeros(20, dtype=torch.bool)] * 2
    kept = _select(scores, 10, none, head_floor=0.0)
    # Without a floor or protection: the 10 best of the layer, whichever head.
    flat = torch.cat(scores)
    best = set(flat.topk(10).indices.tolist())
    got = {h * 20 + i for h, k in enumerate(kept) for i in k.tolist()}
    assert got == best


def test_select_clamps_the_budget_to_what_exists():
    scores = [torch.rand(3), torch.rand(2)]
    kept = _select(scores, 100, [torch.zeros(3, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)])
    assert [k.tolist() for k in kept] == [[0, 1, 2], [0, 1]]


def test_select_ties_are_deterministic_by_head_then_position():
    scores = [torch.ones(10), torch.ones(10)]
    none = [torch.zeros(10, dtype=torch.bool)] * 2
    a = _select(scores, 8, none, head_floor=0.5)
    b = _select([s.clone() for s in scores], 8, none, head_floor=0.5)
    assert [k.tolist() for k in a] == [k.tolist() for k in b]
    # floor = int(0.5 * 8 / 2) = 2 per head; the other 4 go to head 0 (first), lowest positions first.
    assert [k.tolist() for k in a] == [[0, 1, 2, 3, 4, 5], [0, 1]]
    c = _select(scores, 8, none, head_floor=0.0)
    assert [k.tolist() for k in c] == [list(range(8)), []]


def test_select_honours_the_head_floor_and_lets_heads_differ():
    g = torch.Generator().manual_seed(2)
    heads, n, budget = 3, 100, 60
    # Head 0 scores far above the others: it takes everything beyond the floors.
    scores = [torch.rand(n, generator=g) + 10, torch.rand(n, generator=g), torch.rand(n, generator=g)]
    none = [torch.zeros(n, dtype=torch.bool)] * heads
    kept = _select(scores, budget, none, head_floor=0.25)
    floor = int(0.25 * budget / heads)
    counts = [k.numel() for k in kept]
    assert counts == [budget - 2 * floor, floor, floor]
    assert sum(counts) == budget
    # The floor keeps each weak head's own best tokens.
    for h in (1, 2):
        assert set(kept[h].tolist()) == set(scores[h].topk(floor).indices.tolist())
    # With a floor of 1 every head gets its even share: no head can starve.
    even = _select(scores, budget, none, head_floor=1.0)
    assert [k.numel() for k in even] == [budget // heads] * heads


def test_select_with_more_protected_tokens_than_budget_keeps_them_all():
    scores = [torch.rand(10), torch.rand(10)]
    protected = [torch.arange(10) < 6, torch.arange(10) < 6]
    kept = _select(scores, 4, protected)
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
