"""Rotary position embedding (neox / rotate-half layout) with the scaling types HF configs use.

Frequencies follow transformers' `modeling_rope_utils` so float32 outputs match it exactly:
default, linear, yarn (with attention_factor / mscale) and llama3. The cos/sin table is built once
for every position up to `max_position`; a forward indexes it with the tokens' positions, so
chunked prefill and decode need no special cases.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlengine.config import ConfigError, RopeConfig
from dlengine.kernels.selection import current_kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor = rope.theta, rope.factor
    orig = rope.original_max_position_embeddings

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def _llama3_inv_freq(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, low_ff, high_ff = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim // 2] and the cos/sin scale for this RoPE configuration."""
    if rope.rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {rope.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope.rope_type == "yarn":
        if not rope.original_max_position_embeddings:
            raise ConfigError("yarn rope scaling needs original_max_position_embeddings")
        return _yarn_inv_freq(rope, dim)
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(rope, inv_freq)
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig) -> None:
        super().__init__()
        if rope.partial_rotary_factor != 1.0:
            raise ConfigError("partial rotary embeddings are not supported by this model")
        inv_freq, scale = rope_inv_freq(rope, head_dim)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos_cached", emb.cos() * scale, persistent=False)
        self.register_buffer("sin_cached", emb.sin() * scale, persistent=False)
        self.ops = current_kernels().ops

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, Hkv, D], positions [T]."""
        return self.ops.rope(q, k, positions, self.cos_cached, self.sin_cached)
