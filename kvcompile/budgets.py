"""How a pack's budget is shared among its documents.

Each document is compiled into its own segment with its own budget (tokens kept per KV
head, on average over heads). Two policies:

- ``document``: every document keeps the same share of its tokens. A document's budget
  depends on itself alone, so an edit never moves another's.
- ``corpus``: documents compete, as tokens do in a single-prefill press. A survey pass
  (one plain prefill of the whole corpus, then the task prompt, see
  :meth:`kvcompile.builder.survey`) selects the corpus-wide budget with the build's own
  scorer and selection; each document's budget is its share of what that selection
  kept, above a floor. Budgets are rounded onto a geometric grid (:func:`quantize`) and
  enter the segment's key, so that a document is recompiled only when an edit elsewhere
  moves its budget onto another step of the grid. (Measured: one added sentence still
  moved 10 of 19 small documents' budgets, docs/methods.md section 4; the grid absorbs
  nudges smaller than a step, not the survey's shifts.)

The quantised budgets sum to the target within the grid's step (about 4% per document,
and less in total, as rounding errors cancel): a corpus-wide total kept exactly would
make every budget depend on every document.
"""

from __future__ import annotations

import math
from typing import Sequence

BUDGET_POLICIES = ("document", "corpus")

GRID_STEP = 2 ** (1 / 8)  # relative step between neighbouring budgets (about 9%)
EXACT_BELOW = 16  # budgets this small are kept exact: one token is already a large step


def quantize(x: float) -> int:
    """The nearest budget on the grid: exact integers below :data:`EXACT_BELOW`, then
    ``round(GRID_STEP ** k)``. Monotone, and at least 1."""
    if x < EXACT_BELOW:
        return max(1, round(x))
    k = round(math.log(x) / math.log(GRID_STEP))
    return max(EXACT_BELOW, round(GRID_STEP**k))


def document_budgets(lengths: Sequence[int], ratio: float) -> list[int]:
    """``document`` policy: each document keeps ``ratio`` of its tokens (at least one)."""
    return [max(1, round(ratio * n)) for n in lengths]


def corpus_budgets(kept: Sequence[float], lengths: Sequence[int], ratio: float, floor: float) -> list[int]:
    """``corpus`` policy: budgets in proportion to ``kept``, what a corpus-wide selection kept
    of each document (any unit: rows summed over layers and heads), on the grid.

    ``ratio``: the share of the corpus's tokens kept in all. ``floor``: each document keeps
    at least ``floor`` of its ``document`` budget, so that none is dropped outright (a
    question about it can still find its sinks and a few tokens). A budget never exceeds
    its document.
    """
    if not 0 <= floor <= 1:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    target = ratio * sum(lengths)
    base = [floor * ratio * n for n in lengths]
    rest, total_kept = target - sum(base), sum(kept)
    weights = kept if total_kept > 0 else lengths  # nothing kept anywhere: fall back to length
    total = total_kept if total_kept > 0 else sum(lengths)
    return [min(n, quantize(b + rest * w / total)) for b, w, n in zip(base, weights, lengths)]
