"""Even-stride baseline: keep every k-th token, whatever it says.

The reference a scorer must beat at the same budget. Tokens at positions ``p`` with
``floor((p + 1) * ratio) > floor(p * ratio)`` (a Bresenham line) score 1, others 0, so
the top ``ratio`` share of any span is spread evenly over it.
"""

from __future__ import annotations

import torch

from . import LayerView, Scorer, register


@register
class StrideScorer(Scorer):
    name = "stride"
    reads_task_prompt = False

    def __init__(self, ratio: float = 0.25):
        self.ratio = float(ratio)

    def params(self) -> dict:
        return {"ratio": self.ratio}

    def score(self, view: LayerView) -> torch.Tensor:
        p = view.candidates.positions.double()
        return (torch.floor((p + 1) * self.ratio) > torch.floor(p * self.ratio)).float()
