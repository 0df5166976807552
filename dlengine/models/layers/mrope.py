"""Multimodal RoPE (M-RoPE) as Qwen3-VL uses it: every token has three positions (temporal,
height, width); rotary frequency j takes its angle from one of them. With the interleaved layout
(Qwen3-VL), frequency j uses height when j % 3 == 1 and j < 3 * sections[1], width when
j % 3 == 2 and j < 3 * sections[2], temporal otherwise. Text tokens carry one position on all
three axes, so for them this is plain RoPE.

A forward builds the step's per-token cos/sin once (`MRotaryEmbedding.step`) and every attention
layer rotates with it: the table is indexed by the token's row in the batch, so the regular rope
ops (torch reference or the fused norm + rope + KV-write kernel) run unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dlengine.config import ConfigError, RopeConfig
from dlengine.kernels.selection import current_kernels
from dlengine.models.layers.rotary import rope_inv_freq


class RopeStep:
    """The rotation of one forward: per-token tables; `positions` are the rows (0 .. T-1)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, ops) -> None:
        self.cos_cached, self.sin_cached, self.ops = cos, sin, ops
        self.positions = torch.arange(cos.shape[0], device=cos.device)

    def __call__(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self.ops.rope(q, k, positions, self.cos_cached, self.sin_cached)


class MRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig, sections: Sequence[int]) -> None:
        super().__init__()
        half = head_dim // 2
        if len(sections) != 3 or sum(sections) != half:
            raise ConfigError(f"mrope_section={list(sections)} must be three sizes summing to head_dim / 2 = {half}")
        if rope.rope_type != "default":
            raise ConfigError(f"rope type {rope.rope_type!r} with M-RoPE is not supported (Qwen3-VL uses 'default')")
        inv_freq, scale = rope_inv_freq(rope, head_dim)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos_cached", emb.cos() * scale, persistent=False)
        self.register_buffer("sin_cached", emb.sin() * scale, persistent=False)
        axis = torch.zeros(half, dtype=torch.int64)
        j = torch.arange(half)
        axis[(j % 3 == 1) & (j < 3 * sections[1])] = 1
        axis[(j % 3 == 2) & (j < 3 * sections[2])] = 2
        self.register_buffer("axis_of_dim", torch.cat([axis, axis]), persistent=False)  # [head_dim]
        self.ops = current_kernels().ops

    def step(self, positions: torch.Tensor) -> RopeStep:
        """positions [3, T] (or [T]: text only) -> this forward's rotation."""
        if positions.dim() == 1:
            return RopeStep(self.cos_cached[positions], self.sin_cached[positions], self.ops)
        idx = self.axis_of_dim[None, None, :].expand(1, positions.shape[1], -1)
        cos = self.cos_cached[positions].gather(0, idx)[0]  # [3, T, D] -> [T, D]
        sin = self.sin_cached[positions].gather(0, idx)[0]
        return RopeStep(cos, sin, self.ops)
