"""A transformers ``Cache`` whose past is a pack's ragged, per-head compressed KV.

The prefix (the compiled corpus, one :class:`~kvcompile.ragged.RaggedKV` per layer) is
shared and never written to: each question gets its own :class:`PackCache`, which only
appends its own tokens to a preallocated buffer, written in place, so questions are
independent and a pack loaded once serves any number of them.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import padding_bias, uses_kernel
from .encoded import EncodedKV
from .ragged import RaggedKV
from .repair import ApeLayer
from .sparse import PageSummary

_GROW = 256  # new-token slots added when a buffer is full (amortises the copy)


class PackLayer(CacheLayerMixin):
    """One layer: a ragged prefix plus the dense tokens appended since.

    The new tokens live in ``buffer [2, batch, kv_heads, pad + capacity, width]``. On
    CUDA ``pad`` is 0, ``width`` is head_dim, and the Triton kernel reads the ragged
    prefix itself. Elsewhere (``pad`` = the longest head) the prefix is gathered into the
    first ``pad`` rows once, padded, and ``width`` is head_dim + 1: the keys' extra
    channel is the bias that hides the padding (:func:`~kvcompile.attention.padded_attention`),
    so the reference attention is one SDPA call over a view of the buffer.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, prefix: RaggedKV | EncodedKV, start: int, capture_queries: int = 0, capacity: int = 0,
                 sparse: PageSummary | None = None, repair: ApeLayer | None = None):
        super().__init__()
        self.prefix = prefix
        self.sparse = sparse  # decode steps attend to the pages it chooses (kvcompile/sparse.py)
        self.repair = repair  # APE's temperature and scale on the segments' rows (kvcompile/repair.py)
        self.start = start
        self.capture_queries = capture_queries
        self.queries: torch.Tensor | None = None
        self.capacity = capacity
        self.length = 0
        self.pad = None if uses_kernel(prefix.device) else prefix.max_len
        self.buffer: torch.Tensor | None = None
        self._rows: RaggedKV | None = None
        self.dtype, self.device = prefix.dtype, prefix.device
        self.is_initialized = True

    def rows(self) -> RaggedKV:
        """The prefix as dense rows. A quantised prefix (:class:`~kvcompile.encoded.EncodedKV`)
        is decoded: once per question where the prefix is padded into the buffer anyway
        (the reference path), and on every call where the kernel reads the rows (CUDA), so
        that only one layer is ever dense."""
        if self._rows is not None:
            return self._rows
        rows = self.prefix.materialise()
        if self.pad is not None:
            self._rows = rows
        return rows

    @property
    def num_heads(self) -> int:
        return self.prefix.heads

    def lazy_initialization(self, key_states, value_states) -> None:  # the buffer is made by the first update
        pass

    def _allocate(self, batch: int, need: int) -> None:
        pad, p = self.pad or 0, self.prefix
        capacity = max(need, self.capacity, 2 * (self.buffer.shape[3] - pad) if self.buffer is not None else 0)
        width = p.head_dim + (self.pad is not None)
        buffer = torch.zeros(2, batch, p.heads, pad + capacity, width, dtype=self.dtype, device=self.device)
        if self.buffer is not None:
            buffer[..., : pad + self.length, :] = self.buffer[..., : pad + self.length, :]
        elif pad:  # the prefix, gathered once per question and padded to its longest head
            p = self.rows()
            index, valid = p.padded_index()
            buffer[0, :, :, :pad, :-1] = p.keys[index]
            buffer[1, :, :, :pad, :-1] = p.values[index]
            buffer[0, :, :, :pad, -1] = torch.where(valid, 0.0, padding_bias(p.keys.dtype))
        self.buffer = buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_heads, t, head_dim]``; hand the layer itself to the attention.

        Returning the layer (not tensors) makes any attention function other than
        ``"kvcompile"`` fail loudly instead of silently ignoring the pack.
        """
        t, d = key_states.shape[2], key_states.shape[3]
        pad = self.pad or 0
        if self.buffer is None or self.buffer.shape[3] < pad + self.length + t:
            self._allocate(key_states.shape[0], self.length + t + (_GROW if self.buffer is not None else 0))
        at = pad + self.length
        self.buffer[0, :, :, at : at + t, :d] = key_states
        self.buffer[1, :, :, at : at + t, :d] = value_states
        self.length += t
        return self, self

    def release_prefix(self) -> None:
        """Keep only the new tokens: drop the padded copy of the prefix (and the decoded rows)
        that the reference attention read. For a cache whose layers are done with."""
        if self.pad and self.buffer is not None:
            self.buffer = self.buffer[:, :, :, self.pad : self.pad + self.length].clone()
            self.pad = 0
        self._rows = None

    # -- views for the attention --------------------------------------------------------

    @property
    def new_keys(self) -> torch.Tensor:
        """The new tokens' keys ``[batch, kv_heads, t, head_dim]`` (a view of the buffer)."""
        pad = self.pad or 0
        return self.buffer[0, :, :, pad : pad + self.length, : self.prefix.head_dim]

    @property
    def new_values(self) -> torch.Tensor:
        pad = self.pad or 0
        return self.buffer[1, :, :, pad : pad + self.length, : self.prefix.head_dim]

    @property
    def padded_keys(self) -> torch.Tensor:
        """``[batch, kv_heads, pad + t, head_dim + 1]``: the padded prefix, then the new tokens,
        and the bias channel."""
        return self.buffer[0, :, :, : self.pad + self.length]

    @property
    def padded_values(self) -> torch.Tensor:
        return self.buffer[1, :, :, : self.pad + self.length]

    # -- the Cache protocol -------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self.start + self.length

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers before 5.2x passes the new tokens' cache_position here, later their count.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0


class PackCache(Cache):
    """The cache of one question (or, at build time, one chunk) over a compressed prefix.

    prefixes: one :class:`RaggedKV` per layer, post-RoPE, on the model's device (or an
        :class:`~kvcompile.encoded.EncodedKV`: a quantised pack's layer, decoded per use).
    start: the position of the first appended token (where a question would have stood
        after the full corpus).
    capacity: new tokens to make room for up front (more are added as needed).
    transient: a single forward pass whose new tokens alone are read afterwards (the
        compiler's chunks): each layer's padded prefix copy is dropped when the next layer
        starts, so memory holds one layer's instead of all of them.
    sparse: one :class:`~kvcompile.sparse.PageSummary` per layer: decode steps attend only
        to the prefix pages each chooses (RocketKV's hybrid sparse attention).
    repair: one :class:`~kvcompile.repair.ApeLayer` per layer: segments chosen per question
        are attended with APE's temperature and scale.
    """

    def __init__(self, prefixes: list[RaggedKV | EncodedKV], start: int, capture_queries: int = 0, capacity: int = 0,
                 transient: bool = False, sparse: list[PageSummary] | None = None,
                 repair: list[ApeLayer] | None = None):
        sparse, repair = sparse or [None] * len(prefixes), repair or [None] * len(prefixes)
        super().__init__(layers=[PackLayer(p, start, capture_queries, capacity, s, r)
                                 for p, s, r in zip(prefixes, sparse, repair)])
        self.start = start
        self.transient = transient

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # A transient cache (one forward of the compiler) is read once per layer, in order: the
        # layer before is done, so only its new tokens stay (one padded prefix at a time, not all).
        if self.transient and layer_idx > 0:
            self.layers[layer_idx - 1].release_prefix()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def prefix_tokens(self) -> int:
        """Kept prefix tokens summed over layers and KV heads."""
        return sum(layer.prefix.rows for layer in self.layers)


def forward(model: torch.nn.Module, input_ids: torch.Tensor, cache: Cache | None, **kwargs):
    """``model(input_ids, ...)`` with ``cache`` passed under the name this transformers uses.

    transformers 5.x renames ``past_key_values`` to ``cache`` (the old name is removed in
    5.40); models of either generation get the argument they declare.
    """
    return model(input_ids, **{cache_argument(model): cache}, use_cache=cache is not None, **kwargs)


def cache_argument(model: torch.nn.Module) -> str:
    """The name ``model.forward`` (and so ``generate``) takes its cache under: ``cache`` or ``past_key_values``."""
    return _cache_argument(type(model))


_CACHE_ARGUMENT: dict[type, str] = {}


def _cache_argument(cls: type) -> str:
    if cls not in _CACHE_ARGUMENT:
        params = inspect.signature(cls.forward).parameters
        _CACHE_ARGUMENT[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_ARGUMENT[cls]
