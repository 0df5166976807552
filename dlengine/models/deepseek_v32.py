"""DeepSeek-V3.2 (DeepseekV32ForCausalLM): DeepSeek-V3 with DeepSeek Sparse Attention (DSA). Every
layer is DeepSeek-V3's (MLA, dense MLP then MoE, models/deepseek_v3.py) except that each query
token attends only to the `index_topk` tokens a lightning indexer selects (docs/dsa.md):

    q_resid  = q_a_layernorm(q_a_proj(x))                  (MLA's query LoRA, shared)
    q_idx    = indexer.wq_b(q_resid)     -> [T, index_n_heads, index_head_dim]
    k_idx    = indexer.k_norm(indexer.wk(x))                (LayerNorm with bias, one head)
               both rotated on their FIRST qk_rope_head_dim dims (MLA rotates its last ones):
               rotate-half for DeepSeek-V3.2, interleaved pairs for GLM-5 (glm_moe_dsa.py)
    w        = indexer.weights_proj(x) * index_n_heads**-0.5   (float32, as transformers keeps it)
    score    = sum_h w_h * relu(q_idx_h . k_idx * index_head_dim**-0.5)   over the visible tokens
    selected = top index_topk by score (all visible tokens when there are at most index_topk)
    out      = MLA over the selected tokens only

k_idx is cached per token in its own paged cache (IndexerKeySpec, cache/specs.py) beside the
latent, with the same block tables. The kernels (write, select, attend) come from kernels/dsa/,
chosen once when the layer is built.

This is transformers' DeepseekV32 / GlmMoeDsa implementation (>= 5.25) exactly: no FP8 keys and
no Hadamard rotation in the indexer (transformers skips both: the rotation keeps dot products and
FP8 is DeepSeek's kernels' precision trade). MTP layers in a checkpoint are skipped as for V3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlengine.cache.specs import CacheSpec, IndexerKeySpec, default_cache_specs
from dlengine.config import ConfigError, ModelConfig
from dlengine.kernels.context import ForwardContext
from dlengine.kernels.dsa import dsa_kernels_for
from dlengine.kernels.kv_quant import is_fp8
from dlengine.kernels.norm_rope.norm_rope_torch import rope as rope_reference
from dlengine.kernels.selection import current_kernels
from dlengine.models.deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3ForCausalLM, DeepseekV3Model, RouterGate
from dlengine.models.layers.linear import Linear, default_weight_loader
from dlengine.models.layers.mla import MLAAttention
from dlengine.models.layers.rotary import RotaryEmbedding

INDEXER_CACHE = IndexerKeySpec.cache_name  # the group name layers find their key cache under
# the indexer's RoPE layout per architecture (MLA's own is interleaved in both)
INDEXER_ROPE_INTERLEAVED = {"DeepseekV32ForCausalLM": False, "GlmMoeDsaForCausalLM": True}


def indexer_key_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    """The indexer key cache's dtype: the cache dtype, except bf16 under an FP8 cache
    (docs/fp8_kv.md). transformers scores model-dtype keys; FP8 keys (the kernels read them,
    with `key_scale`) moved the tiny model's top-k enough to cut its teacher-forced argmax
    agreement from 0.57 to 0.45, for 256 of a token's 1408 bf16 bytes at V3.2 dims."""
    return torch.bfloat16 if is_fp8(cache_dtype) else cache_dtype


class DSASettings:
    """The DSA fields of a DeepSeek-V3.2 / GLM-5 config.json."""

    def __init__(self, cfg: ModelConfig) -> None:
        hf = cfg.hf_config
        try:
            self.n_heads = int(hf["index_n_heads"])
            self.head_dim = int(hf["index_head_dim"])
            self.topk = int(hf["index_topk"])
        except KeyError as e:
            raise ConfigError(f"{cfg.path}: {cfg.architecture} needs the indexer field {e.args[0]!r}") from None
        self.rope_dim = int(hf["qk_rope_head_dim"])
        if min(self.n_heads, self.head_dim, self.topk) <= 0:
            raise ConfigError(f"{cfg.path}: index_n_heads, index_head_dim and index_topk must be > 0, got "
                              f"{self.n_heads}, {self.head_dim}, {self.topk}")
        if self.rope_dim > self.head_dim:
            raise ConfigError(f"{cfg.path}: qk_rope_head_dim={self.rope_dim} exceeds index_head_dim={self.head_dim}")
        if not hf.get("q_lora_rank"):
            raise ConfigError(f"{cfg.path}: {cfg.architecture} needs q_lora_rank (the indexer reads the query LoRA)")
        self.rope_interleaved = INDEXER_ROPE_INTERLEAVED.get(cfg.architecture, False)
        # GLM-5: "full" layers run their indexer, "shared" ones reuse the previous full layer's top-k
        types = hf.get("indexer_types") or ["full"] * cfg.num_hidden_layers
        types = list(types)[:cfg.num_hidden_layers]
        if len(types) < cfg.num_hidden_layers or set(types) - {"full", "shared"}:
            raise ConfigError(f"{cfg.path}: indexer_types must give 'full' or 'shared' for each of the "
                              f"{cfg.num_hidden_layers} layers, got {hf.get('indexer_types')}")
        if types[0] != "full":
            raise ConfigError(f"{cfg.path}: indexer_types[0] is 'shared', but a shared layer reuses the top-k of "
                              "an earlier full layer")
        self.indexer_types = types

    @property
    def indexer_layers(self) -> tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.indexer_types) if kind == "full")


class IndexerKeyNorm(nn.Module):
    """The indexer's key LayerNorm (weight and bias, eps 1e-6), as transformers' nn.LayerNorm."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.weight.weight_loader = self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class LightningIndexer(nn.Module):
    """Scores every visible cached token for each query token and returns the top-k positions
    [T, width] int32 (-1 padded). Replicated on every tensor-parallel rank (it is small)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dsa: DSASettings, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim, self.rope_dim, self.topk = dsa.n_heads, dsa.head_dim, dsa.rope_dim, dsa.topk
        self.rope_interleaved = dsa.rope_interleaved
        self.wq_b = Linear(int(cfg.hf_config["q_lora_rank"]), dsa.n_heads * dsa.head_dim)
        self.wk = Linear(cfg.hidden_size, dsa.head_dim)
        self.k_norm = IndexerKeyNorm(dsa.head_dim)
        self.weights_proj = RouterGate(cfg.hidden_size, dsa.n_heads)  # float32 weights and GEMM
        self.softmax_scale = dsa.head_dim**-0.5
        self.rotary = rotary
        self.kernels = dsa_kernels_for(current_kernels())
        # FP8 key cache scale (stored = k / key_scale): 1.0 always. No checkpoint carries one, and
        # the keys are LayerNorm outputs, O(1), far inside e4m3's range; not in the state dict
        self.register_buffer("key_scale", torch.ones((), dtype=torch.float32), persistent=False)

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, head_dim={self.head_dim}, topk={self.topk}, "
                f"rope={'interleaved' if self.rope_interleaved else 'rotate-half'}, kernels={self.kernels.name}")

    def _rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotate the first rope_dim dims of q [T, H, D] and k [T, D]."""
        r = self.rope_dim
        q_rot, k_rot = q[..., :r], k[:, None, :r]
        if self.rope_interleaved:  # pairs (x0, x1), ... out as [even' | odd'], as for MLA (layers/mla.py)
            q_rot = torch.cat([q_rot[..., 0::2], q_rot[..., 1::2]], dim=-1)
            k_rot = torch.cat([k_rot[..., 0::2], k_rot[..., 1::2]], dim=-1)
        q_rot, k_rot = rope_reference(q_rot, k_rot, positions, self.rotary.cos_cached, self.rotary.sin_cached)
        return torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot[:, 0], k[:, r:]], dim=-1)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, q_resid: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        q = self.wq_b(q_resid).view(hidden.shape[0], self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(hidden))
        q, k = self._rope(positions, q, k)
        cache, _ = ctx.layer_caches[self.layer_idx][INDEXER_CACHE]
        scales = {"key_scale": self.key_scale} if is_fp8(cache.dtype) else {}  # FP8 caches only
        self.kernels.write_keys(k, cache, ctx.meta, **scales)
        weights = self.weights_proj(hidden) * self.n_heads**-0.5
        return self.kernels.select(q, weights, cache, ctx.meta, positions, self.topk, self.softmax_scale, **scales)


class DSAAttention(MLAAttention):
    """MLA whose queries attend to their indexer-selected tokens only. A layer with its own indexer
    selects; a "shared" layer (GLM-5) attends to the tokens the previous layer selected."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__(cfg, layer_idx, rotary)
        dsa = DSASettings(cfg)
        self.indexer = (LightningIndexer(cfg, layer_idx, dsa, rotary) if dsa.indexer_types[layer_idx] == "full"
                        else None)
        self.dsa_kernels = dsa_kernels_for(current_kernels())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sparse_mla={self.dsa_kernels.name}, shared_topk={self.indexer is None}"

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext,
                selected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(output [T, hidden], the selection this layer used, for a following shared layer)."""
        t = hidden.shape[0]
        q_nope, q_pe, latent, q_resid = self.project(positions, hidden)
        cache, _ = ctx.kv_caches[self.layer_idx]
        scales = {"kv_scale": self.k_scale} if is_fp8(cache.dtype) else {}  # FP8 latent: MLA's one scale
        self.backend.write_latent(latent, cache, ctx.meta, **scales)
        if self.indexer is not None:
            selected = self.indexer(positions, hidden, q_resid, ctx)
        elif selected is None:
            raise RuntimeError(f"layer {self.layer_idx} shares the top-k of an earlier layer, but none ran before it")
        out = self.dsa_kernels.attend(q_nope, q_pe, cache, ctx.meta, self.absorbed, self.scale, selected, **scales)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_head_dim)), selected


class DSADecoderLayer(DeepseekV3DecoderLayer):
    attention_cls = DSAAttention

    def forward(self, positions, hidden, residual, ctx, selected=None):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden, selected = self.self_attn(positions, hidden, ctx, selected)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual, selected


class DeepseekV32Model(DeepseekV3Model):
    layer_cls = DSADecoderLayer

    def forward(self, input_ids, positions, ctx):
        hidden, residual, selected = self.embed_tokens(input_ids), None, None
        for layer in self.layers:
            hidden, residual, selected = layer(positions, hidden, residual, ctx, selected)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DeepseekV32ForCausalLM(DeepseekV3ForCausalLM):
    model_cls = DeepseekV32Model

    @classmethod
    def cache_specs(cls, model_config: ModelConfig, *, dtype: torch.dtype, tp_size: int = 1,
                    tp_rank: int = 0) -> list[CacheSpec]:
        """The MLA latent of every layer, and the indexer keys of every layer with an indexer, paged
        with the same block tables. Under an FP8 cache only the latent is FP8: the keys stay
        bf16 (`indexer_key_dtype`)."""
        dsa = DSASettings(model_config)
        return (default_cache_specs(model_config, dtype, tp_size, tp_rank)
                + [IndexerKeySpec.for_layers(dsa.indexer_layers, dsa.head_dim, indexer_key_dtype(dtype))])
