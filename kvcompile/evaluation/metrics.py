"""Answer metrics with SQuAD's normalisation: exact match, token F1, and containment.

Each takes a prediction and the gold answers and scores against the best-matching
gold answer, as the SQuAD v2 evaluation script does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Best token-level F1 between the prediction and any gold answer."""
    return max((_f1(normalize_answer(prediction).split(), normalize_answer(a).split()) for a in answers),
               default=0.0)


def contains(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when a normalised gold answer occurs in the normalised prediction (whole words)."""
    p = f" {normalize_answer(prediction)} "
    return float(any((g := normalize_answer(a)) and f" {g} " in p for a in answers))


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)  # both empty counts as a match, as in SQuAD v2
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
