"""Plain torch references of sparse MLA: each query token attends to its own selected tokens
(the indexer's top-k) of its request's paged latent context.

`sparse_mla_ref` is the exact oracle the torch backend runs: as transformers' eager path, the
context is expanded through kv_b_proj into per-head keys and values and every query's scores
outside its selection are masked before a float32 softmax. `sparse_mla_absorbed_ref` is the
reference of the Triton kernel (sparse_mla_triton.py), same signature: the absorbed form over
gathered latent rows (kernels/mla/mla_triton.py explains absorption), one latent row per
selected token, indexed by flat cache slot.

An FP8 latent cache (docs/fp8_kv.md) is read dequantised to float32 (x kv_scale, c_kv and k_pe
sharing the layer's one scale), as kernels/mla/mla_torch.py reads it for dense MLA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlengine.kernels.attention.paged_attention_torch import gather_kv
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.kv_quant import from_cache, is_fp8
from dlengine.kernels.mla.mla_torch import MLAWeights


def sparse_mla_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                   weights: MLAWeights, scale: float, topk_positions: torch.Tensor,
                   kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q_nope [T, H, nope], q_pe [T, H, rope] (rotated) over the latent cache [N, page, 1, C + rope],
    each query token restricted to its selected positions topk_positions [T, K] (-1: none)
    -> [T, H, v_head_dim]. An FP8 cache is dequantised with kv_scale (1.0 when None)."""
    num_tokens, num_heads, _ = q_nope.shape
    kv_lora_rank = weights.kv_b.shape[-1]
    nope, v_dim = weights.qk_nope_head_dim, weights.v_head_dim
    q = torch.cat([q_nope, q_pe], dim=-1)
    out = q.new_empty(num_tokens, num_heads, v_dim)
    start = 0
    for i, ql in enumerate(meta.query_lens_cpu):
        seq_len = meta.seq_lens_cpu[i]
        latent = gather_kv(cache, meta.block_tables[i], seq_len)[:, 0]  # [S, C + rope]
        if is_fp8(latent.dtype):
            latent = from_cache(latent, kv_scale)  # float32
        c_kv, k_pe = latent[:, :kv_lora_rank], latent[:, kv_lora_rank:]
        kv = F.linear(c_kv.to(weights.kv_b.dtype), weights.kv_b).view(seq_len, num_heads, nope + v_dim)
        k_nope, v = kv.split([nope, v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].to(k_nope.dtype).expand(-1, num_heads, -1)], dim=-1)
        sel = topk_positions[start:start + ql].long()  # [ql, K]
        allowed = torch.zeros(ql, seq_len + 1, dtype=torch.bool, device=q.device)
        allowed.scatter_(1, torch.where(sel >= 0, sel, seq_len), True)  # -1 -> the spare column
        allowed = allowed[:, :seq_len]
        scores = torch.einsum("qhd,khd->hqk", q[start:start + ql].float(), k.float()) * scale
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start:start + ql] = torch.einsum("hqk,khd->qhd", probs, v.float()).to(out.dtype)
        start += ql
    return out


def sparse_mla_absorbed_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                            scale: float, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed sparse MLA: q_lat [T, H, C], q_pe [T, H, rope] over the latent rows at flat cache
    slots [T, K] (-1: none) of cache [N, page, 1, C + rope] -> out_lat [T, H, C] float32 (rows
    that select nothing give zeros). An FP8 cache is dequantised with kv_scale (1.0 when None)."""
    kv_lora_rank = q_lat.shape[-1]
    rows = from_cache(cache.reshape(-1, cache.shape[-1]), kv_scale)[slots.long().clamp(min=0)]  # [T, K, C + rope]
    c_kv, k_pe = rows[..., :kv_lora_rank], rows[..., kv_lora_rank:]
    scores = (torch.einsum("thc,tkc->thk", q_lat.float(), c_kv)
              + torch.einsum("thr,tkr->thk", q_pe.float(), k_pe)) * scale
    scores = scores.masked_fill((slots < 0)[:, None, :], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)  # a row with nothing selected: zeros
    return torch.einsum("thk,tkc->thc", probs, c_kv)
