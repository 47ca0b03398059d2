"""Codecs turn the kept keys or values of one layer into named tensors, and back.

A codec sees one part (keys or values) of one layer: rows ``[N, head_dim]`` grouped by
KV head, and the *runs* that split them: ``runs[i]`` rows in a row, each run one KV
head's rows of one segment (or of the framing). Quantisation groups never cross a run,
so a segment's encoded rows depend on that segment alone, and a reused segment is
written back byte for byte.

The pack records each part's codec name and :meth:`Codec.params` next to its tensors
(docs/kvpack-format.md, section 3), and the reader builds the codec from exactly that
entry (:func:`codec_from_entry`): what the header records is what the reader uses.
New codecs are new files that call :func:`register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch

from ..errors import OptionError, PackError


class Codec(ABC):
    name: str = ""

    @abstractmethod
    def encode(self, x: torch.Tensor, runs: Sequence[int]) -> dict[str, torch.Tensor]:
        """``x [N, head_dim]`` (``sum(runs) == N``) -> named tensors to store (on ``x``'s device)."""

    @abstractmethod
    def decode(self, tensors: dict[str, torch.Tensor], runs: Sequence[int], head_dim: int) -> torch.Tensor:
        """Stored tensors (on any device) -> ``[N, head_dim]`` on their device.

        Plain codecs give their storage dtype; quantised ones fp32, so that re-encoding
        what they decode gives the same bytes (reused segments stay byte-identical).
        """

    @abstractmethod
    def layout(self, runs: Sequence[int], head_dim: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The tensors a part with these runs should have: ``{role: (dtype name, shape)}``.

        Readers check a pack against this before reading any tensor.
        """

    def params(self) -> dict:
        """Every parameter :func:`codec_from_entry` needs to rebuild this codec."""
        return {}

    @property
    def quantised(self) -> bool:
        """Whether a loaded pack keeps this part encoded on the device (and decodes per layer)."""
        return False

    @property
    def per_run(self) -> bool:
        """Whether each run is encoded on its own (every tensor one block per run). A codec
        that learns from all of a layer's rows (RVQ's codebooks) is not, and its packs are
        rebuilt whole."""
        return True

    def check_values(self, tensors: dict[str, torch.Tensor], runs: Sequence[int]) -> None:
        """Raise PackError where stored values would make a decoder read out of bounds (a code
        past its codebook, an index past its run); shapes are checked by :meth:`layout`.
        Plain and integer codes index nothing: nothing to check."""
        return None

    def fit(self, rows: int, head_dim: int) -> Codec:
        """This codec with the parameters it takes for ``rows`` rows (RVQ sizes its codebooks)."""
        return self

    def units(self, role: str, run: int) -> int:
        """Rows of tensor ``role`` that encode a run of ``run`` rows. Every tensor is one block
        per run, in run order, so a run's encoding can be cut out or put back alone."""
        return run

    def roundtrip(self, x: torch.Tensor, runs: Sequence[int]) -> torch.Tensor:
        """``x [N, head_dim]`` as a reader will get it back, on ``x``'s device."""
        return self.decode(self.encode(x, runs), runs, x.shape[1]).to(x.device)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and (self.name, self.params()) == (other.name, other.params())

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params().items()))))


def copy_runs(codec: Codec, dst: dict[str, torch.Tensor], dst_runs: Sequence[int],
              src: dict[str, torch.Tensor], src_runs: Sequence[int], pairs: Sequence[tuple[int, int]]) -> None:
    """Copy the encoded blocks of runs ``src_runs[j]`` into those of ``dst_runs[i]``, for each
    ``(i, j)`` in ``pairs`` (runs of equal length), in place. A rebuild writes a reused
    segment's bytes this way, so it never re-encodes what it decoded."""
    for role, out in dst.items():
        starts = {}
        for name, runs in (("dst", dst_runs), ("src", src_runs)):
            at, offsets = 0, []
            for r in runs:
                offsets.append(at)
                at += codec.units(role, r)
            starts[name] = offsets
        for i, j in pairs:
            n = codec.units(role, dst_runs[i])
            a, b = starts["dst"][i], starts["src"][j]
            out[a : a + n] = src[role][b : b + n]


Factory = Callable[..., Codec]
CODECS: dict[str, Factory] = {}


def register(name: str, factory: Factory) -> None:
    """``factory(**params)`` builds the codec ``name``; it raises ValueError on bad parameters."""
    CODECS[name] = factory


def make_codec(name: str, **params) -> Codec:
    if name not in CODECS:
        raise OptionError(f"unknown codec {name!r}: choose one of {', '.join(sorted(CODECS))}")
    try:
        return CODECS[name](**params)
    except (TypeError, ValueError) as e:
        raise OptionError(f"codec {name}: {e}") from None


def codec_from_entry(entry: dict, where: str = "codec") -> Codec:
    """The codec a pack's part entry (``{"codec": name, **params, "tensors": ...}``) names,
    built from exactly its recorded parameters. An unknown codec asks for an upgrade; bad
    parameters are a corrupt pack (PackError naming ``where``)."""
    name = entry["codec"]
    if name not in CODECS:
        raise PackError(f"{where}: pack uses codec {name!r}, which this kvcompile does not know: upgrade kvcompile")
    params = {k: v for k, v in entry.items() if k not in ("codec", "tensors")}
    try:
        return CODECS[name](**params)
    except (TypeError, ValueError) as e:
        raise PackError(f"corrupt pack ({where}: codec {name} parameters {params}: {e}): rebuild it") from None


QUANTS = ("none", "int8", "int4", "int3", "int2", "kvmix", "rvq")


def layer_codecs(quant: str, dtype: str, head_dim: int, group: int, layer_bits: Sequence[Sequence[int]],
                 outliers: float = 0.0) -> list[tuple[Codec, Codec]]:
    """The (keys, values) codec of each layer: ``dtype`` (a plain codec) without ``quant``;
    otherwise KIVI's integer groups (keys per channel over ``group`` tokens, values per
    token over ``group`` channels, at most ``head_dim``) at the bits of ``layer_bits``
    (per layer, ``(key bits, value bits)``), with a share ``outliers`` of rows exact."""
    if quant == "none":
        plain = make_codec(dtype)
        return [(plain, plain) for _ in layer_bits]
    if quant == "rvq":  # layer_bits: (depth, depth), levels of 8-bit codes per sub-vector
        g = min(group, head_dim)
        if head_dim % g:
            raise OptionError(f"--quant rvq: a group of {g} channels does not divide head_dim {head_dim}")
        return [(make_codec("rvq", depth=k, size=256, group=g, interleave=True),
                 make_codec("rvq", depth=v, size=256, group=g, interleave=False)) for k, v in layer_bits]
    out = []
    for kb, vb in layer_bits:
        keys = make_codec("int", bits=kb, per="channel", group=group, outliers=outliers)
        values = make_codec("int", bits=vb, per="token", group=min(group, head_dim), outliers=outliers)
        for c in (keys, values):
            try:
                c.check(head_dim)
            except ValueError as e:
                raise OptionError(f"--quant {quant}: {e}") from None
        out.append((keys, values))
    return out


from . import integer, plain, rvq  # noqa: E402,F401  (registration)
