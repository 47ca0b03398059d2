"""Reconstruction attention (KVzip, arXiv 2505.23416): what the model reads when it repeats the corpus.

A task prompt finds what the recipe's kind of question asks for, and little about facts that
no example question resembles. Reconstruction is query-agnostic: after the corpus, the model
is asked to repeat it and is fed its own text back, chunk by chunk (teacher-forced). A cached
token that some query of the repeat attends to strongly holds something the model cannot
rebuild from the rest. A token's score is the largest attention that any query of the repeat
of its chunk (any query head of its GQA group) pays it.

As in KVzip, the repeat of a chunk is normalised over the framing (which holds the attention
sinks), the chunk being repeated and the repeat's own tokens (causal), not over the whole
corpus: the repeat runs after the whole corpus, but what it is scored on is how it reads its
own chunk. The compiler (``_Compiler.reconstruct``) runs the forwards; this module holds the
prompt and the score.
"""

from __future__ import annotations

import torch

FIRST = "\n\nRepeat the previous context exactly.\n"
NEXT = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8  # tokens of the previous chunk that NEXT quotes, so the repeat knows where to resume


def repeat_ids(tokenizer, corpus_ids: list[int], start: int, end: int) -> list[int]:
    """The repeat of ``corpus_ids[start:end]``: the instruction, then the chunk's tokens (the
    chunk is always the last ``end - start`` ids)."""
    if start == 0:
        prompt = tokenizer(FIRST, add_special_tokens=False)["input_ids"]
    else:
        prompt = tokenizer(NEXT, add_special_tokens=False)["input_ids"] + corpus_ids[max(0, start - OVERLAP) : start]
    return prompt + corpus_ids[start:end]


def prompt_tokens(tokenizer) -> int:
    """The most tokens a repeat adds before its chunk (for the window's room)."""
    return max(len(tokenizer(FIRST, add_special_tokens=False)["input_ids"]),
               len(tokenizer(NEXT, add_special_tokens=False)["input_ids"]) + OVERLAP)


def max_attention(queries: torch.Tensor, prefix_keys: torch.Tensor, chunk_keys: torch.Tensor,
                  own_keys: torch.Tensor, scaling: float, max_bytes: int) -> torch.Tensor:
    """The largest attention each chunk token receives from the repeat: ``[kv_heads, chunk]``.

    queries: ``[kv_heads x group, n, head_dim]`` post-RoPE queries of the repeat's ``n``
    tokens (query heads grouped by KV head, as the model orders them); prefix_keys
    ``[kv_heads, p, head_dim]`` (the framing), chunk_keys ``[kv_heads, w, head_dim]`` (the
    chunk as cached), own_keys ``[kv_heads, n, head_dim]`` (the repeat's own, causal). Each
    query's softmax runs over ``[prefix | chunk | own keys up to itself]``, in fp32, in blocks
    of queries whose logits stay under ``max_bytes``.
    """
    heads, n, _ = own_keys.shape
    group = queries.shape[0] // heads
    p, w = prefix_keys.shape[1], chunk_keys.shape[1]
    keys = torch.cat([prefix_keys, chunk_keys, own_keys], dim=1).float().transpose(1, 2)  # [H, D, p + w + n]
    q = queries.float().view(heads, group, n, -1) * scaling
    best = torch.zeros(heads, w, device=keys.device)
    block = max(1, max_bytes // (heads * group * (p + w + n) * 4))
    own = torch.arange(n, device=keys.device)
    for r0 in range(0, n, block):
        rows = own[r0 : r0 + block]
        logits = q[:, :, r0 : r0 + block] @ keys[:, None]  # [H, G, b, p + w + n]
        logits[..., p + w :].masked_fill_(own[None, :] > rows[:, None], float("-inf"))
        a = logits.softmax(dim=-1)[..., p : p + w]
        best = torch.maximum(best, a.amax(dim=(1, 2)))
    return best
