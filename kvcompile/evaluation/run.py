"""Run methods over questions and collect per-question scores, timings and memory."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..data.qa import QA
from ..memory import PeakMemory
from ..quality import gain_kept
from . import stats
from .methods import Method
from .metrics import contains, exact_match, f1


@dataclass
class MethodResult:
    name: str
    kind: str
    ratio: float | None
    kv_bytes: float
    kv_tokens: float
    setup_seconds: float
    peak_memory: int | None
    rows: list[dict] = field(default_factory=list)
    gain_kept: float | None = None  # filled by `evaluate` when `none` and `full` ran
    gain_kept_se: float | None = None  # its delta-method standard error (stats.py), likewise

    def summary(self) -> dict:
        """Means of the scores, medians of the timings, and the sizes."""
        def over(key, statistic):  # rows where ``key`` was measured (None: no answer generated)
            xs = [r[key] for r in self.rows if r.get(key) is not None]
            return statistic(xs) if xs else float("nan")

        def mean(key):
            return over(key, statistics.fmean)

        def median(key):
            return over(key, statistics.median)

        return {"name": self.name, "kind": self.kind, "ratio": self.ratio, "questions": len(self.rows),
                "contains": mean("contains"), "exact_match": mean("exact_match"), "f1": mean("f1"),
                "nll": mean("nll"), "gain_kept": self.gain_kept, "gain_kept_se": self.gain_kept_se,
                "ttft_s": median("ttft"), "tokens_per_s": median("tokens_per_s"), "peak_memory": self.peak_memory,
                "kv_bytes": self.kv_bytes, "kv_tokens": self.kv_tokens, "setup_s": self.setup_seconds}

    def to_json(self) -> dict:
        return {**self.summary(), "rows": self.rows}


def run_method(make: Callable[[], Method], questions: Sequence[QA], device: torch.device | str = "cpu",
               max_new_tokens: int = 32, step: Callable[[str], None] | None = None) -> MethodResult:
    """Build one method (``make``), ask it every question, and free it.

    Peak memory covers building the method (its cache) and answering. With
    ``max_new_tokens = 0`` only the gold answer's NLL is measured: no answer is generated,
    and the answer metrics and timings are None.
    """
    with PeakMemory(device) as mem:
        method = make()
        rows = []
        for qa in questions:
            row = {"id": qa.id, "question": qa.question, "answers": list(qa.answers), "prediction": None,
                   "nll": method.answer_nll(qa), "exact_match": None, "f1": None, "contains": None,
                   "ttft": None, "tokens_per_s": None}
            if max_new_tokens > 0:
                prediction, timings = method.generate(qa, max_new_tokens)
                row.update(prediction=prediction, exact_match=exact_match(prediction, qa.answers),
                           f1=f1(prediction, qa.answers), contains=contains(prediction, qa.answers),
                           ttft=timings["ttft"], tokens_per_s=timings["tokens_per_s"] or None)
            rows.append(row)
            if step:
                step(method.name)
        result = MethodResult(method.name, method.kind, method.ratio, method.kv_bytes, method.kv_tokens,
                              method.setup_seconds, None, rows)
        del method
    result.peak_memory = mem.peak
    return result


def evaluate(makers: Sequence[Callable[[], Method]], questions: Sequence[QA], device: torch.device | str = "cpu",
             max_new_tokens: int = 32, step: Callable[[str], None] | None = None) -> list[MethodResult]:
    """Run every method on every question; fill each one's share of the full context's gain.

    Methods run one after another, each built just before its questions and freed after,
    so that peak memory is each one's own.
    """
    results = [run_method(make, questions, device, max_new_tokens, step) for make in makers]
    fill_gain_kept(results)
    return results


def fill_gain_kept(results: list[MethodResult]) -> None:
    """Set ``gain_kept`` and ``gain_kept_se`` on every result, from the ``none`` and ``full`` results when both ran.

    Pooled over questions (:func:`kvcompile.quality.gain_kept`); the standard error is the
    delta-method one of :mod:`kvcompile.evaluation.stats`.
    """
    base = baseline_nlls(results)
    if base is None:
        return
    none, full = base
    for r in results:
        r.gain_kept = gain_kept(none, full, nlls(r))
        se = stats.gain_estimate(none, full, nlls(r)).se
        r.gain_kept_se = None if se != se else se  # NaN (one question) -> None, as JSON has no NaN


def nlls(result: MethodResult) -> list[float]:
    """The gold-answer NLL of each question, in the order asked."""
    return [row["nll"] for row in result.rows]


def baseline_nlls(results: Sequence[MethodResult]) -> tuple[list[float], list[float]] | None:
    """``(none, full)`` NLLs per question, or None when either baseline did not run."""
    by_kind = {r.kind: r for r in results}
    if "none" not in by_kind or "full" not in by_kind:
        return None
    return nlls(by_kind["none"]), nlls(by_kind["full"])


def linearised(results: Sequence[MethodResult], result: MethodResult) -> list[float] | None:
    """``result``'s per-question linearised gain kept (:func:`stats.linearised_gain`), None without baselines."""
    base = baseline_nlls(results)
    if base is None:
        return None
    _check_same_questions(results)
    return stats.linearised_gain(*base, nlls(result))


def compare(results: Sequence[MethodResult], a: MethodResult, b: MethodResult) -> stats.Estimate | None:
    """Paired ``gain_kept(a) - gain_kept(b)`` over the questions, with its SE (None without baselines)."""
    base = baseline_nlls(results)
    if base is None:
        return None
    _check_same_questions(results)
    return stats.paired(*base, nlls(a), nlls(b))


def _check_same_questions(results: Sequence[MethodResult]) -> None:
    ids = [[row["id"] for row in r.rows] for r in results]
    if any(i != ids[0] for i in ids):
        raise ValueError("paired statistics need every method to answer the same questions in the same order")
