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


def layer_budget(target: int, seen: int, total: int, kv_heads: int) -> int:
    """The layer's budget (tokens summed over KV heads) after ``seen`` of ``total`` tokens.

    The budget grows with the corpus seen so far (``k_i = len(c_i) / cf + k_{i-1}`` in
    the paper), so earlier survivors compete again with every later chunk.
    """
    return kv_heads * math.ceil(target * seen / total)


def select(
    scores: list[torch.Tensor],
    budget: int,
    protected: list[torch.Tensor],
    head_floor: float = 0.2,
) -> list[torch.Tensor]:
    """Indices kept per head, ascending.

    scores: per head ``[n_h]``; higher means keep. Comparable across heads.
    budget: tokens to keep in total over the heads (clamped to what exists).
    protected: per head bool ``[n_h]``, always kept (sinks, framing).
    head_floor: share of the even per-head budget that each head keeps at least.
    """
    heads = len(scores)
    sizes = [s.shape[0] for s in scores]
    budget = min(budget, sum(sizes))
    flat = torch.cat([s.float() for s in scores])
    head = torch.cat([torch.full((n,), h, device=flat.device) for h, n in enumerate(sizes)])
    is_protected = torch.cat(protected)
    # By score, best first; the stable sort breaks ties by (head, position).
    rank = torch.sort(flat, descending=True, stable=True).indices
    taken = is_protected.clone()  # always kept, even beyond the budget

    def take(eligible: torch.Tensor, n: int) -> None:
        """Keep the ``n`` best not-yet-kept candidates among ``eligible``, within the budget."""
        n = min(n, budget - int(taken.sum()))
        if n > 0:
            order = rank[(eligible & ~taken)[rank]]
            taken[order[:n]] = True

    free = max(0, budget - int(is_protected.sum()))  # what the floor shares
    floor = int(head_floor * free / heads)
    for h in range(heads):
        take(head == h, floor - int(taken[head == h].sum()))
    take(torch.ones_like(taken), budget)
    kept = torch.nonzero(taken).flatten()
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    return [kept[(kept >= offsets[h]) & (kept < offsets[h + 1])] - offsets[h] for h in range(heads)]
