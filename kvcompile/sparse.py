"""Hybrid sparse attention at decode: RocketKV's second stage over a pack's prefix.

A pack is already RocketKV's first stage (a permanent, task-aware eviction). At every
decode step this module picks, per KV head, the pages of the prefix the current query is
likely to attend to, and attends exactly over those rows only (methods.md section 3,
stage 2; the approximation is SparQ's):

1. At load, each head's rows are cut into pages of ``page`` rows, and every page keeps the
   element-wise min and max of its (rotated) keys: :class:`PageSummary`, ``bounds
   [pages, 2 * head_dim]``.
2. Per step, the ``channels`` channels with the largest ``|q|`` (mean over the GQA group)
   are read from one bound per channel: the max where the group's query sum is positive,
   else the min. So ``q . bound`` is an upper bound of the page's scores on those channels.
3. Those logits are divided by SparQ's temperature ``sqrt(D * |q_r|_1 / |q|_1)`` (the
   kept share of ``|q|``), turned into per-token probabilities (a page's tokens share its
   score; the softmax counts every token), averaged over the GQA group, and each head keeps
   its best pages, ``top_k`` of its rows rounded up to whole pages.
4. Exact attention over the chosen rows, then the dense new tokens (question and answer so
   far), which are always attended.

Only decode steps (one query token) are sparse: a question's first forward attends to the
whole prefix, as RocketKV's prefill does. Every op is on the device (no host sync per step).

The functions here are plain PyTorch: the CPU path, and the spec of the Triton kernels
:func:`kvcompile.kernels.sparse.page_logits` and :func:`kvcompile.kernels.sparse.gathered_attention`,
which the CUDA path uses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cache

import torch
import torch.nn.functional as F

from .errors import OptionError
from .ragged import RaggedKV, head_offsets, within_heads


def stage_two(kept_ratio: float) -> float:
    """RocketKV's split of a total compression ``c`` into ``c**alpha`` (stage 1) and the rest:
    given what stage 1 (the pack) kept, the compression left for stage 2.

    ``alpha = min(0.2 + 0.06 * log2 c, 0.8)``; with ``x = log2 c`` and ``L = log2(1 / kept_ratio)``
    stage 1 is ``x * alpha = L``, a quadratic in ``x`` below the cap. E.g. kept 1/4 -> c = 20.3,
    stage 2 = 5.07; c = 64 -> stage 1 10.3x, stage 2 6.2x (the paper's example).
    """
    big_l = math.log2(1.0 / min(max(kept_ratio, 1e-9), 1.0))
    x = big_l / 0.8 if big_l >= 8.0 else (-0.2 + math.sqrt(0.04 + 0.24 * big_l)) / 0.12
    return 2.0 ** (x - big_l)


@dataclass(frozen=True)
class Sparse:
    """The parameters of sparse decode.

    top_k: rows of each KV head attended per step: a share of the head's rows (at most 1),
        or a count (above 1); rounded up to whole pages.
    page: rows per page summary.
    channels: query channels the approximate scores read.
    """

    top_k: float
    page: int
    channels: int

    @classmethod
    def auto(cls, kept_ratio: float, head_dim: int, top_k: float | None = None, page: int | None = None,
             channels: int | None = None) -> Sparse:
        """The paper's budget split for a pack that kept ``kept_ratio`` of its corpus; any
        parameter given overrides its share.

        Stage 2 compresses by ``c2 = stage_two(kept_ratio)``: top-k is half that budget
        (``1 / (2 c2)`` of the rows), pages hold ``ceil(sqrt(c2))`` rows, and the channels are
        as many as make the summaries cost the other half (``page * D / (2 c2)``).
        """
        c2 = stage_two(kept_ratio)
        page = page if page is not None else math.ceil(math.sqrt(c2))
        top_k = top_k if top_k is not None else min(1.0, 1.0 / (2.0 * c2))
        channels = channels if channels is not None else min(head_dim, math.ceil(page * head_dim / (2.0 * c2)))
        out = cls(float(top_k), int(page), int(channels))
        out.check(head_dim)
        return out

    def check(self, head_dim: int) -> None:
        if not self.top_k > 0 or (self.top_k > 1 and self.top_k != int(self.top_k)):
            raise OptionError(f"--sparse takes a share of each head's rows (0 < x <= 1) or a whole number of rows, "
                              f"not {self.top_k:g}")
        if self.page < 1:
            raise OptionError(f"--sparse-page must be at least 1, got {self.page}")
        if not 1 <= self.channels <= head_dim:
            raise OptionError(f"--sparse-channels must be in 1..{head_dim} (the head_dim), got {self.channels}")

    def rows(self, n: int) -> int:
        """Rows of a head of ``n`` attended per step, before rounding up to pages."""
        return min(n, math.ceil(self.top_k * n) if self.top_k <= 1 else int(self.top_k))

    def to_json(self) -> dict:
        return asdict(self)


def parse_top_k(text: str) -> float | None:
    """``--sparse``: ``auto`` (None) or a number."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"--sparse takes auto, a share such as 0.25, or a number of rows such as 256, "
                          f"not {text!r}") from None


@dataclass(frozen=True, eq=False)
class PageSummary:
    """One layer's page summaries and what selection needs of its layout.

    bounds: ``[P, 2 * head_dim]`` each page's element-wise min of its keys, then its max;
        head ``h`` owns pages ``page_offsets[h]:page_offsets[h + 1]``.
    page_offsets: ``[kv_heads + 1]``; row_offsets: ``[kv_heads + 1]`` the rows' (the prefix's).
    log_counts: ``[kv_heads, max_pages]`` log of each page's rows (0 past the head's pages).
    take: ``[kv_heads]`` pages each head attends per step; taken the same on the host.
    """

    bounds: torch.Tensor
    page_offsets: torch.Tensor
    row_offsets: torch.Tensor
    log_counts: torch.Tensor
    take: torch.Tensor
    lengths: tuple[int, ...]
    pages: tuple[int, ...]
    taken: tuple[int, ...]
    sparse: Sparse

    @classmethod
    def of(cls, kv: RaggedKV, sparse: Sparse) -> PageSummary:
        """Summaries of ``kv``'s (post-RoPE) keys."""
        p, d, device = sparse.page, kv.head_dim, kv.device
        pages = tuple(-(-n // p) for n in kv.lengths)
        page_offsets = head_offsets(pages, device)
        page_of_row = (page_offsets[kv.head_ids()] + within_heads(kv.lengths, device) // p)[:, None].expand(-1, d)
        keys = kv.keys.float()
        lo = keys.new_full((sum(pages), d), math.inf).scatter_reduce(0, page_of_row, keys, "amin")
        hi = keys.new_full((sum(pages), d), -math.inf).scatter_reduce(0, page_of_row, keys, "amax")
        n = torch.tensor(kv.lengths, device=device)
        j = torch.arange(max(pages, default=0), device=device)
        counts = (n[:, None] - j[None, :] * p).clamp(0, p)
        take = tuple(min(n_pages, -(-sparse.rows(n_rows) // p)) for n_pages, n_rows in zip(pages, kv.lengths))
        return cls(torch.cat([lo, hi], 1).to(kv.dtype), page_offsets, kv.offsets,
                   counts.clamp(min=1).float().log(), torch.tensor(take, device=device), kv.lengths, pages, take,
                   sparse)

    @property
    def heads(self) -> int:
        return len(self.lengths)

    @property
    def max_take(self) -> int:
        return max(self.taken, default=0)

    def rows_read(self) -> int:
        """Prefix rows one decode step attends over, all heads."""
        p = self.sparse.page
        return sum(min(n, t * p) for n, t in zip(self.lengths, self.taken))

    def bytes_per_step(self, itemsize: int) -> tuple[int, int]:
        """Bytes one decode step reads of this layer's prefix: ``(sparse, dense)``.

        Sparse: the chosen channels of one bound per page, and the chosen rows' keys and values
        (a partial last page counts whole: the kernel reads it masked). Dense: every row's.
        """
        d = self.bounds.shape[1] // 2
        summaries = sum(self.pages) * self.sparse.channels * itemsize
        chosen = sum(t * self.sparse.page for t in self.taken)
        return summaries + min(chosen, sum(self.lengths)) * 2 * d * itemsize, sum(self.lengths) * 2 * d * itemsize


def query_channels(query: torch.Tensor, kv_heads: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the approximate scores read, from the step's queries ``[B, Hq, 1, D]``.

    Returns ``columns [B, H, channels]`` (int32): the channels with the largest mean ``|q|``
    over the GQA group, each plus ``D`` where the group's query sum is positive (a column of
    ``bounds``: the max, else the min), and ``inv_temp [B, Hq]`` (fp32): one over SparQ's
    temperature ``sqrt(D * |q_r|_1 / |q|_1)``.
    """
    b, hq, _, d = query.shape
    q = query[:, :, -1].float().reshape(b, kv_heads, hq // kv_heads, d)
    magnitude = q.abs()
    top = magnitude.mean(2).topk(channels, dim=-1).indices  # [B, H, r]
    positive = torch.gather(q.sum(2), -1, top) > 0
    kept = torch.gather(magnitude, -1, top[:, :, None].expand(-1, -1, q.shape[2], -1)).sum(-1)
    share = kept / magnitude.sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
    inv_temp = torch.rsqrt((d * share).clamp(min=torch.finfo(torch.float32).tiny)).reshape(b, hq)
    return (top + d * positive).to(torch.int32), inv_temp


def page_logits(query: torch.Tensor, bounds: torch.Tensor, page_offsets: torch.Tensor, columns: torch.Tensor,
                inv_temp: torch.Tensor, max_pages: int) -> torch.Tensor:
    """Approximate attention logits of every page: ``[B, Hq, max_pages]`` fp32.

    query ``[B, Hq, 1, D]``; bounds ``[P, 2D]`` and page_offsets ``[H + 1]`` (a :class:`PageSummary`);
    columns ``[B, H, r]`` and inv_temp ``[B, Hq]`` (:func:`query_channels`). Logit of page ``j`` of
    head ``h`` for query head ``qh`` (in its group): ``sum_c q[qh, c mod D] * bounds[j, c] *
    inv_temp[qh]`` over the columns ``c`` of its group; ``-inf`` past the head's pages.
    """
    b, hq, _, d = query.shape
    h = columns.shape[1]
    g = hq // h
    cols = columns.long()[:, :, None, :].expand(-1, -1, g, -1)  # [B, H, G, r]
    q = query[:, :, -1].float().reshape(b, h, g, d)
    # The chosen channels' query values at their bound columns, zeros elsewhere: one matmul against
    # every page (all heads'), then each head's own pages are taken.
    q_cols = torch.zeros(b, h, g, 2 * d, device=query.device).scatter_(-1, cols, torch.gather(q, -1, cols % d))
    scores = q_cols.reshape(b, hq, 2 * d) @ bounds.float().T  # [B, Hq, P]
    counts = page_offsets.diff()
    j = torch.arange(max_pages, device=query.device)
    valid = (j[None, :] < counts[:, None]).repeat_interleave(g, 0)  # [Hq, max_pages]
    index = torch.where(valid, page_offsets[:-1, None].repeat_interleave(g, 0) + j[None, :], 0)
    logits = torch.gather(scores, -1, index.expand(b, -1, -1)) * inv_temp[:, :, None]
    return logits.masked_fill(~valid[None], -math.inf)


def choose_rows(logits: torch.Tensor, summary: PageSummary) -> torch.Tensor:
    """``[B, H, max_take * page]`` (int64): the prefix rows each head attends, ``-1`` for none.

    logits ``[B, Hq, max_pages]`` (:func:`page_logits`). A page's tokens share its logit, so a
    token's probability is ``exp(logit - logsumexp(logit + log rows))``; averaged over the GQA
    group, each head keeps its ``take`` best pages, in row order.
    """
    b, hq, max_pages = logits.shape
    h, p = summary.heads, summary.sparse.page
    if summary.max_take == 0:
        return logits.new_empty(b, h, 0, dtype=torch.long)
    logits = logits.reshape(b, h, hq // h, max_pages)
    log_z = torch.logsumexp(logits + summary.log_counts[:, None, :], dim=-1, keepdim=True)
    probs = torch.exp(logits - log_z).mean(2)  # [B, H, max_pages]
    top = probs.topk(summary.max_take, dim=-1).indices  # [B, H, max_take]
    taken = torch.arange(summary.max_take, device=logits.device)[None, None, :] < summary.take[None, :, None]
    pages = torch.sort(torch.where(taken, top, max_pages)).values  # untaken ranks sort last
    taken = pages < max_pages
    first = pages * p  # the page's first row within its head
    within = first[..., None] + torch.arange(p, device=logits.device)  # [B, H, max_take, page]
    n = summary.row_offsets.diff()[None, :, None, None]
    rows = summary.row_offsets[:-1][None, :, None, None] + within
    return torch.where(taken[..., None] & (within < n), rows, -1).reshape(b, h, -1)


def gathered_attention(query: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor,
                       rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of ``query [B, Hq, q_len, D]`` over the prefix rows ``rows [B, H, K]`` of its KV
    head (``-1``: none) and the causal new tokens ``keys, values [B, H, t, D]``.

    ``prefix_keys, prefix_values [N, D]``: the layer's rows. Returns ``[B, q_len, Hq, D]`` in the
    query's dtype; softmax in fp32.
    """
    b, hq, q_len, d = query.shape
    h, t = keys.shape[1], keys.shape[2]
    valid = rows >= 0
    index = rows.clamp(min=0)
    k = torch.cat([prefix_keys[index], keys], dim=2)  # [B, H, K + t, D]
    v = torch.cat([prefix_values[index], values], dim=2)
    new, tok = torch.arange(t, device=query.device), torch.arange(q_len, device=query.device)
    causal = new[None, :] <= (t - q_len) + tok[:, None]  # [q_len, t]
    mask = torch.cat([valid[:, :, None, :].expand(-1, -1, q_len, -1), causal.expand(b, h, -1, -1)], dim=-1)
    out = F.scaled_dot_product_attention(query.float(), k.float(), v.float(), scale=scaling, enable_gqa=True,
                                         attn_mask=mask.repeat_interleave(hq // h, 1))
    return out.to(query.dtype).transpose(1, 2).contiguous()


@cache
def _kernels():
    """The Triton kernels, or None where Triton is missing."""
    try:
        from .kernels import sparse
    except ImportError:
        return None
    return sparse


def attend(query: torch.Tensor, prefix: RaggedKV, summary: PageSummary, keys: torch.Tensor, values: torch.Tensor,
           scaling: float, kernel: bool | None = None) -> torch.Tensor:
    """One decode step over ``prefix`` (the layer's rows) and the new tokens: choose, then attend.
    The Triton kernels where ``kernel`` (default: on CUDA, where Triton is installed), the
    functions above elsewhere. Returns ``[B, 1, Hq, D]``."""
    columns, inv_temp = query_channels(query, summary.heads, summary.sparse.channels)
    kernels = _kernels() if (query.is_cuda if kernel is None else kernel) else None
    score, gather = (kernels.page_logits, kernels.gathered_attention) if kernels else (page_logits, gathered_attention)
    logits = score(query, summary.bounds, summary.page_offsets, columns, inv_temp, summary.log_counts.shape[1])
    rows = choose_rows(logits, summary)
    return gather(query, prefix.keys, prefix.values, rows, keys, values, scaling)
