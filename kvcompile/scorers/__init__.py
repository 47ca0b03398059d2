"""Scorers rank the cached tokens of one layer: which to keep.

A scorer is a small class with one method, ``score(view)``, that takes what one
layer's prefill produced (:class:`LayerView`) and returns a score per KV head and
candidate position; higher means keep. Scores of the heads of one layer must be
comparable, because heads compete for the layer's budget (per-head budgets).
New scorers are new files that call :func:`register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..errors import OptionError


@dataclass
class LayerView:
    """What one layer's prefill of ``[kept | chunk | probe]`` produced.

    keys, values: per KV head ``[candidates_h + n_probe, head_dim]``, post-RoPE; the
        last ``n_probe`` rows belong to the probe (task prompt) tokens.
    positions: per KV head ``[candidates_h]``, the candidates' positions.
    queries: ``[q_heads, n_probe, head_dim]`` post-RoPE queries of the probe tokens.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    queries: torch.Tensor | None
    n_probe: int
    scaling: float


class Scorer(ABC):
    """Base class; subclasses set ``name`` and implement :meth:`score`."""

    name: str = ""

    @abstractmethod
    def score(self, view: LayerView) -> list[torch.Tensor]:
        """Per KV head, a score ``[candidates_h]`` for each candidate; higher = keep."""

    def params(self) -> dict:
        """The parameters recorded in the pack (everything that changes the scores)."""
        return {}


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    SCORERS[cls.name] = cls
    return cls


def make_scorer(name: str, **params) -> Scorer:
    if name not in SCORERS:
        raise OptionError(f"unknown scorer {name!r}: choose one of {', '.join(sorted(SCORERS))}")
    return SCORERS[name](**params)


from . import stride, task_aware  # noqa: E402,F401  (registration)
