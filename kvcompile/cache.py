"""A transformers ``Cache`` whose past is a pack's ragged, per-head compressed KV.

The prefix (the compiled corpus) is shared and never written to: each question gets its
own :class:`PackCache`, which only appends its own tokens, so questions are independent
and a pack loaded once serves any number of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class Prefix:
    """The compressed KV of one layer, post-RoPE, ready to attend over.

    keys, values: per KV head ``[n_h, head_dim]``.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class PackLayer(CacheLayerMixin):
    """One layer: a ragged prefix plus the dense tokens appended since."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, prefix: Prefix, start: int, capture_queries: int = 0):
        super().__init__()
        self.prefix_keys = prefix.keys
        self.prefix_values = prefix.values
        self.start = start
        self.capture_queries = capture_queries
        self.queries: torch.Tensor | None = None
        ref = prefix.keys[0]
        self.keys = ref.new_empty(1, len(prefix.keys), 0, ref.shape[-1])
        self.values = self.keys.clone()
        self.dtype, self.device = ref.dtype, ref.device
        self.is_initialized = True

    @property
    def num_heads(self) -> int:
        return len(self.prefix_keys)

    def lazy_initialization(self, key_states, value_states) -> None:  # initialised in __init__
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_heads, t, head_dim]``; hand the layer itself to the attention.

        Returning the layer (not tensors) makes any attention function other than
        ``"kvcompile"`` fail loudly instead of silently ignoring the pack.
        """
        if self.keys.shape[0] != key_states.shape[0]:
            self.keys = self.keys.expand(key_states.shape[0], -1, -1, -1)
            self.values = self.values.expand(key_states.shape[0], -1, -1, -1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self, self

    def get_seq_length(self) -> int:
        return self.start + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.keys[..., :0, :]
        self.values = self.values[..., :0, :]


class PackCache(Cache):
    """The cache of one question (or, at build time, one chunk) over a compressed prefix.

    ``start`` is the position of the first appended token: where a question would have
    stood after the full corpus (or after the compacted one).
    """

    def __init__(self, prefixes: list[Prefix], start: int, capture_queries: int = 0):
        super().__init__(layers=[PackLayer(p, start, capture_queries) for p in prefixes])
        self.start = start

    def prefix_tokens(self) -> int:
        """Kept prefix tokens summed over layers and KV heads."""
        return sum(k.shape[0] for layer in self.layers for k in layer.prefix_keys)
