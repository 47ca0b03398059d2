"""Rotary position embeddings, applied and undone outside the model.

Packs store keys *before* RoPE together with each kept token's position (principle 5 of
the architecture), so keys can be placed at any position at load time. These helpers
follow the ``rotate_half`` convention of Llama, Qwen, Mistral and Gemma, or the
interleaved one of Cohere (:data:`INTERLEAVED`); ``cos``/``sin``
come from the model's own rotary module so scaling variants (linear, YaRN, llama3) are
honoured.
"""

from __future__ import annotations

from functools import cache

import torch

from .ragged import RaggedKV

# Model types whose RoPE pairs adjacent channels (their cos/sin are repeated per pair).
INTERLEAVED = frozenset({"cohere"})
# Model types whose rotary module returns cos/sin for half the channels, applied to both
# halves (gpt-oss): Llama's rotation with the angles written once.
HALF_WIDTH = frozenset({"gpt_oss"})


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

    ``model.model.rotary_emb`` is where every RoPE model in transformers keeps it; a
    model without one gets ``None`` from :func:`Rotary.of` and keys are stored as is.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, interleaved: bool = False,
                 half_width: bool = False):
        self.module = module
        self.dtype = dtype
        self.interleaved = interleaved
        self.half_width = half_width

    @classmethod
    def of(cls, model: torch.nn.Module) -> Rotary | None:
        base = getattr(model, "model", model)
        module = getattr(base, "rotary_emb", None)
        if module is None:
            return None
        model_type = getattr(model.config, "model_type", None)
        return cls(module, next(model.parameters()).dtype, model_type in INTERLEAVED, model_type in HALF_WIDTH)

    @torch.no_grad()
    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[tokens, rotary_dim]`` for 1-D integer ``positions``."""
        probe = torch.empty(0, dtype=self.dtype, device=positions.device)
        cos, sin = self.module(probe, positions.long().unsqueeze(0))
        if self.half_width:
            return torch.cat([cos[0], cos[0]], dim=-1), torch.cat([sin[0], sin[0]], dim=-1)
        return cos[0], sin[0]

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
        s2 = float(getattr(self.module, "attention_scaling", 1.0)) ** 2
        return undo_rope(x, cos.to(x.dtype) / s2, sin.to(x.dtype) / s2, self.interleaved)


def place(kv: RaggedKV, rotary: Rotary | None, device: torch.device, dtype: torch.dtype, shift: int = 0) -> RaggedKV:
    """Stored KV (pre-RoPE keys) made attendable: on ``device`` in ``dtype``, positions moved
    by ``shift``, keys rotated to them. The loader and the compiler both place KV this way."""
    kv = kv.to(device, dtype).shifted(shift)
    return kv.replace(keys=rotary.apply(kv.keys, kv.positions)) if rotary is not None else kv
