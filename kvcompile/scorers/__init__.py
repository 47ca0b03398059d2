"""Scorers rank the cached tokens of one layer: which to keep.

A scorer is a small class with one method, ``score(view)``, that takes what one
layer's prefill produced (:class:`LayerView`) and returns a score per candidate row
(ragged over KV heads); higher means keep. Scores of the heads of one layer must be
comparable, because heads compete for the layer's budget (per-head budgets).
New scorers are new files that call :func:`register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..errors import OptionError
from ..ragged import RaggedKV


@dataclass
class LayerView:
    """What the prefill of ``[context | kept | chunk | probe]`` produced, for some heads.

    candidates: the tokens competing for the budget, ragged per KV head: keys
        (post-RoPE), values and positions of ``[kept | chunk]``. Its heads may span
        several layers: they are the model's heads ``first_head...`` counted layer-major
        (``kv_heads`` per layer), so that :meth:`layers` can tell each one's layer.
    probe_keys: ``[heads, n_probe, head_dim]`` post-RoPE keys of the probe (task
        prompt) tokens, which follow the candidates.
    queries: ``[heads x group, n_probe, head_dim]`` post-RoPE queries of the probe tokens.
    chunk_start: the position of the chunk's first token: candidates before it are the
        earlier chunks' survivors (``None``: every candidate is new).
    reconstruction: ``[N]`` each candidate's reconstruction score, the most attention a
        repeat of the corpus pays it (:mod:`kvcompile.reconstruction`); only where the whole
        corpus is read at once (``--context whole``) and the scorer reads it, else ``None``.
    """

    candidates: RaggedKV
    probe_keys: torch.Tensor | None
    queries: torch.Tensor | None
    scaling: float
    first_head: int = 0
    kv_heads: int = 0  # KV heads per layer; 0: the candidates' heads are one layer
    chunk_start: int | None = None
    reconstruction: torch.Tensor | None = None

    @property
    def n_probe(self) -> int:
        return 0 if self.queries is None else self.queries.shape[1]

    def layers(self) -> torch.Tensor:
        """``[heads]``: the model layer of each of the candidates' heads."""
        per = self.kv_heads or self.candidates.heads
        heads = torch.arange(self.candidates.heads, device=self.candidates.keys.device)
        return (self.first_head + heads) // per

    def survivors(self) -> torch.Tensor:
        """``[N]`` bool: the candidates kept from earlier chunks (as opposed to the chunk's new tokens)."""
        if self.chunk_start is None:
            return torch.zeros_like(self.candidates.positions, dtype=torch.bool)
        return self.candidates.positions < self.chunk_start


class Scorer(ABC):
    """Base class; subclasses set ``name`` and implement :meth:`score`."""

    name: str = ""
    reads_task_prompt: bool = True  # False: scores without the probe (queries and probe_keys may be None)
    # True: the rows it has judged and kept are frozen, and later chunks score only the rest
    # (each head's unjudged tail: :meth:`window`), so compression is recursive as in LagKV.
    recursive: bool = False
    # Parameter defaults where the corpus is not read whole (chained and independent builds,
    # BuildOptions.resolved): the terms that need the whole corpus turned off, and settings
    # measured better a document at a time.
    apart: dict = {}
    # Parameter values at which a term is off: left out of segment keys there, so that packs
    # written before the term existed stay reusable; and the defaults of a stream scorer's
    # final selection, which sees the whole stream but cannot repeat the corpus.
    off: dict = {}

    @property
    def reads_reconstruction(self) -> bool:
        """Whether :meth:`score` needs ``view.reconstruction`` (the corpus repeated after itself)."""
        return False

    @abstractmethod
    def score(self, view: LayerView) -> torch.Tensor:
        """A score ``[N]`` for each candidate row of ``view.candidates``; higher = keep.

        All heads at once (no loop over heads), on the candidates' device.
        """

    def params(self) -> dict:
        """The parameters recorded in the pack (everything that changes the scores)."""
        return {}

    def window(self, rows: int) -> int:
        """Of a head's ``rows`` open candidates (in position order), how many at the end it leaves
        unjudged, to be judged again with the next chunk (a recursive scorer's window)."""
        return rows


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    SCORERS[cls.name] = cls
    return cls


def make_scorer(name: str, **params) -> Scorer:
    if name not in SCORERS:
        raise OptionError(f"unknown scorer {name!r}: choose one of {', '.join(sorted(SCORERS))}")
    return SCORERS[name](**params)


from . import lagkv, snapkv, stride, task_aware  # noqa: E402,F401  (registration)
