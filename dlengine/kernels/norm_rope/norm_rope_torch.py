"""Plain torch references of the fused ops in norm_rope_triton.py (same signatures). They define
the numerics the kernels are tested against, and are what CPU and attention("torch") run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlengine.kernels.attention.paged_attention_torch import write_kv_cache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             zero_centred: bool = False):
    """Hugging Face's RMSNorm (normalise in float32, round, scale by the weight); zero_centred: the
    Gemma / Qwen3-Next form, norm(x) * (1 + weight) in float32, rounded once (the offset is never
    added in a low-precision dtype, where 1 + w would round w away)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    if zero_centred:
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)
    else:
        normed = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, x)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gated DeltaNet's output norm over the last dim: weight * norm(x) (normalised in float32,
    rounded to x's dtype, scaled) times silu(gate) in float32, rounded once (transformers'
    RMSNormGated, fla's FusedRMSNormGated)."""
    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (y * F.silu(gate.float())).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Neox-style rotation as transformers computes it (cos/sin cast to the activation dtype)."""
    c = cos[positions].unsqueeze(1).to(q.dtype)
    s = sin[positions].unsqueeze(1).to(q.dtype)
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor | None = None,
                  k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                  q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (with norm weights), then the rotation, then (given the caches)
    k and v stored at `slot_mapping` (an FP8 cache: quantised with k_scale / v_scale); returns the
    new (q, k). The Triton kernel does it in one pass, in place."""
    if q_norm_weight is not None:
        q, k = rms_norm(q, q_norm_weight, eps), rms_norm(k, k_norm_weight, eps)
    q, k = rope(q, k, positions, cos, sin)
    if k_cache is not None:
        write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q, k
