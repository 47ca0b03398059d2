"""LagKV (arXiv 2504.04704; methods.md section 2): attention-free scoring.

Each head's candidates, in position order, are cut into partitions of ``lag`` tokens.
Partition ``p`` is judged against the next one, its lag reference: per channel, keys and
values are normalised by the reference's min and max, and a token scores by how much its
normalised channels spread (their standard deviation), softmaxed over its partition;
keys and values add. A token that stands out from what follows it is kept. The last
full partition (no reference yet) and the remainder score above everything else: they
are kept whole, as LagKV's sliding window, until more tokens arrive. Where the budget
cannot hold the whole window (short documents, whose every token is window, or tight
budgets), window tokens rank among themselves by the same spread against their own
partition's min and max, not by position (a departure: the paper always keeps the
window). Compression is recursive (``recursive``, the default, as in the paper): the
tokens a chunk judged and kept are frozen, and each later chunk partitions only the window
it left and its own tokens; with ``recursive=False`` every chunk judges all survivors again.

It needs no attention weights, so it runs with any attention; the task prompt is not
used. ``eps`` keeps constant channels finite (the public code divides by zero there).
"""

from __future__ import annotations

import torch

from . import LayerView, Scorer, register

WINDOW_SCORE = 3.0  # the window's floor: above any partition score (each of s_K and s_V is at most 1)


def _spread(x: torch.Tensor, valid: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [H, P, lag, D]`` (partitions) -> softmaxed spreads ``[H, P, lag]``: against partition
    p + 1 (the last partition, which has none, gets zeros), and against partition p itself.

    ``valid [H, P, lag]``: real tokens (softmaxes over them only).
    """
    inf = torch.finfo(x.dtype).max
    lo = x.masked_fill(~valid[..., None], inf).amin(dim=2)[:, :, None]  # [H, P, 1, D]
    hi = x.masked_fill(~valid[..., None], -inf).amax(dim=2)[:, :, None]

    def softmaxed(z: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        spread = z.std(dim=-1, unbiased=False).masked_fill(~real, float("-inf"))
        return torch.softmax(spread, dim=-1).nan_to_num(0.0)

    lagged = x.new_zeros(x.shape[:3])
    if x.shape[1] > 1:
        lagged[:, :-1] = softmaxed((x[:, :-1] - lo[:, 1:]) / (hi[:, 1:] - lo[:, 1:] + eps), valid[:, :-1])
    return lagged, softmaxed((x - lo) / (hi - lo + eps), valid)


@register
class LagKVScorer(Scorer):
    name = "lagkv"
    reads_task_prompt = False

    def __init__(self, lag: int = 128, eps: float = 1e-6, recursive: bool = True):
        self.lag, self.eps, self.recursive = int(lag), float(eps), bool(recursive)

    def params(self) -> dict:
        return {"lag": self.lag, "eps": self.eps, "recursive": self.recursive}

    def window(self, rows: int) -> int:
        """The last full partition and the remainder: partitions before it have their reference."""
        return rows - max(0, rows // self.lag - 1) * self.lag

    def score(self, view: LayerView) -> torch.Tensor:
        c, lag = view.candidates, self.lag
        index, valid = c.padded_index()  # [H, L]
        heads, width = index.shape
        parts = max(1, -(-width // lag))
        pad = parts * lag - width
        local = torch.arange(parts * lag, device=index.device)
        lengths = valid.sum(dim=1)  # [H]
        # Tokens of full partitions whose next partition is full too: scored; the rest is the window.
        full = lengths // lag  # full partitions per head
        scored = (local[None, :] // lag + 1 < full[:, None]) & (local[None, :] < lengths[:, None])
        valid = torch.nn.functional.pad(valid, (0, pad)).reshape(heads, parts, lag)
        s = own = 0.0
        for rows in (c.keys, c.values):
            x = torch.nn.functional.pad(rows[index].float(), (0, 0, 0, pad)).reshape(heads, parts, lag, -1)
            lagged, itself = _spread(x, valid, self.eps)
            s, own = s + lagged, own + itself
        s = torch.where(scored, s.reshape(heads, -1), WINDOW_SCORE + own.reshape(heads, -1))
        return s[c.head_ids(), c.head_local_index()]
