"""RMSNorm, computed in float32 as Hugging Face does, with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from dlengine.kernels.selection import current_kernels
from dlengine.models.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.ops = current_kernels().ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """`norm(x)`; with `residual`, returns (norm(x + residual), x + residual) so a decoder layer
        carries the running sum without a separate add kernel."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)
