"""Triton kernels, installed as ``kvcompile.kernels``.

Every kernel has a plain PyTorch reference elsewhere in kvcompile that is the spec
(``kvcompile.attention.ragged_attention`` for attention over a pack); kernels are tested
against it on CPU with ``TRITON_INTERPRET=1`` and used on CUDA devices. None ships yet:
the fp16/bf16/fp32 packs of format 1.0 need no decompression, and the reference
attention is used everywhere.
"""
