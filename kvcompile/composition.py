"""Several packs answered as one context: their KV placed one after another (issue 14).

Users keep several corpora (a handbook, release notes, tickets) and ask across them without
compiling the union. Packs built with one model compose at load: the first pack whole
(its framing included), then each later pack's corpus rows (its framing dropped, the first
pack's serves), each placed right after the pack before it. Keys are stored before RoPE, so
placing is only a choice of positions (:meth:`~kvcompile.pack.Pack.attended_positions`):

- ``compact`` (the default): in each (layer, KV head), each pack's kept tokens at their ranks,
  one pack after the longest head of the pack before; the question follows the last pack;
- ``original``: each pack's own spacing kept (its dropped tokens leave gaps), one after another.

A pack's documents never attended to another pack's: what two packs give is what
``--context independent`` gives between documents. With every token kept and packs built
``independent``, the composition is exactly the pack of the union (tested).
"""

from __future__ import annotations

from typing import Sequence

from .errors import OptionError
from .models import LoadedModel, load_model
from .pack import POSITIONS, Pack, check_same_model, visible
from .ragged import RaggedKV, within_heads
from .rope import place, rotaries
from .session import Session


def _corpus_rows(pack: Pack, mode: str, start: int, whole: bool) -> tuple[list[RaggedKV], int]:
    """``pack``'s layers (decoded, pre-RoPE) at ``mode``'s positions, moved to begin at ``start``,
    without the framing's rows unless ``whole``; and the positions they take."""
    at, end = pack.attended_positions(mode)
    prefix = pack.layout["tokens"] - pack.header["corpus"]["tokens"]
    layers = []
    for li in range(len(pack.kept)):
        layer = pack.layer(li)
        if whole:
            layers.append(layer.replace(positions=at[li] + start))
            continue
        layer = layer.where(layer.positions >= prefix)
        moved = within_heads(layer.lengths) if mode == "compact" else layer.positions - prefix
        layers.append(layer.replace(positions=moved.to(layer.positions.dtype) + start))
    if whole:
        return layers, end
    return layers, max(layer.max_len for layer in layers) if mode == "compact" else end - prefix


def compose(packs: Sequence[Pack], model: LoadedModel | str | None = None, positions: str = "auto") -> Session:
    """A :class:`~kvcompile.session.Session` over ``packs`` as one context (module docstring).

    All packs must come from one model (refused naming both otherwise), and together fit its
    window. Quantised packs are decoded at load (a composed context is held in the model's
    dtype). ``positions``: ``compact``, ``original`` or ``auto`` (``compact``; for a single pack of
    a model with absolute positions, ``original``).
    """
    if not packs:
        raise OptionError("give at least one pack to compose")
    if positions not in POSITIONS:
        raise OptionError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    first = packs[0]
    mode = positions if positions != "auto" else "compact" if first.model["rope"] else "original"
    check_same_model(packs, "compose")
    if len(packs) > 1 and not first.model["rope"]:
        raise OptionError(f"{first.model['name']!r} has absolute positions: a pack's KV holds them, so packs of it "
                          "cannot be placed after one another; build one pack of all the corpora")
    lm = model if isinstance(model, LoadedModel) else load_model(model or first.model["name"], progress=False)
    parts, start = [], 0
    for k, pack in enumerate(packs):
        pack.check_model(lm)
        layers, taken = _corpus_rows(pack, mode, start, whole=k == 0)
        parts.append(layers)
        start += taken
    if start >= lm.max_positions:
        hint = "load them with positions compact" if mode == "original" else "compose fewer or smaller packs"
        raise OptionError(f"the {len(packs)} packs take {start} positions, more than {lm.name}'s window of "
                          f"{lm.max_positions}: {hint}")
    per_layer = rotaries(lm.model) if first.model["rope"] else [None] * len(first.kept)
    kv = []
    for li in range(len(first.kept)):
        layer = visible(RaggedKV.cat([p[li] for p in parts]), lm.capability.windows[li], start)
        kv.append(place(layer, [per_layer[li]], lm.device, lm.dtype))
    return Session.over(lm, first.framing, kv, start)
