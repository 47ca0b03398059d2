"""Budget policy: which candidates of a layer survive, given their scores.

Heads compete for one budget per layer (per-head budgets). Before they do, a floor
guarantees coverage: every head keeps a share of an even per-head budget. The rest goes
to the best scores, whichever head they belong to. Ties break by (head, position), so
selection is deterministic. (Documents do not compete: each is its own segment with its
own budget, see builder.py.)
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
           head_floor: float = 0.2) -> torch.Tensor:
    """Which candidates are kept: a bool mask ``[N]`` over the rows of ``candidates``.

    scores: ``[N]``, higher means keep; comparable across heads.
    budget: tokens to keep in total over the heads (clamped to what exists).
    protected: bool ``[N]``, always kept (sinks, framing), even beyond the budget.
    head_floor: share of the even per-head budget that each head keeps at least.

    All on the device, for all heads at once, with no host sync: heads first take their
    floor (best unprotected rows of their own), then the rest of the budget goes to the
    best rows of any head. Ties break by (head, position) through stable sorts.
    """
    heads, n = candidates.heads, candidates.rows
    budget = min(budget, n)
    head = candidates.head_ids()
    order = torch.sort(scores.float(), descending=True, stable=True).indices  # best first
    by_head = order[torch.sort(head[order], stable=True).indices]  # each head's rows, best first
    starts = candidates.offsets[:-1]

    # Floor: every head keeps its best `floor - protected_h` unprotected rows.
    n_protected = protected.sum()
    free = (budget - n_protected).clamp_min(0)
    floor = torch.floor(head_floor * free.double() / heads).long()
    unprotected = (~protected[by_head]).long()
    seen = torch.cat([unprotected.new_zeros(1), unprotected.cumsum(0)])  # unprotected rows before each
    rank = seen[1:] - 1 - seen[starts][head[by_head]]  # rank among its head's unprotected rows
    protected_h = candidates.head_counts(protected)
    taken = protected.clone()
    taken[by_head] |= (unprotected == 1) & (rank < (floor - protected_h)[head[by_head]])

    # The rest of the budget: the best rows not yet kept, whichever head.
    left = (budget - taken.sum()).clamp_min(0)
    open_rows = ~taken[order]
    taken[order] |= open_rows & (open_rows.long().cumsum(0) <= left)
    return taken
