"""SwiGLU's activation: silu(gate) * up over a [.., 2 * d] input holding gate then up."""

from __future__ import annotations

import torch
from torch import nn

from dlengine.kernels.selection import current_kernels


class SiluAndMul(nn.Module):
    """silu(gate) * up for a [.., 2 * d] input holding gate then up (as the merged gate/up GEMM
    stacks them)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = current_kernels().ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x)
