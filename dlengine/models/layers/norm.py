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


class ZeroCentredRMSNorm(nn.Module):
    """RMSNorm whose stored weight is the offset from 1 (Gemma, Qwen3-Next, Qwen3.5):
    y = norm(x) * (1 + weight), all in float32 then cast back, as transformers computes it (the
    offset is never added in a low-precision dtype, where 1 + w would round w away)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.ops = current_kernels().ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """`norm(x)`; with `residual`, (norm(x + residual), x + residual) like RMSNorm (one fused
        kernel on the Triton path)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual, zero_centred=True)


class GatedRMSNorm(nn.Module):
    """Gated DeltaNet's output norm, per value head: weight * norm(x) * silu(gate), normalised in
    float32 before the gate (fla's FusedRMSNormGated, transformers' RMSNormGated)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.ops = current_kernels().ops

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.ops.gated_rms_norm(x, gate, self.weight, self.eps)
