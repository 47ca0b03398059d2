"""Standard errors and paired comparisons of *gain kept*, per corpus and pooled over corpora.

Gain kept (:func:`kvcompile.quality.gain_kept`) is a ratio of sums over a corpus's
questions: with ``x_i = nll_none_i - nll_method_i`` (the method's gain on question i) and
``y_i = nll_none_i - nll_full_i`` (the full context's), ``R = mean(x) / mean(y)``.

Its standard error is the delta-method (ratio-estimator) one,
``SE(R) = sd(x_i - R y_i) / (sqrt(k) mean(y))``, which counts the noise of the full
context's gain too (the denominator is estimated from the same questions). It is the
standard error of the mean of the *linearised per-question gain kept*

    z_i = R + (x_i - R y_i) / mean(y),

whose mean is exactly ``R``. ``full`` has ``z_i = 1`` and ``none`` has ``z_i = 0`` on
every question, so their gain kept is 1 and 0 with no error, as it should be.

Everything else works on these per-question values:

- a **paired comparison** of methods A and B on the same questions is the mean and
  standard error of ``z^A_i - z^B_i`` (= the delta-method SE of ``R_A - R_B``);
- **pooling over corpora** concatenates the corpora's per-question values, each corpus's
  normalised by its own full-context gain: the pooled mean weighs every question equally
  (with as many questions in each corpus, the mean of the corpora's gains kept), and its
  standard error treats questions as the sampling unit, so differences between corpora
  count as noise too (a conservative choice next to treating the corpora as fixed strata).

The standard error uses the sample standard deviation (``k - 1``); it is NaN for fewer
than two values, and every value is NaN when a corpus's full context does not help on
average (``mean(y) <= 0``), as gain kept itself is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

NAN = float("nan")


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error, over ``questions`` questions of ``corpora`` corpora."""

    mean: float
    se: float
    questions: int
    corpora: int = 1

    @property
    def z(self) -> float:
        """``mean / se``: how many standard errors from zero (NaN when there is no error to divide by)."""
        if math.isnan(self.se) or self.se == 0 or math.isnan(self.mean):
            return NAN
        return self.mean / self.se

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    def format(self, signed: bool = False, digits: int = 2) -> str:
        """``0.61 ± 0.12`` (``+0.10 ± 0.05`` when ``signed``); ``–`` when there is no mean."""
        if math.isnan(self.mean):
            return "–"
        m = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        return m if math.isnan(self.se) else f"{m} ± {self.se:.{digits}f}"


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (sample sd / sqrt(n)); NaN where undefined."""
    n = len(values)
    if n == 0 or any(math.isnan(v) for v in values):
        return NAN, NAN
    m = math.fsum(values) / n
    if n < 2:
        return m, NAN
    var = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def linearised_gain(none: Sequence[float], full: Sequence[float], method: Sequence[float]) -> list[float]:
    """Per-question values ``z_i`` whose mean is the pooled gain kept and whose SE is its delta-method SE."""
    if not len(none) == len(full) == len(method):
        raise ValueError(f"need one NLL per question for each: {len(none)}, {len(full)}, {len(method)}")
    k = len(none)
    if k == 0:
        return []
    y = [n - f for n, f in zip(none, full)]
    x = [n - m for n, m in zip(none, method)]
    y_bar = math.fsum(y) / k
    if not y_bar > 0:
        return [NAN] * k
    r = math.fsum(x) / k / y_bar
    return [r + (xi - r * yi) / y_bar for xi, yi in zip(x, y)]


def per_question_gain(none: Sequence[float], full: Sequence[float], method: Sequence[float]) -> list[float]:
    """``(nll_none_i - nll_method_i) / mean(nll_none - nll_full)``: each question's share, same mean as ``z``.

    Shown for reading single questions; its plain SE ignores the noise of the denominator.
    """
    k = len(none)
    if k == 0:
        return []
    y_bar = math.fsum(n - f for n, f in zip(none, full)) / k
    if not y_bar > 0:
        return [NAN] * k
    return [(n - m) / y_bar for n, m in zip(none, method)]


def gain_estimate(none: Sequence[float], full: Sequence[float], method: Sequence[float]) -> Estimate:
    """Gain kept on one corpus with its delta-method standard error."""
    m, se = mean_se(linearised_gain(none, full, method))
    return Estimate(m, se, len(none))


def paired(none: Sequence[float], full: Sequence[float], a: Sequence[float], b: Sequence[float]) -> Estimate:
    """``gain_kept(a) - gain_kept(b)`` on one corpus's questions, with its paired standard error."""
    za, zb = linearised_gain(none, full, a), linearised_gain(none, full, b)
    m, se = mean_se([p - q for p, q in zip(za, zb)])
    return Estimate(m, se, len(none))


def pooled(groups: Iterable[Sequence[float]]) -> Estimate:
    """Mean and SE of the per-question values of several corpora taken together (one group per corpus)."""
    groups = [list(g) for g in groups if len(g)]
    values = [v for g in groups for v in g]
    m, se = mean_se(values)
    return Estimate(m, se, len(values), len(groups))
