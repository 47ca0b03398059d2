"""SnapKV++, RocketKV's first stage (arXiv 2502.14051; methods.md section 3).

The observation window's queries vote for the keys they attend to: attention
probabilities summed over the window's tokens and over the query heads of each GQA group,
then smoothed by a max-pool along the sequence, so that a kept token brings its
neighbours. In a pack the window is the task prompt (which stands where questions will),
as kvpress's SnapKV is given it in ``bench/peers.py``.

Unlike :class:`~kvcompile.scorers.task_aware.TaskAwareScorer`, rows are not normalised
and values do not weigh in; the pool is RocketKV's released 63.
"""

from __future__ import annotations

import torch

from . import LayerView, Scorer, register
from .task_aware import probe_attention


@register
class SnapKVScorer(Scorer):
    name = "snapkv"

    def __init__(self, pool: int = 63):
        self.pool = int(pool)

    def params(self) -> dict:
        return {"pool": self.pool}

    def score(self, view: LayerView) -> torch.Tensor:
        c = view.candidates
        a, valid = probe_attention(view.queries, c, view.probe_keys, view.scaling)  # [H, G*P, L]
        s = a.sum(dim=1)  # over the window's tokens and the group's query heads: [H, L]
        if self.pool > 1:
            # Probabilities are >= 0: zero padding pools exactly like an implicit -inf edge.
            s = torch.nn.functional.max_pool1d(s[:, None], self.pool, stride=1, padding=self.pool // 2)[:, 0]
            s = s[:, : valid.shape[1]].masked_fill(~valid, 0.0)
        return s[c.head_ids(), c.head_local_index()]
