"""Plain torch reference for multi-head latent attention (MLA, DeepSeek-V2/V3, Kimi-K2) over a
paged *latent* cache.

What the cache holds per token and layer is one "head" of `kv_lora_rank + qk_rope_head_dim`
numbers: the normalised compressed KV `c_kv` followed by the rotated, head-shared `k_pe`. That is
the K tensor of the layer ([num_blocks, block_size, 1, kv_lora_rank + rope_dim]); the V tensor is
empty (see ModelConfig.kv_cache_geometry).

Attention expands each request's latent context through `kv_b_proj` into per-head `k_nope` and
`v` ("non-absorbed" MLA: simple and exact, not fast), appends the shared `k_pe` to every head's
key and runs causal softmax attention in float32. Uses the same AttentionMetadata as the paged
GQA reference, so prefill, chunked prefill over a cached prefix and decode are one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.attention.paged_attention_torch import attend_dense, gather_kv
from dlengine.kernels.kv_quant import from_cache, index_copy_rows, to_cache


def write_latent_cache(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                       kv_scale: torch.Tensor | None = None) -> None:
    """Store this step's latents ([T, kv_lora_rank + rope_dim]) at their slots of the paged
    latent cache ([N, B, 1, kv_lora_rank + rope_dim]); an FP8 cache stores latent / kv_scale
    (c_kv and k_pe alike, one scale per layer)."""
    index_copy_rows(cache.view(-1, cache.shape[-1]), slot_mapping, to_cache(latent, cache.dtype, kv_scale))


def mla_attention_ref(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, kv_b_weight: torch.Tensor,
                      kv_lora_rank: int, qk_nope_head_dim: int, v_head_dim: int, scale: float,
                      kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal MLA of the flattened queries q [T, H, qk_nope_head_dim + rope_dim] (rope part
    already rotated) over each request's paged latent context -> [T, H, v_head_dim].

    `kv_b_weight` [H * (qk_nope_head_dim + v_head_dim), kv_lora_rank] is kv_b_proj's weight: per
    head, the k_nope rows then the v rows (the HF checkpoint layout). Request i's queries are the
    last `query_len` positions of its `seq_len`-token context. An FP8 cache is read dequantised
    (x kv_scale)."""
    num_tokens, num_heads, _ = q.shape
    out = q.new_empty(num_tokens, num_heads, v_head_dim)
    start = 0
    for i, ql in enumerate(meta.query_lens_cpu):
        seq_len = meta.seq_lens_cpu[i]
        latent = gather_kv(cache, meta.block_tables[i], seq_len)[:, 0]  # [S, kv_lora_rank + rope_dim]
        if latent.dtype == torch.float8_e4m3fn:
            latent = from_cache(latent, kv_scale)
        c_kv, k_pe = latent[:, :kv_lora_rank], latent[:, kv_lora_rank:]
        kv = F.linear(c_kv.to(kv_b_weight.dtype), kv_b_weight).view(seq_len, num_heads, qk_nope_head_dim + v_head_dim)
        k_nope, v = kv.split([qk_nope_head_dim, v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].to(k_nope.dtype).expand(-1, num_heads, -1)], dim=-1)
        out[start : start + ql] = attend_dense(q[start : start + ql], k, v, scale, causal_offset=seq_len - ql)
        start += ql
    return out


@dataclass
class MLAWeights:
    """kv_b_proj's weight and its per-head absorbed views (no copies: the views share storage).
    w_uk [H, nope, C] maps q_nope into latent space; w_uv [H, v, C] maps latent outputs to v."""

    kv_b: torch.Tensor  # [H * (nope + v), C]
    w_uk: torch.Tensor
    w_uv: torch.Tensor
    num_heads: int
    qk_nope_head_dim: int
    v_head_dim: int

    @classmethod
    def from_kv_b(cls, kv_b: torch.Tensor, num_heads: int, qk_nope_head_dim: int, v_head_dim: int) -> "MLAWeights":
        w = kv_b.view(num_heads, qk_nope_head_dim + v_head_dim, kv_b.shape[-1])
        return cls(kv_b, w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:], num_heads, qk_nope_head_dim, v_head_dim)


def absorb_query(q_nope: torch.Tensor, w: MLAWeights) -> torch.Tensor:
    """q_lat = q_nope W_UK per head: [T, H, nope] -> [T, H, kv_lora_rank], as a transposed view
    of one batched GEMM's [H, T, C] output (kernels take strides)."""
    return torch.bmm(q_nope.transpose(0, 1), w.w_uk.to(q_nope.dtype)).transpose(0, 1)


def latent_to_v(out_lat: torch.Tensor, w: MLAWeights) -> torch.Tensor:
    """out = out_lat W_UV^T per head: [T, H, kv_lora_rank] -> [T, H, v_head_dim] (a view)."""
    return torch.bmm(out_lat.transpose(0, 1).to(w.w_uv.dtype), w.w_uv.transpose(1, 2)).transpose(0, 1)
