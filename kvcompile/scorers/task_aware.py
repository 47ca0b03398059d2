"""Task-aware scoring ("Beyond RAG", arXiv 2503.04973; Finch with a task prompt).

Each cached token is scored by the attention that the task prompt's tokens pay to it:
the prompt (task description plus example questions) stands where a question will
stand, so the tokens it attends to are the ones later questions of that kind need.
Only the prompt's rows of the attention matrix are computed, ``[kv_heads, group x
n_probe, tokens]`` for all heads of a layer at once, never the full ``tokens x tokens``
matrix.
"""

from __future__ import annotations

import torch

from ..errors import OptionError
from ..ragged import RaggedKV
from . import LayerView, Scorer, register


def probe_attention(queries: torch.Tensor, candidates: RaggedKV, probe_keys: torch.Tensor,
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention probabilities of the probe rows over each head's candidates.

    queries: ``[q_heads, n_probe, head_dim]``; probe_keys: ``[kv_heads, n_probe, head_dim]``.
    Each head's candidates are padded to the longest head (masked out), then followed by
    the probe tokens themselves. Returns the probabilities on the candidates,
    ``[kv_heads, group * n_probe, max_len]`` (rows ordered by group member, then probe
    token), and ``valid [kv_heads, max_len]``.
    """
    heads, n_probe, head_dim = probe_keys.shape
    group = queries.shape[0] // heads
    index, valid = candidates.padded_index()
    width = index.shape[1]
    keys = torch.cat([candidates.keys[index], probe_keys], dim=1).float()  # [H, L + P, D]
    q = queries.float().reshape(heads, group * n_probe, head_dim) * scaling
    logits = q @ keys.transpose(1, 2)
    # Probe token i sees every valid candidate and the probe tokens up to itself.
    causal = torch.ones(n_probe, n_probe, dtype=torch.bool, device=q.device).tril().repeat(group, 1)
    hidden = ~torch.cat([valid[:, None, :].expand(-1, group * n_probe, -1), causal.expand(heads, -1, -1)], dim=2)
    return logits.masked_fill_(hidden, float("-inf")).softmax(dim=-1)[..., :width], valid


@register
class TaskAwareScorer(Scorer):
    """Mean probe attention per KV head (averaged over its GQA group), times ``|v|``, blended
    with reconstruction.

    Each head's scores are normalised to sum to one, so heads compete for the layer's
    budget by how concentrated their attention is: a head that attends to few tokens
    keeps few, a head that spreads its attention keeps more. With ``recon`` > 0 the score
    is ``(1 - recon) x task + recon x reconstruction``, each normalised per head: what the
    task prompt asks for, and what the model reads to repeat the corpus (query-agnostic
    coverage of facts no probe resembles; docs/methods.md section 3).
    """

    name = "task_aware"
    # A chained build scores each chunk of a document on its own; a pool of 5 (chosen reading
    # whole) cost it most of its gain on SmolLM2's entity profiles, where 41 kept 2.6x more
    # (docs/nightly.md), and pool 41 was no worse on Qwen over SQuAD (docs/methods.md section 4).
    apart = {"recon": 0.0, "pool": 41}
    off = {"recon": 0.0}

    def __init__(self, value_norm: bool = True, pool: int = 5, row_norm: bool = True, recon: float = 0.5):
        if not 0 <= recon <= 1:
            raise OptionError(f"the task-aware scorer's recon weight must be in [0, 1], got {recon}")
        self.value_norm = value_norm
        self.pool = pool
        self.row_norm = row_norm
        self.recon = float(recon)

    def params(self) -> dict:
        return {"value_norm": self.value_norm, "pool": self.pool, "row_norm": self.row_norm, "recon": self.recon}

    @property
    def reads_reconstruction(self) -> bool:
        return self.recon > 0

    def score(self, view: LayerView) -> torch.Tensor:
        c = view.candidates
        a, valid = probe_attention(view.queries, c, view.probe_keys, view.scaling)  # [H, G*P, L]
        # The mean over probe rows, each first normalised to sum to one: one weighted sum.
        rows = a.shape[1]
        weight = (a.sum(dim=-1).clamp_min(1e-30).reciprocal() if self.row_norm else a.new_ones(a.shape[:2])) / rows
        s = (weight[:, None, :] @ a)[:, 0]  # [H, L]
        if self.value_norm:
            index, _ = c.padded_index()
            s = s * c.values[index].float().norm(dim=-1)
        if self.pool > 1:
            # Scores are >= 0, so zeros on the padding pool exactly like the implicit -inf edge.
            s = torch.nn.functional.max_pool1d(s[:, None], self.pool, stride=1, padding=self.pool // 2)[:, 0]
            s = s[:, : valid.shape[1]].masked_fill(~valid, 0.0)
        s = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        s = s[c.head_ids(), c.head_local_index()]
        if self.recon:
            if view.reconstruction is None:
                raise OptionError("the task-aware scorer's reconstruction term (recon > 0) needs the corpus read "
                                  "whole: build with --context whole, or set recon to 0")
            r = view.reconstruction.float()
            r = r / torch.zeros(c.heads, device=r.device).index_add_(0, c.head_ids(), r).clamp_min(1e-30)[c.head_ids()]
            s = (1 - self.recon) * s + self.recon * r
        return s
