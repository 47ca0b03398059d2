"""Rotary position embeddings, applied and undone outside the model.

Packs store keys *before* RoPE together with each kept token's position (principle 5 of
the architecture), so keys can be placed at any position at load time. These helpers
follow the ``rotate_half`` convention of Llama, Qwen, Mistral and Gemma, or the
interleaved one of Cohere (``Capability.rope_layout``); ``cos``/``sin``
come from the model's own rotary module so scaling variants (linear, YaRN, llama3) are
honoured.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache

import torch

from .capability import capability
from .ragged import RaggedKV


@cache
def _kernel():
    """``kvcompile.kernels.rope.rope``, or None where Triton is missing."""
    try:
        from .kernels import rope
    except ImportError:
        return None
    return rope.rope


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's convention: channel i pairs with channel i + d/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """The interleaved convention (Cohere, GPT-J): channel 2i pairs with channel 2i + 1."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate ``x [..., tokens, head_dim]`` by the angles whose cos/sin are given.

    ``cos``/``sin`` broadcast against ``x``; when they cover fewer channels than
    ``head_dim`` (partial rotary), only the leading channels are rotated. ``interleaved``
    pairs adjacent channels (the model's cos/sin are then repeated per pair, not per half).
    """
    rotate = rotate_pairs if interleaved else rotate_half
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rotate(rot) * sin, rest), dim=-1)


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Inverse of :func:`apply_rope`: a rotation by the negated angles."""
    return apply_rope(x, cos, -sin, interleaved)


class Rotary:
    """cos/sin for arbitrary positions from a model's rotary module.

    ``model.model.rotary_emb`` is where every RoPE model in transformers keeps it;
    :func:`rotaries` gives each layer its own (None without RoPE: keys stored as they are).
    ``layer_type``: for modules that serve several RoPEs (Gemma-3's local and global
    layers), the one of this layer.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, interleaved: bool = False,
                 half_width: bool = False, layer_type: str | None = None):
        self.module = module
        self.dtype = dtype
        self.interleaved = interleaved
        self.half_width = half_width
        self.layer_type = layer_type

    @torch.no_grad()
    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[tokens, rotary_dim]`` for 1-D integer ``positions``."""
        probe = torch.empty(0, dtype=self.dtype, device=positions.device)
        args = (probe, positions.long().unsqueeze(0)) + ((self.layer_type,) if self.layer_type else ())
        cos, sin = self.module(*args)
        if self.half_width:
            return torch.cat([cos[0], cos[0]], dim=-1), torch.cat([sin[0], sin[0]], dim=-1)
        return cos[0], sin[0]

    @torch.no_grad()
    def frequencies(self, positions: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """``(inv_freq [R / 2] fp32, scaling)`` such that ``cos = cos(p x inv_freq) x scaling``
        (both halves) gives this rotary's angles at ``positions``, for kernels that rotate keys
        themselves; None where no such pair reproduces the module's output there (interleaved
        layouts, modules without an ``inv_freq`` buffer or whose frequencies depend on more
        than the position). Checked against the module, once per call: a host sync."""
        prefix = f"{self.layer_type}_" if self.layer_type else ""
        inv_freq = getattr(self.module, f"{prefix}inv_freq", None)
        if self.interleaved or not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1:
            return None
        inv_freq = inv_freq.to(positions.device, torch.float32).contiguous()
        scaling = float(getattr(self.module, f"{prefix}attention_scaling", 1.0))
        cos, sin = self.cos_sin(positions)
        angles = positions.float()[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        if cos.shape != angles.shape:
            return None
        tolerance = 4 * torch.finfo(cos.dtype).eps  # the module's output is rounded to the model's dtype
        for mine, theirs in ((angles.cos() * scaling, cos), (angles.sin() * scaling, sin)):
            if not torch.allclose(mine, theirs.float(), atol=tolerance, rtol=0):
                return None
        return inv_freq, scaling

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [tokens, head_dim]`` to ``positions [tokens]`` (on CUDA: one Triton launch)."""
        cos, sin = self.cos_sin(positions.to(x.device))
        kernel = _kernel() if x.is_cuda and not self.interleaved else None
        if kernel is not None:
            return kernel(x, cos, sin)
        return apply_rope(x, cos.to(x.dtype), sin.to(x.dtype), self.interleaved)

    def undo(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo the rotation of ``x [tokens, head_dim]`` at ``positions [tokens]``."""
        cos, sin = self.cos_sin(positions.to(x.device))
        # Some rope types (YaRN, longrope) scale cos and sin by s; the inverse of s*R is R^T / s.
        name = f"{self.layer_type}_attention_scaling" if self.layer_type else "attention_scaling"
        s2 = float(getattr(self.module, name, 1.0)) ** 2
        return undo_rope(x, cos.to(x.dtype) / s2, sin.to(x.dtype) / s2, self.interleaved)


def rotaries(model: torch.nn.Module) -> list[Rotary | None]:
    """Each layer's rotary, or None for a layer without RoPE (SmolLM3's ``no_rope_layers``, or
    a model without a rotary module). Layers with the same RoPE share one object."""
    config = model.config
    layers = config.num_hidden_layers
    module = getattr(getattr(model, "base_model", model), "rotary_emb", None)
    if module is None:
        return [None] * layers
    layout = capability(config).rope_layout
    dtype = next(model.parameters()).dtype
    # A module whose forward takes a layer type serves one RoPE per type (Gemma-3).
    typed = "layer_type" in inspect.signature(module.forward).parameters
    shared: dict[str | None, Rotary] = {}
    out: list[Rotary | None] = []
    for li in range(layers):
        if getattr(config, "no_rope_layers", None) and not config.no_rope_layers[li]:
            out.append(None)
            continue
        layer_type = config.layer_types[li] if typed else None
        if layer_type not in shared:
            shared[layer_type] = Rotary(module, dtype, layout == "pairs", layout == "half-width", layer_type)
        out.append(shared[layer_type])
    return out


# Rows rotated per call. A rotation makes cos, sin and their products, each as large as the
# keys: over a streamed compile's whole context (the window's room in every layer and head)
# that was several times the context itself, the build's peak memory.
ROTATE_ROWS = 1 << 16


def _by_layer(kv: RaggedKV, per_layer: Sequence[Rotary | None], undo: bool) -> torch.Tensor:
    """The keys of ``kv`` (``len(per_layer)`` layers stacked, :meth:`RaggedKV.stack`) rotated,
    or un-rotated, by each layer's rotary: one call when every layer shares one, in blocks of
    :data:`ROTATE_ROWS` rows (the same values: RoPE is per row)."""
    def turn(rotary: Rotary | None, part: RaggedKV) -> torch.Tensor:
        if rotary is None:
            return part.keys
        f = rotary.undo if undo else rotary.apply
        if part.rows <= ROTATE_ROWS:
            return f(part.keys, part.positions)
        out = torch.empty_like(part.keys)
        for a in range(0, part.rows, ROTATE_ROWS):
            out[a : a + ROTATE_ROWS] = f(part.keys[a : a + ROTATE_ROWS], part.positions[a : a + ROTATE_ROWS])
        return out

    if all(r is per_layer[0] for r in per_layer):
        return turn(per_layer[0], kv)
    return torch.cat([turn(r, part) for r, part in zip(per_layer, kv.split(len(per_layer)))])


def unrotate(kv: RaggedKV, per_layer: Sequence[Rotary | None]) -> torch.Tensor:
    """Post-RoPE keys of ``kv`` (layers stacked) as a pack stores them: before RoPE."""
    return _by_layer(kv, per_layer, undo=True)


def place(kv: RaggedKV, per_layer: Sequence[Rotary | None], device: torch.device, dtype: torch.dtype,
          shift: int = 0) -> RaggedKV:
    """Stored KV (pre-RoPE keys; ``len(per_layer)`` layers stacked) made attendable: on
    ``device`` in ``dtype``, positions moved by ``shift``, keys rotated to them by each
    layer's rotary. The loader and the compiler both place KV this way."""
    kv = kv.to(device, dtype).shifted(shift)
    if all(r is None for r in per_layer):
        return kv
    return kv.replace(keys=_by_layer(kv, per_layer, undo=False))
