"""Attention over a pack's ragged prefix plus the dense new tokens, one call per layer.

A pack keeps a different number of tokens per KV head, stored ragged
(:class:`~kvcompile.ragged.RaggedKV`). Tokens that arrive after it (a question,
generated tokens, or at build time the next corpus chunk and the task prompt) are dense,
``[batch, kv_heads, t, head_dim]``, and attend causally among themselves and to the
whole prefix of their head.

Two implementations of the same function, both one call per layer for all heads:

- on CUDA, the Triton kernel :func:`kvcompile.kernels.attention.ragged_attention`, which
  reads the ragged rows directly (flash-decoding, split over the prefix); a prefix that
  stays integer-coded (:class:`~kvcompile.encoded.EncodedKV`) is read as codes by
  :func:`kvcompile.kernels.quant_attention.quant_attention` instead, never decoded to memory;
- elsewhere, :func:`padded_attention`: the layer's prefix is padded to its longest head
  once per question (:class:`~kvcompile.cache.PackLayer` keeps it in the same buffer as
  the new tokens, with a bias channel that hides the padding), and a single SDPA call
  attends over it. Padding costs
  compute, not storage: the pack and the loaded prefix stay ragged.

Two variants read the same layer when a question asks for them: RocketKV's sparse decode
(:mod:`kvcompile.sparse`: each decode step attends only to the rows its query chooses) and
APE's boundary repair for segments chosen per question (:mod:`kvcompile.repair`).

Both are registered with transformers' ``AttentionInterface`` as ``"kvcompile"``. The
model is switched to it only inside :func:`pack_attention`, and back on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface

from . import sparse
from .encoded import EncodedKV

ATTN_IMPLEMENTATION = "kvcompile"

# cuDNN attention builds a new plan for every new shape, and a decode step's shape is new
# every step; these backends do not re-plan (only reached on CUDA when the kernel is off).
_STABLE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """Bool mask ``[q_len, kv_len]``, True where attending is allowed.

    Aligned bottom-right: the queries are the last ``q_len`` of the ``kv_len`` keys.
    ``None`` when nothing is masked (a single query sees everything).
    """
    if q_len == 1:
        return None
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def padding_bias(dtype: torch.dtype) -> float:
    """The bias channel's value on padded rows: far below any real score at any usual scale
    (fp16: -4094; bf16 and fp32: -2e37), and far from overflowing when scaled or summed.
    Every query also sees at least one real key (itself), so no row is all padding."""
    return torch.finfo(dtype).min / 16


def padded_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """The reference: one SDPA call over ``[prefix padded to the longest head | new tokens]``.

    query: ``[batch, q_heads, q_len, head_dim]``, the last ``q_len`` of the new tokens.
    keys, values: ``[batch, kv_heads, pad + t, head_dim + 1]``: each head's prefix padded
        to ``pad`` rows, then the ``t`` new tokens. The extra channel of ``keys`` is a
        bias, 0 on real rows and :func:`padding_bias` on padding; that of ``values`` is 0.
    Returns ``[batch, q_len, q_heads, head_dim]`` (transformers' layout).

    The query gets a channel of ones, so padding is hidden by the scores themselves and
    the only mask is the causal one among the new tokens (``[q_len, pad + t]``, shared by
    all heads). A mask per head and query would cost more than the attention on a CPU.
    """
    q_len, kv_len = query.shape[2], keys.shape[2]
    query = torch.cat([query, query.new_ones(*query.shape[:-1], 1)], dim=-1)
    mask = causal_mask(q_len, kv_len, query.device)  # bottom-right: the whole prefix is visible
    if query.is_cuda:
        with sdpa_kernel(_STABLE_BACKENDS):
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out[..., :-1].transpose(1, 2)


def masked_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                     key_positions: torch.Tensor, query_positions: torch.Tensor, scaling: float,
                     window: int | None = None, softcap: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention by positions, for layers with a sliding window or a logit softcap.

    query: ``[batch, q_heads, q_len, head_dim]``; keys, values: ``[batch, kv_heads, L,
    head_dim]``; valid, key_positions: ``[kv_heads, L]``; query_positions: ``[q_len]``.
    A query at position p sees the valid keys at positions k <= p, and with ``window``
    only k > p - window (transformers' convention); scores are capped as
    ``softcap * tanh(s / softcap)`` before the mask. ``sinks [q_heads]`` are logits of a
    key that every query sees and that has no value (gpt-oss's ``s_aux``): they only add
    to the softmax's denominator. Softmax in fp32, as the models' own eager attention
    does. Returns ``[batch, q_len, q_heads, head_dim]``.

    Keys are placed by position, so this is exact for any per-head selection; it is the
    reference path (on every device) for the layers that need it.
    """
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = (query @ keys.transpose(-1, -2)).float() * scaling  # [batch, q_heads, q_len, L]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    seen = key_positions[:, None, :] <= query_positions[None, :, None]  # [kv_heads, q_len, L]
    if window is not None:
        seen &= key_positions[:, None, :] > query_positions[None, :, None] - window
    seen &= valid[:, None, :]
    scores = scores.masked_fill(~seen.repeat_interleave(groups, 0), float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = probs.to(values.dtype) @ values
    return out.transpose(1, 2)


def _by_position(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded PackLayer as ``keys, values [batch, kv_heads, L, head_dim]`` (views of its
    buffer), ``valid`` and ``positions [kv_heads, L]``: the prefix, then the new tokens."""
    p, t = layer.rows(), layer.length
    index, valid = p.padded_index()
    new_positions = torch.arange(layer.start, layer.start + t, device=index.device).expand(p.heads, t)
    positions = torch.cat([p.positions[index], new_positions], dim=1)
    valid = torch.cat([valid, valid.new_ones(p.heads, t)], dim=1)
    return layer.padded_keys[..., :-1], layer.padded_values[..., :-1], valid, positions


@cache
def _kernel():
    """The Triton kernel, or None where Triton is missing (then CUDA uses the reference too)."""
    try:
        from .kernels import attention
    except ImportError:
        return None
    return attention.ragged_attention


def uses_kernel(device: torch.device) -> bool:
    """Whether attention on ``device`` runs the Triton kernel (else the padded reference)."""
    return device.type == "cuda" and _kernel() is not None


def kvcompile_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls once ``"kvcompile"`` is selected.

    With a :class:`~kvcompile.cache.PackLayer` as ``key`` it attends over the pack; with
    plain tensors (no pack cache in use) it is ordinary causal attention. transformers
    builds no padding mask for this implementation, so batches with left padding are not
    supported inside :func:`pack_attention` (kvcompile's own calls never pad).
    """
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    # Some models keep their window on the module and apply it only through the mask they
    # build, which this function never sees (Qwen2-MoE): read it there when not passed.
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    layer = key
    features = window is not None or softcap is not None or sinks is not None
    if features and (isinstance(key, torch.Tensor) or layer.pad is not None):
        if isinstance(key, torch.Tensor):
            kv_len, q_len = key.shape[2], query.shape[2]
            positions = torch.arange(kv_len, device=query.device).expand(key.shape[1], kv_len)
            valid = torch.ones_like(positions, dtype=torch.bool)
            out = masked_attention(query, key, value, valid, positions, positions[0, kv_len - q_len:], scaling,
                                   window, softcap, sinks)
            return out.contiguous(), None
        if layer.capture_queries:
            layer.queries = query[:, :, -layer.capture_queries :].detach()
        keys, values, valid, positions = _by_position(layer)
        end = layer.start + layer.length
        q_positions = torch.arange(end - query.shape[2], end, device=query.device)
        return masked_attention(query, keys, values, valid, positions, q_positions, scaling, window,
                                softcap, sinks).contiguous(), None
    if isinstance(key, torch.Tensor):
        mask = causal_mask(query.shape[2], key.shape[2], query.device)
        if attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4:
            mask = attention_mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    if layer.capture_queries:
        # The scorer reads the probe tokens' queries after the forward pass.
        layer.queries = query[:, :, -layer.capture_queries :].detach()
    if layer.repair is not None:  # segments chosen per question, with APE's boundary repair
        return layer.repair.attend(query, layer.rows(), layer.new_keys, layer.new_values, scaling), None
    if layer.sparse is not None and query.shape[2] == 1:  # a decode step: RocketKV's hybrid sparse attention
        return sparse.attend(query, layer.rows(), layer.sparse, layer.new_keys, layer.new_values, scaling,
                             kernel=layer.pad is None), None
    if layer.pad is None:
        if isinstance(layer.prefix, EncodedKV) and window is None and layer.prefix.attends_encoded:
            return layer.prefix.attend(query, layer.new_keys, layer.new_values, scaling, softcap, sinks), None
        p = layer.rows()
        out = _kernel()(query, p.keys, p.values, p.offsets, p.max_len, layer.new_keys, layer.new_values, scaling,
                        prefix_positions=p.positions, start=layer.start, window=window, softcap=softcap,
                        sinks=sinks)
        return out, None
    return padded_attention(query, layer.padded_keys, layer.padded_values, scaling).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, kvcompile_attention)


@contextmanager
def pack_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block, ``model`` attends with ``"kvcompile"``; when the last open block
    exits, with what it had before.

    Blocks may nest or interleave (two answers streamed in turn on one model): a count on
    the model keeps it switched until every block has exited.
    """
    depth = getattr(model, "_kvcompile_scopes", 0)
    if depth == 0:
        model._kvcompile_previous = model.config._attn_implementation
        if model._kvcompile_previous != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model._kvcompile_scopes = depth + 1
    try:
        yield model
    finally:
        model._kvcompile_scopes -= 1
        if model._kvcompile_scopes == 0 and model._kvcompile_previous != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(model._kvcompile_previous)
