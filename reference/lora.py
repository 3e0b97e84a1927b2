"""CREMA's multimodal LoRA on the Q-Former's self-attention query and value projections.

One adapter per modality, `y = W x + b + B_m(A_m(x))` with **no scaling** (CREMA's
`_LoRALayer_multimodal`). Which adapter runs is chosen per call by the model (`active`); `None`
runs the base projection (a modality written `m-skip`). Written by hand rather than with peft:
peft switches adapters through global model state with its own scaling/dropout conventions, while
CREMA picks one of several adapters inside a single forward; this is a few lines of plain algebra.
Parameter names mirror the LAVIS checkpoint (`w_a_{m}`, `w_b_{m}`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MultiLoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, modalities: tuple[str, ...], rank: int):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight, self.bias = base.weight, base.bias
        for m in modalities:
            setattr(self, f"w_a_{m}", nn.Linear(base.in_features, rank, bias=False,
                                                device=base.weight.device, dtype=base.weight.dtype))
            setattr(self, f"w_b_{m}", nn.Linear(rank, base.out_features, bias=False,
                                                device=base.weight.device, dtype=base.weight.dtype))
        self.active: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.active is not None:
            y = y + getattr(self, f"w_b_{self.active}")(getattr(self, f"w_a_{self.active}")(x))
        return y

    def merged_weight(self, modality: str | None) -> torch.Tensor:
        """W + B_m A_m: the single matrix an exported graph uses for modality m."""
        if modality is None:
            return self.weight
        return self.weight + getattr(self, f"w_b_{modality}").weight @ getattr(self, f"w_a_{modality}").weight
