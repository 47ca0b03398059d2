"""Budget policy: which candidates of a layer survive, given their scores.

Heads compete for one budget per layer (per-head budgets). Before they do, a floor
guarantees coverage: every head keeps a share of an even per-head budget. The rest goes
to the best scores, whichever head they belong to. Ties break by (head, position), so
selection is deterministic. (Documents do not compete here: each is its own segment with
its own budget, set by the policy of budgets.py.)
"""

from __future__ import annotations

import math

import torch

from .ragged import RaggedKV


def layer_budget(target: int, seen: int, total: int, kv_heads: int) -> int:
    """The layer's budget (tokens summed over KV heads) after ``seen`` of ``total`` tokens.

    The budget grows with the corpus seen so far (``k_i = len(c_i) / cf + k_{i-1}`` in
    the paper), so earlier survivors compete again with every later chunk.
    """
    return kv_heads * math.ceil(target * seen / total)


def select(scores: torch.Tensor, candidates: RaggedKV, budget: int, protected: torch.Tensor,
           head_floor: float = 0.2, layers: int = 1, head_cap: torch.Tensor | None = None) -> torch.Tensor:
    """Which candidates are kept: a bool mask ``[N]`` over the rows of ``candidates``.

    scores: ``[N]``, higher means keep; comparable across the heads of a layer.
    candidates: one layer, or ``layers`` layers stacked (:meth:`RaggedKV.stack`); each
        layer has its own budget and its heads compete for it.
    budget: tokens to keep per layer, summed over its heads (clamped to what exists).
    protected: bool ``[N]``, always kept (sinks, framing), even beyond the budget.
    head_floor: share of the even per-head budget that each head keeps at least.
    head_cap: ``[heads]`` the most rows each head may keep, protected rows included (a
        streamed compile, whose longest head must fit the model's window); ``None``: no cap.
        A layer whose heads are full keeps less than its budget.

    All on the device, for all layers and heads at once, with no host sync: heads first
    take their floor (best unprotected rows of their own), then the rest of each layer's
    budget goes to its best rows, whichever head. Ties break by (head, position) through
    stable sorts.
    """
    heads = candidates.heads // layers
    head = candidates.head_ids()
    layer = head // heads
    starts = candidates.offsets[:-1]  # first row of each head, and of each layer every `heads`
    layer_starts = candidates.offsets[::heads]
    budgets = layer_starts.diff().clamp(max=budget)  # each layer's budget, clamped to its rows
    order = torch.sort(scores.float(), descending=True, stable=True).indices  # best first

    def rank_within(group: torch.Tensor, group_starts: torch.Tensor, eligible: torch.Tensor):
        """Rows grouped by ``group`` (each best first), and each row's rank among the eligible rows
        of its group (counted from 0)."""
        grouped = order[torch.sort(group[order], stable=True).indices]
        e = eligible[grouped].long()
        seen = torch.cat([e.new_zeros(1), e.cumsum(0)])  # eligible rows before each
        return grouped, e, seen[1:] - 1 - seen[group_starts][group[grouped]]

    # Floor: every head keeps its best `floor - protected_h` unprotected rows.
    protected_h = candidates.head_counts(protected)
    free = (budgets - protected_h.view(layers, heads).sum(1)).clamp_min(0)
    floor = torch.floor(head_floor * free.double() / heads).long().repeat_interleave(heads)
    if head_cap is not None:
        floor = torch.minimum(floor, head_cap)
    by_head, unprotected, rank = rank_within(head, starts, ~protected)
    taken = protected.clone()
    taken[by_head] |= (unprotected == 1) & (rank < (floor - protected_h)[head[by_head]])

    # The rest of each layer's budget: its best rows not yet kept, whichever head, each head
    # only up to its cap (the best rows of a head are the ones that can still fit, so taking
    # the layer's best among them is greedy water-filling).
    open_rows = ~taken
    if head_cap is not None:
        by_head, free_rows, rank = rank_within(head, starts, open_rows)
        room = (head_cap - candidates.head_counts(taken)).clamp_min(0)
        fits = torch.zeros_like(open_rows)
        fits[by_head] = (free_rows == 1) & (rank < room[head[by_head]])
        open_rows = fits
    left = (budgets - candidates.head_counts(taken).view(layers, heads).sum(1)).clamp_min(0)
    by_layer, eligible, rank = rank_within(layer, layer_starts, open_rows)
    taken[by_layer] |= (eligible == 1) & (rank < left[layer[by_layer]])
    return taken
