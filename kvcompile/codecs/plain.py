"""Plain floating-point storage: fp16, bf16, fp32. Exact up to the dtype's rounding."""

from __future__ import annotations

import torch

from ..container import NAMES
from ..errors import PackError
from . import Codec, register


class FloatCodec(Codec):
    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"data": x.to(self.dtype).cpu().contiguous()}

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)  # on the device: a cast is the whole round trip

    def layout(self, tokens: int, head_dim: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"data": (NAMES[self.dtype], (tokens, head_dim))}

    def decode(self, tensors: dict[str, torch.Tensor], tokens: int, head_dim: int) -> torch.Tensor:
        data = tensors.get("data")
        if data is None or data.dtype != self.dtype or tuple(data.shape) != (tokens, head_dim):
            got = "missing" if data is None else f"{data.dtype} {tuple(data.shape)}"
            raise PackError(f"corrupt pack: {self.name} data should be {self.dtype} {(tokens, head_dim)}, got {got}")
        return data


for _name, _dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
    register(FloatCodec(_name, _dtype))
