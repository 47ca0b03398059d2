"""Answer quality read from likelihoods: how much of the full context's help a pack keeps.

On small models generated answers are noisy, but the negative log-likelihood (NLL) of
the gold answer is stable. With ``none`` (no documents), ``full`` (the whole corpus in
context) and a method, the share of the full context's gain that the method keeps is
``(NLL_none - NLL_method) / (NLL_none - NLL_full)`` (architecture.md, data).
"""

from __future__ import annotations

from typing import Sequence

from .data.qa import QA
from .session import Session, context_answer_nll


def pack_nll(session: Session, qas: Sequence[QA]) -> list[float]:
    """Gold-answer NLL (first gold answer) of each question, answered from the pack."""
    return [session.answer_nll(qa.question, qa.answers[0]) for qa in qas]


def none_nll(session: Session, qas: Sequence[QA]) -> list[float]:
    """Gold-answer NLL with the pack's framing but no documents."""
    lm, framing = session.lm, session.framing
    return [
        context_answer_nll(lm, list(framing.prefix_ids), framing.question_ids(lm.tokenizer, qa.question), qa.answers[0])
        for qa in qas
    ]


def gain_kept(none: Sequence[float], full: Sequence[float], method: Sequence[float]) -> float:
    """Share of the full context's NLL gain kept, pooled over questions.

    Pooled (sums, not a mean of ratios) because a question whose full-context gain is
    near zero would make its own ratio meaningless.
    """
    gain_full = sum(n - f for n, f in zip(none, full))
    if gain_full <= 0:
        return float("nan")
    return sum(n - m for n, m in zip(none, method)) / gain_full


def gain_kept_diff_ci(none: Sequence[float], full: Sequence[float], a: Sequence[float], b: Sequence[float],
                      n: int = 2000, level: float = 0.90, seed: int = 0) -> tuple[float, float] | None:
    """Paired bootstrap over questions of ``gain_kept(a) - gain_kept(b)``: ``(low, high)`` at ``level``.

    None when there are too few questions, or too few resamples where the full context helps.
    """
    import random

    rng, k, diffs = random.Random(seed), len(none), []
    if k < 2:
        return None
    for _ in range(n):
        idx = [rng.randrange(k) for _ in range(k)]
        gain_full = sum(none[i] - full[i] for i in idx)
        if gain_full > 0:
            diffs.append(sum(b[i] - a[i] for i in idx) / gain_full)  # (none - a) - (none - b) = b - a
    if len(diffs) < n // 2:
        return None
    diffs.sort()
    tail = (1 - level) / 2
    return diffs[int(tail * len(diffs))], diffs[min(len(diffs) - 1, int((1 - tail) * len(diffs)))]
