"""Linear layers whose parameters know how to load themselves from HF checkpoint tensors.

`MergedLinear` stacks several HF projections (q/k/v, or gate/up) into one GEMM; the loader calls
`param.weight_loader(param, tensor, shard_id)` and the layer copies the tensor into its slice.
Tensor-parallel variants will shard in the same hook.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """One GEMM computing several projections side by side; `shard_names` name the slices."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], shard_names: Sequence[str], bias: bool = False):
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        self.shard_offsets = {}
        off = 0
        for name, size in zip(shard_names, output_sizes):
            self.shard_offsets[name] = (off, size)
            off += size
        self.weight.weight_loader = self._load_shard
        if bias:
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        off, size = self.shard_offsets[shard_id]
        if loaded.shape[0] != size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"checkpoint shard {shard_id!r} has shape {tuple(loaded.shape)}, expected {(size, *param.shape[1:])}"
            )
        param.data[off : off + size].copy_(loaded)
