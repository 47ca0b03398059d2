"""Attention over a ragged, per-head compressed prefix plus the dense new tokens.

A pack keeps a different number of tokens for each KV head (per-head budgets), so the
cached prefix is a list of ``[n_h, head_dim]`` tensors, one per KV head, and nothing is
padded. Tokens that arrive after it (a question, generated tokens, or at build time the
next corpus chunk and the task prompt) are stored densely, ``[batch, kv_heads, t,
head_dim]``, and attend causally among themselves and to the whole prefix.

:func:`ragged_attention` is the reference: plain PyTorch, one SDPA call per KV head, so
it runs anywhere. It is registered with transformers' ``AttentionInterface`` under the
name ``"kvcompile"``; :class:`kvcompile.cache.PackCache` hands it its layer through the
``key`` argument (see ``PackLayer.update``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "kvcompile"


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """Bool mask ``[q_len, kv_len]``, True where attending is allowed.

    Aligned bottom-right: the queries are the last ``q_len`` of the ``kv_len`` keys.
    ``None`` when nothing is masked (a single query sees everything).
    """
    if q_len == 1:
        return None
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def ragged_attention(
    query: torch.Tensor,
    prefix_keys: list[torch.Tensor],
    prefix_values: list[torch.Tensor],
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention of ``query`` over ``[prefix of each KV head | dense new tokens]``.

    query: ``[batch, q_heads, q_len, head_dim]``, the last ``q_len`` of the new tokens.
    prefix_keys, prefix_values: per KV head ``[n_h, head_dim]``, shared by the batch.
    keys, values: ``[batch, kv_heads, t, head_dim]``, the new tokens (``t >= q_len``).
    Returns ``[batch, q_heads, q_len, head_dim]``.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, t = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    out = []
    for h in range(kv_heads):
        pk, pv = prefix_keys[h], prefix_values[h]
        n = pk.shape[0]
        k = torch.cat([pk.expand(batch, 1, n, head_dim), keys[:, h : h + 1]], dim=2)
        v = torch.cat([pv.expand(batch, 1, n, head_dim), values[:, h : h + 1]], dim=2)
        q = query[:, h * group : (h + 1) * group]
        mask = causal_mask(q_len, n + t, query.device)
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True))
    return torch.cat(out, dim=1)


def kvcompile_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls in place of SDPA once ``"kvcompile"`` is selected.

    With a :class:`~kvcompile.cache.PackLayer` as ``key`` it attends over the pack; with
    plain tensors (no pack cache in use) it is ordinary causal attention, so a model
    switched to this implementation still works for everything else.
    """
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = key
    if isinstance(key, torch.Tensor):
        mask = causal_mask(query.shape[2], key.shape[2], query.device)
        if attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4:
            mask = attention_mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    out = ragged_attention(query, layer.prefix_keys, layer.prefix_values, layer.keys, layer.values, scaling)
    if layer.capture_queries:
        # The scorer reads the probe tokens' queries after the forward pass.
        layer.queries = query[:, :, -layer.capture_queries :].detach()
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, kvcompile_attention)


def use_pack_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` to the ``"kvcompile"`` attention implementation (idempotent)."""
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
