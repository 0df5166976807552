"""The reference attention backend: plain torch on any device, exact in float32, the oracle the
kernels are tested against. GQA through attention/paged_attention_torch.py; MLA non-absorbed (the
latent context expanded through kv_b_proj) through mla/mla_torch.py. Indexes with host-side
lengths, so it is not capturable in CUDA graphs. Reads and writes FP8 caches (kernels/kv_quant.py)."""

from __future__ import annotations

import torch

from dlengine.kernels.attention import paged_attention_torch as gqa_ref
from dlengine.kernels.attention.backend import AttentionBackendBase
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.mla import mla_torch as mla_ref


class TorchAttentionBackend(AttentionBackendBase):
    name = "torch"
    supports_cuda_graphs = False
    supports_fp8_kv = True

    def write_kv(self, k, v, k_cache, v_cache, meta: AttentionMetadata, k_scale=None, v_scale=None) -> None:
        gqa_ref.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
               v_scale=None) -> torch.Tensor:
        return gqa_ref.paged_attention_ref(q, k_cache, v_cache, meta, scale, k_scale, v_scale)

    def write_latent(self, latent, cache, meta: AttentionMetadata, kv_scale=None) -> None:
        mla_ref.write_latent_cache(latent, cache, meta.slot_mapping, kv_scale)

    def attend_latent(self, q_nope, q_pe, cache, meta: AttentionMetadata, weights: mla_ref.MLAWeights,
                      scale: float, kv_scale=None) -> torch.Tensor:
        return mla_ref.mla_attention_ref(torch.cat([q_nope, q_pe], dim=-1), cache, meta, weights.kv_b,
                                         weights.kv_b.shape[-1], weights.qk_nope_head_dim, weights.v_head_dim, scale,
                                         kv_scale)

    def kernel_names(self) -> dict[str, str]:
        return {"kv_write": "torch", "gqa_decode": "torch", "gqa_prefill": "torch",
                "mla_decode": "torch (expanded)", "mla_prefill": "torch (expanded)"}
