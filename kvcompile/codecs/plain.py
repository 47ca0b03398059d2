"""Plain floating-point storage: fp16, bf16, fp32. Exact up to the dtype's rounding."""

from __future__ import annotations

from typing import Sequence

import torch

from ..container import NAMES
from ..errors import PackError
from . import Codec, register


class FloatCodec(Codec):
    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def encode(self, x: torch.Tensor, runs: Sequence[int] = ()) -> dict[str, torch.Tensor]:
        return {"data": x.to(self.dtype).cpu().contiguous()}

    def roundtrip(self, x: torch.Tensor, runs: Sequence[int] = ()) -> torch.Tensor:
        return x.to(self.dtype)  # on the device: a cast is the whole round trip

    def layout(self, runs: Sequence[int], head_dim: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"data": (NAMES[self.dtype], (sum(runs), head_dim))}

    def decode(self, tensors: dict[str, torch.Tensor], runs: Sequence[int], head_dim: int) -> torch.Tensor:
        data, tokens = tensors.get("data"), sum(runs)
        if data is None or data.dtype != self.dtype or tuple(data.shape) != (tokens, head_dim):
            got = "missing" if data is None else f"{data.dtype} {tuple(data.shape)}"
            raise PackError(f"corrupt pack: {self.name} data should be {self.dtype} {(tokens, head_dim)}, got {got}")
        return data


def _factory(name: str, dtype: torch.dtype):
    def make() -> FloatCodec:  # no parameters: a header that records any is refused
        return FloatCodec(name, dtype)
    return make


for _name, _dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
    register(_name, _factory(_name, _dtype))
