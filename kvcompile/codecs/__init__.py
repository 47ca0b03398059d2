"""Codecs turn the kept keys or values of one layer into named tensors, and back.

A codec's ``encode`` takes ``[tokens, head_dim]`` (all KV heads of a layer, grouped by
head) and returns ``{role: tensor}``; ``decode`` inverts it. The pack records the codec's
name and ``params()`` per layer and part (docs/kvpack-format.md, section 3), so
quantised codecs fit in without a format change. New codecs are new files that call
:func:`register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..errors import OptionError, PackError


class Codec(ABC):
    name: str = ""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x [tokens, head_dim]`` -> named tensors to store."""

    @abstractmethod
    def decode(self, tensors: dict[str, torch.Tensor], tokens: int, head_dim: int) -> torch.Tensor:
        """Stored tensors -> ``[tokens, head_dim]``; raises PackError on a shape mismatch."""

    @abstractmethod
    def layout(self, tokens: int, head_dim: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The tensors a part of ``tokens`` rows should have: ``{role: (dtype name, shape)}``.

        Readers check a pack against this before reading any tensor.
        """

    def params(self) -> dict:
        return {}

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """``x [tokens, head_dim]`` as a reader will get it back, on ``x``'s device."""
        return self.decode(self.encode(x), x.shape[0], x.shape[1]).to(x.device)


CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise OptionError(f"unknown codec {name!r}: choose one of {', '.join(sorted(CODECS))}")
    return CODECS[name]


def codec_for_pack(name: str) -> Codec:
    """The codec a pack names; an unknown one is a pack error, not an option error."""
    if name not in CODECS:
        raise PackError(f"pack uses codec {name!r}, which this kvcompile does not know: upgrade kvcompile")
    return CODECS[name]


from . import plain  # noqa: E402,F401  (registration)
