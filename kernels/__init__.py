"""Triton kernels, installed as ``kvcompile.kernels``.

- :func:`ragged_attention` (``attention.py``): flash-decoding attention of ``query [B, Hq, q_len, D]``
  over a ragged per-KV-head prefix (``prefix_keys/values [N, D]`` split by ``offsets [H + 1]``)
  followed by the dense, causal new tokens (``keys/values [B, H, t, D]``); returns
  ``[B, q_len, Hq, D]``. One launch per layer, plus a small combine launch when the key range
  is split across programs.
- :func:`rope` (``rope.py``): rotate stored pre-RoPE keys ``[N, D]`` to their positions
  (``rotate_half`` convention, partial rotary), one launch per layer.
- :func:`dequantize` (``dequant.py``): bit-unpack and dequantise a quantised pack's rows
  (integer codes, fp16 scales and zeros per channel group or per row group) to ``[N, D]``.
- :func:`quant_attention` (``quant_attention.py``): the same attention over a prefix that stays
  integer-coded (:class:`QuantRows`): codes dequantised, exact rows put in place and keys rotated
  to their positions in registers, per block of keys; nothing dense is written.
- :func:`rvq_decode` (``rvq.py``): residual-VQ rows, the gather-sum of their codewords times
  their scale, to ``[N, D]``.
- :func:`page_logits` and :func:`gathered_attention` (``sparse.py``): sparse decode's
  approximate page scores from per-page key bounds, and attention over the prefix rows
  chosen per KV head, read by index (kvcompile/sparse.py).

Each kernel sits next to its plain PyTorch reference (:func:`ragged_attention_reference`,
:func:`rope_reference`, :func:`dequantize_reference`, :func:`quant_attention_reference`,
:func:`rvq_decode_reference`, :func:`page_logits_reference`,
:func:`gathered_attention_reference`), which is
the spec: ``tests/test_kernels.py`` compares them on CPU under
``TRITON_INTERPRET=1`` and ``tests/test_kernels_cuda.py`` on a GPU.

Importing this package never needs triton: the names above are loaded on first access, and
:func:`triton_available` tells whether they can be.
"""

from __future__ import annotations

import importlib
import importlib.util

_EXPORTS = {
    "ragged_attention": "attention",
    "ragged_attention_reference": "attention",
    "choose_num_splits": "attention",
    "rope": "rope",
    "rope_reference": "rope",
    "dequantize": "dequant",
    "dequantize_reference": "dequant",
    "QuantRows": "quant_attention",
    "quant_attention": "quant_attention",
    "quant_attention_reference": "quant_attention",
    "rvq_decode": "rvq",
    "rvq_decode_reference": "rvq",
    "page_logits": "sparse",
    "page_logits_reference": "sparse",
    "gathered_attention": "sparse",
    "gathered_attention_reference": "sparse",
}

__all__ = ["triton_available", *_EXPORTS]


def triton_available() -> bool:
    """Whether triton is installed (the kernels still need a CUDA device, or ``TRITON_INTERPRET=1``)."""
    return importlib.util.find_spec("triton") is not None


def __getattr__(name: str):
    # Lazy: `import kvcompile.kernels` must work without triton; only using a kernel imports it.
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
