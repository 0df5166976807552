import torch
from torch import nn

from dlengine.kernels import ops


class SiluAndMul(nn.Module):
    """silu(gate) * up for a [.., 2 * d] input holding gate then up (as MergedLinear stacks them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)
