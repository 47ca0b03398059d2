"""Boundary repair for segments chosen per question: APE's attention temperature and scale.

Segments compiled ``independent`` never attended to each other: each saw only the framing
before it. Attended side by side (``query --select``), their attention is misaligned with
a sequential prefill of the same text: every segment brings its own share of attention
mass, so the selection as a whole draws more (and flatter) attention than the same text
read in one pass. APE (Yang et al., ICLR 2025) aligns the two in three steps, all at
attention time, nothing recomputed:

1. a shared prefix, so no segment starts with its own attention sink. kvcompile's
   framing is that prefix already: every segment was compiled after it;
2. an attention temperature ``T`` on the segments' rows: their logits are divided by
   ``T`` (``T < 1`` sharpens them);
3. a scale ``S`` on their total: the segments' log-sum-exp, times ``T * S`` (APE's
   released code), competes with that of the framing and the new tokens.

So per query, with ``c`` the segments' rows and ``o`` the framing's and the new tokens'
(causal)::

    out = w * softmax(s_c / T) v_c + (1 - w) * softmax(s_o) v_o,
    w = sigmoid(T * S * lse(s_c / T) - lse(s_o))

With ``T = S = 1`` this is exactly ordinary attention (the two halves' log-sum-exps
recombined), a tested identity. It costs a few tensor ops per layer, no forward pass: the
time to first token is that of the selection without repair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import OptionError
from .ragged import RaggedKV


@dataclass(frozen=True)
class Ape:
    """APE's parameters: ``temperature`` on the segments' logits, ``scale`` on their log-sum-exp."""

    temperature: float = 1.0
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Ape:
        """``--ape T,S`` (or ``T`` alone, with ``S = 1``)."""
        try:
            values = [float(x) for x in text.split(",")]
        except ValueError:
            values = []
        if not 1 <= len(values) <= 2 or not all(0 < v <= 4 for v in values):
            raise OptionError(f"--ape takes a temperature and a scale such as 0.9,0.9 (each in (0, 4]), not {text!r}")
        return cls(*values)


@dataclass(frozen=True, eq=False)
class ApeLayer:
    """One layer's repair: ``shared [kv_heads]``, the framing's rows at the head of each head's rows
    (the rest are the segments')."""

    ape: Ape
    shared: torch.Tensor

    def attend(self, query: torch.Tensor, rows: RaggedKV, keys: torch.Tensor, values: torch.Tensor,
               scaling: float) -> torch.Tensor:
        return ape_attention(query, rows, self.shared, keys, values, scaling, self.ape)


def ape_attention(query: torch.Tensor, rows: RaggedKV, shared: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  scaling: float, ape: Ape) -> torch.Tensor:
    """Attention of ``query [B, Hq, q_len, D]`` over ``rows`` (post-RoPE; each head's first
    ``shared[h]`` rows are the framing, the rest the segments) and the causal new tokens
    ``keys, values [B, H, t, D]``, with APE's temperature and scale on the segments' rows.
    Returns ``[B, q_len, Hq, D]`` in the query's dtype; fp32 inside."""
    b, hq, q_len, d = query.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    index, valid = rows.padded_index()  # [H, L]
    segment = valid & (torch.arange(index.shape[1], device=query.device)[None, :] >= shared[:, None])
    framing = valid & ~segment
    kp, vp = rows.keys[index].float(), rows.values[index].float()  # [H, L, D]
    q = query.float().reshape(b, h, g * q_len, d)  # row i: query head h * g + i // q_len, token i % q_len
    sp = q @ kp.transpose(-1, -2) * scaling  # [B, H, G q, L]
    sn = q @ keys.float().transpose(-1, -2) * scaling  # [B, H, G q, t]
    tok = torch.arange(g * q_len, device=query.device) % q_len
    causal = torch.arange(t, device=query.device)[None, :] <= (t - q_len) + tok[:, None]  # [G q, t]

    inf = torch.tensor(-torch.inf, device=query.device)
    s_c = torch.where(segment[:, None, :], sp / ape.temperature, inf)
    s_o = torch.cat([torch.where(framing[:, None, :], sp, inf), torch.where(causal, sn, inf)], dim=-1)
    lse_c, lse_o = torch.logsumexp(s_c, -1, keepdim=True), torch.logsumexp(s_o, -1, keepdim=True)
    # A query with no segment row (lse_c = -inf) gets weight 0 for them (and no 0/0 below).
    out_c = torch.exp(s_c - torch.where(lse_c.isinf(), 0.0, lse_c)) @ vp
    out_o = torch.exp(s_o - lse_o) @ torch.cat([vp.expand(b, -1, -1, -1), values.float()], dim=2)
    w = torch.sigmoid(ape.temperature * ape.scale * lse_c - lse_o)
    out = (w * out_c + (1 - w) * out_o).reshape(b, hq, q_len, d)
    return out.to(query.dtype).transpose(1, 2).contiguous()
