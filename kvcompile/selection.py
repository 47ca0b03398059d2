"""Budget policy: which candidates of a layer survive, given their scores.

Heads compete for one budget per layer (per-head budgets): after a floor that every
head keeps, the rest of the layer's budget goes to the best-scoring tokens whichever
head they belong to. Ties break by (head, position), so selection is deterministic.
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
    scores: list[torch.Tensor], budget: int, protected: list[torch.Tensor], head_floor: float = 0.2
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
    floor = int(head_floor * budget / heads)
    keep = []
    for s, p in zip(scores, protected):
        # Protected first, then by score descending; the stable sort breaks ties by position.
        order = torch.sort(torch.where(p, torch.inf, s.float()), descending=True, stable=True).indices
        keep.append(order[: max(floor, int(p.sum()))])
    taken = sum(k.numel() for k in keep)
    rest = budget - taken
    if rest > 0:
        device = scores[0].device
        mask = [torch.ones(n, dtype=torch.bool, device=device) for n in sizes]
        for m, k in zip(mask, keep):
            m[k] = False
        pool_score = torch.cat([s.float()[m] for s, m in zip(scores, mask)])
        pool_head = torch.cat([torch.full((int(m.sum()),), h, device=device) for h, m in enumerate(mask)])
        pool_index = torch.cat([torch.nonzero(m).flatten() for m in mask])
        best = torch.sort(pool_score, descending=True, stable=True).indices[:rest]
        for h in range(heads):
            keep[h] = torch.cat([keep[h], pool_index[best[pool_head[best] == h]]])
    return [k.sort().values for k in keep]
