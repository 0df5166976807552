"""Paged attention layer: writes this step's K/V into its cache slice and attends over it through
the engine's attention backend (kernels/attention/backend.py). The model never sees block tables.

The backend and the fused ops are taken once, when the layer is built (kernels/selection.py:
`current_kernels()` inside the builder's `kernel_scope`).

FP8 KV cache (`cache(dtype="fp8_e4m3")`, docs/fp8_kv.md): the layer keeps one float32 scale per
tensor, `k_scale` and `v_scale` (buffers: 1.0, or the checkpoint's, models/loader.py), and hands
them to the KV write and the attention when its cache is FP8."""

from __future__ import annotations

import torch
from torch import nn

from dlengine.kernels.context import ForwardContext
from dlengine.kernels.kv_quant import is_fp8
from dlengine.kernels.selection import current_kernels
from dlengine.models.layers.norm import RMSNorm
from dlengine.models.layers.rotary import RotaryEmbedding


class PagedAttention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        kernels = current_kernels()
        self.backend, self.ops = kernels.attention, kernels.ops
        self.fused_kv_write = getattr(self.backend, "fused_kv_write", False)
        # the backend reads this step's k / v from here too (kernels/attention/backend.py)
        self.pass_step_kv = getattr(self.backend, "reads_step_kv", False)
        # FP8 cache scales (stored = x / scale); not in the state dict, loaded by name when present
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
                rotary: RotaryEmbedding | None = None, positions: torch.Tensor | None = None,
                q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H * D]. With `q_norm`/`k_norm` (per-head RMSNorm,
        Qwen3's QK-norm) and `rotary`, q and k are normalised and rotated first, and k/v stored in
        the cache's paged layout by the same op (on GPUs one fused kernel, in place on q and k)."""
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        # FP8 caches only: the scales go with every cache write and read (other backends' calls
        # keep their plain signature)
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale} if is_fp8(k_cache.dtype) else {}
        if rotary is not None and self.fused_kv_write:
            q, k = self.ops.rope_write_kv(
                q, k, v, positions, rotary.cos_cached, rotary.sin_cached, ctx.meta.slot_mapping, k_cache, v_cache,
                q_norm.weight if q_norm is not None else None, k_norm.weight if k_norm is not None else None,
                q_norm.eps if q_norm is not None else 1e-6, **scales,
            )
        else:
            # the backend stores K/V in its own layout (the torch reference, a user's backend)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            if rotary is not None:
                q, k = rotary(positions, q, k)
            self.backend.write_kv(k, v, k_cache, v_cache, ctx.meta, **scales)
        step = {"step_kv": (k, v)} if self.pass_step_kv else {}  # k as stored: normalised and rotated
        out = self.backend.attend(q, k_cache, v_cache, ctx.meta, self.scale, **scales, **step)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
