"""Task-aware scoring ("Beyond RAG", arXiv 2503.04973; Finch with a task prompt).

Each cached token is scored by the attention that the task prompt's tokens pay to it:
the prompt (task description plus example questions) stands where a question will
stand, so the tokens it attends to are the ones later questions of that kind need.
Only the prompt's rows of the attention matrix are computed, ``[group, n_probe,
tokens]`` per KV head, never the full ``tokens x tokens`` matrix.
"""

from __future__ import annotations

import torch

from . import LayerView, Scorer, register


def probe_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention probabilities of the probe rows over all keys.

    queries: ``[group, n_probe, head_dim]``, the probe tokens of one KV head's group.
    keys: ``[tokens, head_dim]``, candidates then the probe tokens themselves.
    Returns ``[group, n_probe, tokens]``.
    """
    n_probe, tokens = queries.shape[1], keys.shape[0]
    logits = (queries.float() @ keys.float().T) * scaling
    # Probe row i sits at key index tokens - n_probe + i and sees keys up to it.
    visible = torch.ones(n_probe, tokens, dtype=torch.bool, device=keys.device).tril(tokens - n_probe)
    return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)


@register
class TaskAwareScorer(Scorer):
    """Mean probe attention per KV head (averaged over its GQA group), times ``|v|``.

    Each head's scores are normalised to sum to one, so heads compete for the layer's
    budget by how concentrated their attention is: a head that attends to few tokens
    keeps few, a head that spreads its attention keeps more.
    """

    name = "task_aware"

    def __init__(self, value_norm: bool = True, pool: int = 41, row_norm: bool = True):
        self.value_norm = value_norm
        self.pool = pool
        self.row_norm = row_norm

    def params(self) -> dict:
        return {"value_norm": self.value_norm, "pool": self.pool, "row_norm": self.row_norm}

    def score(self, view: LayerView) -> list[torch.Tensor]:
        kv_heads = len(view.keys)
        group = view.queries.shape[0] // kv_heads
        scores = []
        for h in range(kv_heads):
            q = view.queries[h * group : (h + 1) * group]
            attn = probe_attention(q, view.keys[h], view.scaling)
            a = attn[..., : attn.shape[-1] - view.n_probe]
            if self.row_norm:
                a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            s = a.mean(dim=(0, 1))
            if self.value_norm:
                s = s * view.values[h][: s.shape[0]].float().norm(dim=-1)
            if self.pool > 1:
                s = torch.nn.functional.max_pool1d(s[None, None], self.pool, stride=1, padding=self.pool // 2)[0, 0]
            scores.append(s / s.sum().clamp_min(1e-30))
        return scores
