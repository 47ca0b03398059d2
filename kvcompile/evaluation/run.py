"""Run methods over questions and collect per-question scores, timings and memory."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..data.qa import QA
from ..quality import gain_kept
from .memory import PeakMemory
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

    def summary(self) -> dict:
        """Means of the scores, medians of the timings, and the sizes."""
        def mean(key):
            return statistics.fmean(r[key] for r in self.rows) if self.rows else float("nan")

        def median(key):
            xs = [r[key] for r in self.rows if r.get(key) is not None]
            return statistics.median(xs) if xs else float("nan")

        return {"name": self.name, "kind": self.kind, "ratio": self.ratio, "questions": len(self.rows),
                "contains": mean("contains"), "exact_match": mean("exact_match"), "f1": mean("f1"),
                "nll": mean("nll"), "gain_kept": self.gain_kept, "ttft_s": median("ttft"),
                "tokens_per_s": median("tokens_per_s"), "peak_memory": self.peak_memory,
                "kv_bytes": self.kv_bytes, "kv_tokens": self.kv_tokens, "setup_s": self.setup_seconds}

    def to_json(self) -> dict:
        return {**self.summary(), "rows": self.rows}


def run_method(make: Callable[[], Method], questions: Sequence[QA], device: torch.device | str = "cpu",
               max_new_tokens: int = 32, step: Callable[[str], None] | None = None) -> MethodResult:
    """Build one method (``make``), ask it every question, and free it.

    Peak memory covers building the method (its cache) and answering.
    """
    with PeakMemory(device) as mem:
        method = make()
        rows = []
        for qa in questions:
            nll = method.answer_nll(qa)
            prediction, timings = method.generate(qa, max_new_tokens)
            rows.append({"id": qa.id, "question": qa.question, "answers": list(qa.answers),
                         "prediction": prediction, "nll": nll,
                         "exact_match": exact_match(prediction, qa.answers), "f1": f1(prediction, qa.answers),
                         "contains": contains(prediction, qa.answers),
                         "ttft": timings["ttft"], "tokens_per_s": timings["tokens_per_s"] or None})
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
    """Set ``gain_kept`` on every result, from the ``none`` and ``full`` results when both ran.

    Pooled over questions (:func:`kvcompile.quality.gain_kept`).
    """
    by_kind = {r.kind: r for r in results}
    if "none" not in by_kind or "full" not in by_kind:
        return
    none = [r["nll"] for r in by_kind["none"].rows]
    full = [r["nll"] for r in by_kind["full"].rows]
    for r in results:
        r.gain_kept = gain_kept(none, full, [x["nll"] for x in r.rows])
