"""Multi-head latent attention (MLA), DeepSeek-V2/V3 and Kimi-K2, over a paged latent cache.

Per token:
    q          = q_b_proj(q_a_layernorm(q_a_proj(x)))       (or q_proj(x) when q_lora_rank is None)
                 -> per head [qk_nope_head_dim | qk_rope_head_dim]
    c_kv, k_pe = kv_a_proj_with_mqa(x) -> [kv_lora_rank | qk_rope_head_dim]   (k_pe shared by all heads)
    c_kv       = kv_a_layernorm(c_kv)
    q_pe, k_pe rotated with decoupled RoPE on the rope dims only

The cache stores the latent `[c_kv | rotated k_pe]` (kv_lora_rank + qk_rope_head_dim numbers per
token and layer, ModelConfig.kv_cache_geometry). The engine's attention backend, taken when the
layer is built, writes the latents (`write_latent`) and attends (`attend_latent`): "torch" expands
the latent through kv_b_proj into per-head k_nope and v (kernels/mla/mla_torch.py, the reference);
"triton" runs absorbed decode / non-absorbed prefill (kernels/mla/mla_triton.py, docs/mla.md);
"flashinfer" runs FlashInfer's absorbed MLA kernel for every step. `post_load_weights` (called by
the builder once weights are in place) prepares the absorbed per-head views of kv_b_proj.

RoPE layout: with `rope_interleave` (the default, and what DeepSeek's weights use) the rope dims
are interleaved pairs (x0, x1), (x2, x3), ...; transformers' `apply_rotary_pos_emb_interleave`
rotates pair j by frequency j and writes the result de-interleaved: [even' | odd']. Taking the
even then odd dims and applying the rotate-half rotation gives exactly that (the same products and
sums), which is what `_rope` does; the cached k_pe is in that output layout, as in transformers'
cache. The softmax scale is qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 under
YaRN, as transformers' `yarn_apply_mscale` computes it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlengine.config import ConfigError, ModelConfig
from dlengine.kernels.context import ForwardContext
from dlengine.kernels.mla.mla_torch import MLAWeights
from dlengine.kernels.norm_rope.norm_rope_torch import rope as rope_reference
from dlengine.kernels.selection import current_kernels
from dlengine.models.layers.linear import Linear
from dlengine.models.layers.parallel_linear import ColumnParallelLinear, RowParallelLinear, divide
from dlengine.parallel.state import get_parallel_state
from dlengine.models.layers.norm import RMSNorm
from dlengine.models.layers.rotary import RotaryEmbedding


# transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm default eps, not the
# config's rms_norm_eps (equal for DeepSeek-V3, 1e-5 vs 1e-6 for GLM-5)
LATENT_NORM_EPS = 1e-6


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(cfg: ModelConfig, qk_head_dim: int) -> float:
    scale = qk_head_dim**-0.5
    rope = cfg.rope
    if rope.rope_type != "default" and rope.mscale_all_dim:
        m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return scale


class MLAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        hf = cfg.hf_config
        self.layer_idx = layer_idx
        # under tensor parallelism this rank's heads; the latent (kv_a_proj, the cache) is replicated
        self.num_heads = divide(cfg.num_attention_heads, get_parallel_state().tp_size, "num_attention_heads")
        self.q_lora_rank = hf.get("q_lora_rank")
        self.kv_lora_rank = int(hf["kv_lora_rank"])
        self.qk_nope_head_dim = int(hf["qk_nope_head_dim"])
        self.qk_rope_head_dim = int(hf["qk_rope_head_dim"])
        self.v_head_dim = int(hf["v_head_dim"])
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{cfg.path}: qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        self.rope_interleave = bool(hf.get("rope_interleave", True))
        h, bias = cfg.num_attention_heads, cfg.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, h * self.qk_head_dim)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, h * self.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim))
        self.o_proj = RowParallelLinear(h * self.v_head_dim, cfg.hidden_size, bias=bias)
        self.rotary = rotary
        self.scale = mla_softmax_scale(cfg, self.qk_head_dim)
        self.absorbed: MLAWeights | None = None  # set by post_load_weights
        self.backend = current_kernels().attention

    @torch.no_grad()
    def post_load_weights(self) -> None:
        """Per-head W_UK / W_UV of kv_b_proj for the absorbed kernels, once after loading. They are
        views of the loaded weight (no extra memory; an in-place reload stays visible); a
        quantized kv_b_proj would be dequantized here."""
        self.absorbed = MLAWeights.from_kv_b(self.kv_b_proj.weight, self.num_heads, self.qk_nope_head_dim,
                                             self.v_head_dim)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
                f"qk_nope={self.qk_nope_head_dim}, qk_rope={self.qk_rope_head_dim}, v={self.v_head_dim}, "
                f"scale={self.scale:.6g}, rope_interleave={self.rope_interleave}")

    def _rope(self, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor):
        """q_pe [T, H, R], k_pe [T, 1, R] -> rotated, in transformers' output layout."""
        if self.rope_interleave:
            q_pe = torch.cat([q_pe[..., 0::2], q_pe[..., 1::2]], dim=-1)
            k_pe = torch.cat([k_pe[..., 0::2], k_pe[..., 1::2]], dim=-1)
        # the reference rotation always: q_pe / k_pe are strided slices here, and the rotation is a
        # sliver of this layer's time
        return rope_reference(q_pe, k_pe, positions, self.rotary.cos_cached, self.rotary.sin_cached)

    def project(self, positions: torch.Tensor, hidden: torch.Tensor):
        """The per-token projections: (q_nope [T, H, nope], rotated q_pe [T, H, rope], the latent
        [T, kv_lora_rank + rope] to cache, q_resid = q_a_layernorm(q_a_proj(x)) or None without a
        q LoRA; DeepSeek Sparse Attention's indexer reads q_resid, models/deepseek_v32.py)."""
        t = hidden.shape[0]
        if self.q_lora_rank is None:
            q_resid, q = None, self.q_proj(hidden)
        else:
            q_resid = self.q_a_layernorm(self.q_a_proj(hidden))
            q = self.q_b_proj(q_resid)
        q = q.view(t, self.num_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv.contiguous())
        q_pe, k_pe = self._rope(positions, q_pe, k_pe.unsqueeze(1))
        if self.absorbed is None:
            raise RuntimeError("MLAAttention.post_load_weights() was not called after loading the weights")
        return q_nope, q_pe, torch.cat([c_kv, k_pe[:, 0]], dim=-1), q_resid

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = hidden.shape[0]
        q_nope, q_pe, latent, _ = self.project(positions, hidden)
        cache, _ = ctx.kv_caches[self.layer_idx]
        self.backend.write_latent(latent, cache, ctx.meta)
        out = self.backend.attend_latent(q_nope, q_pe, cache, ctx.meta, self.absorbed, self.scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_head_dim))
