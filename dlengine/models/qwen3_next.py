"""Qwen3-Next (Qwen3NextForCausalLM): a hybrid stack of Gated DeltaNet linear-attention layers
and gated full-attention layers (3 : 1 in the release), each followed by a sparse MoE with a
gated shared expert (or a dense SwiGLU in `mlp_only_layers`). Qwen3.5 (qwen3_5.py) reuses every
piece here with its own projection layout and MLPs.

What differs from Qwen3 / Qwen3-MoE, as transformers (>= 5.25) implements it:
- `layer_types` (or every `full_attention_interval`-th layer) says which layers are
  "linear_attention" (layers/gated_deltanet.py, state in the cache's StateSpec slots) and which
  are "full_attention" (paged KV, FullAttentionSpec): `cache_specs` declares both groups.
- Gated attention: q_proj yields, per head, the query and an output gate; the attention output is
  multiplied by sigmoid(gate) before o_proj.
- Partial rotary: only the first head_dim * partial_rotary_factor (default 0.25) dims of q and k
  rotate. Qwen3.5's M-RoPE (`mrope_section`) gives text tokens the same position on its three
  axes, which is exactly this 1-D rotary, so the text path needs nothing more.
- Zero-centred RMSNorms (weight stored as the offset from 1) for the block norms, the final norm
  and the QK-norm; the DeltaNet's own output norm is a plain gated RMSNorm.
- MoE: softmax top-k routing (renormalised when `norm_topk_prob`) plus a shared SwiGLU expert
  scaled by sigmoid(shared_expert_gate(x)).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dlengine.cache.specs import CacheSpec, FullAttentionSpec, kv_head_start
from dlengine.config import ConfigError, ModelConfig
from dlengine.kernels.context import ForwardContext
from dlengine.models.layers.attention import PagedAttention
from dlengine.models.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetShape
from dlengine.models.layers.linear import Linear
from dlengine.models.layers.moe import FusedMoE, SoftmaxTopKRouter
from dlengine.models.layers.norm import ZeroCentredRMSNorm
from dlengine.models.layers.parallel_linear import (ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                                    VocabParallelEmbedding, kv_heads_per_rank)
from dlengine.models.layers.parallel_moe import ParallelFusedMoE
from dlengine.models.layers.rotary import RotaryEmbedding
from dlengine.models.qwen3 import Qwen3ForCausalLM, Qwen3MLP

LINEAR, FULL = "linear_attention", "full_attention"


def layer_types(cfg: ModelConfig) -> list[str]:
    """Each layer's token mixer: config.json's `layer_types`, else every
    `full_attention_interval`-th layer (default 4) full attention, as transformers derives it."""
    hf = cfg.hf_config
    types = hf.get("layer_types")
    if types is None:
        interval = int(hf.get("full_attention_interval", 4))
        types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(cfg.num_hidden_layers)]
    types = list(types)[: cfg.num_hidden_layers]  # hf_overrides may keep only the first layers
    if len(types) < cfg.num_hidden_layers or set(types) - {LINEAR, FULL}:
        raise ConfigError(f"{cfg.path}: layer_types must name {cfg.num_hidden_layers} layers, each "
                          f"{LINEAR!r} or {FULL!r}; got {types}")
    return types


def rotary_dim(cfg: ModelConfig) -> int:
    """Dims of each head that rotate: head_dim * partial_rotary_factor (0.25 when the config does
    not say: transformers' default for these families)."""
    hf = cfg.hf_config
    said = "partial_rotary_factor" in (hf.get("rope_parameters") or {}) or "partial_rotary_factor" in hf
    factor = cfg.rope.partial_rotary_factor if said else 0.25
    dim = int(cfg.head_dim * factor)
    if dim <= 0 or dim % 2:
        raise ConfigError(f"{cfg.path}: partial_rotary_factor={factor} gives {dim} rotary dims of head_dim "
                          f"{cfg.head_dim}; need a positive even number")
    return dim


class PartialRotary(nn.Module):
    """RoPE on the first `dim` dims of each head; the rest pass through."""

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.dim = rotary_dim(cfg)
        self.rotary = RotaryEmbedding(self.dim, max_position, dataclasses.replace(cfg.rope, partial_rotary_factor=1.0))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dim
        q_rot, k_rot = self.rotary(positions, q[..., :d].contiguous(), k[..., :d].contiguous())
        return torch.cat([q_rot, q[..., d:]], dim=-1), torch.cat([k_rot, k[..., d:]], dim=-1)


class GatedAttention(nn.Module):
    """GQA with zero-centred QK-norm, partial RoPE and a sigmoid output gate per head."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: PartialRotary) -> None:
        super().__init__()
        h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if h % hkv:
            raise ConfigError(f"num_attention_heads={h} is not a multiple of num_key_value_heads={hkv}")
        # q_proj holds 2 * d rows per head ([query | gate] of head 0, then head 1, ...): split as
        # 2h "heads" of d, tensor-parallel shards keep each head's query and gate together
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, 2 * h, hkv, bias=cfg.attention_bias)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads // 2, self.qkv_proj.num_kv_heads, d
        self.o_proj = RowParallelLinear(h * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = ZeroCentredRMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = ZeroCentredRMSNorm(d, cfg.rms_norm_eps)
        self.rotary = rotary
        self.attn = PagedAttention(layer_idx, self.num_heads, self.num_kv_heads, d, scale=d**-0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t, h, hkv, d = hidden.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q_gate, k, v = self.qkv_proj(hidden).split([2 * h * d, hkv * d, hkv * d], dim=-1)
        q, gate = q_gate.view(t, h, 2 * d).split([d, d], dim=-1)
        q = self.q_norm(q.contiguous())
        k = self.k_norm(k.view(t, hkv, d))
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v.view(t, hkv, d), ctx)  # [T, h * d]
        return self.o_proj(out * torch.sigmoid(gate.reshape(t, h * d)))


class SharedExpertMoE(nn.Module):
    """Routed experts (softmax top-k) plus one shared SwiGLU expert scaled by a sigmoid gate."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 shared_intermediate_size: int, renormalize: bool) -> None:
        super().__init__()
        self.gate = Linear(hidden_size, num_experts)  # router logits
        self.experts = ParallelFusedMoE(num_experts, top_k, hidden_size, intermediate_size,
                                        router=SoftmaxTopKRouter(top_k, renormalize))
        self.shared_expert = Qwen3MLP(hidden_size, shared_intermediate_size)
        self.shared_expert_gate = Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.experts(x, self.gate(x))
        return routed + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class HybridDecoderLayer(nn.Module):
    """Pre-norm block: a token mixer (`linear_attn` or `self_attn`, the checkpoint's names), then
    the feed-forward `mlp`; the running residual is carried through the norms."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, kind: str, rotary: PartialRotary, mlp: nn.Module,
                 grouped_layout: bool) -> None:
        super().__init__()
        self.input_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == LINEAR:
            self.linear_attn = GatedDeltaNet(GatedDeltaNetShape(cfg.hf_config, cfg.path), cfg.hidden_size, layer_idx,
                                             cfg.rms_norm_eps, grouped_layout=grouped_layout)
        else:
            self.self_attn = GatedAttention(cfg, layer_idx, rotary)
        self.post_attention_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, positions, hidden, residual, ctx):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        mixer = self.linear_attn if hasattr(self, "linear_attn") else self.self_attn
        hidden = mixer(positions, hidden, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class HybridModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, make_mlp, grouped_layout: bool,
                 rotary: nn.Module | None = None) -> None:
        """`make_mlp(layer_idx)` builds a layer's feed-forward block; `rotary` (shared by the
        attention layers, called as `rotary(positions, q, k)`) defaults to PartialRotary."""
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = rotary = rotary if rotary is not None else PartialRotary(cfg, max_position)
        self.layers = nn.ModuleList(HybridDecoderLayer(cfg, i, kind, rotary, make_mlp(i), grouped_layout)
                                    for i, kind in enumerate(layer_types(cfg)))
        self.norm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, ctx):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden


def hybrid_cache_specs(model_config: ModelConfig, *, dtype: torch.dtype, tp_size: int = 1,
                       tp_rank: int = 0) -> list[CacheSpec]:
    """Paged K/V for the full-attention layers, a state slot per request for the linear ones."""
    types = layer_types(model_config)
    full = tuple(i for i, k in enumerate(types) if k == FULL)
    linear = tuple(i for i, k in enumerate(types) if k == LINEAR)
    if not full:
        # the engine's blocks are the full-attention layers' (the state has no per-token part)
        raise ConfigError(f"{model_config.path}: the first {len(types)} layers are all linear attention; keep at "
                          "least one full-attention layer (e.g. hf_overrides(num_hidden_layers=4))")
    specs: list[CacheSpec] = []
    if full:
        n = model_config.num_key_value_heads
        specs.append(FullAttentionSpec(full, num_kv_heads=kv_heads_per_rank(n, tp_size), head_dim=model_config.head_dim,
                                       dtype=dtype, total_kv_heads=n, head_start=kv_head_start(n, tp_size, tp_rank)))
    if linear:
        # an FP8 cache is for attention K/V only: the recurrent state stays bf16 (in FP8 its rounding
        # would compound at every token)
        state_dtype = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype
        shape = GatedDeltaNetShape(model_config.hf_config, model_config.path).for_rank(tp_size)
        specs.append(shape.state_spec(linear, state_dtype, tp_rank, tp_size))  # the rank's heads only
    return specs


class Qwen3NextForCausalLM(nn.Module):
    # q/k/v and the dense (and shared-expert) gate/up, stacked into one GEMM each
    stacked_params = Qwen3ForCausalLM.stacked_params
    grouped_layout = True  # in_proj_qkvz / in_proj_ba rows grouped per key head (layers/gated_deltanet.py)
    text_model_class = HybridModel  # Qwen3.5's vision-language classes use the M-RoPE variant (qwen3_5.py)

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        hf = cfg.hf_config
        num_experts = int(hf.get("num_experts", 0) or 0)
        self.expert_params = FusedMoE.checkpoint_mapping(num_experts)
        self.model = self.text_model_class(cfg, max_position, self.make_mlp, self.grouped_layout)
        tied_to = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tied_to)

    @classmethod
    def cache_specs(cls, model_config: ModelConfig, *, dtype: torch.dtype, tp_size: int = 1,
                    tp_rank: int = 0) -> list[CacheSpec]:
        return hybrid_cache_specs(model_config, dtype=dtype, tp_size=tp_size, tp_rank=tp_rank)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        """Sparse (with the shared expert) unless the layer is in mlp_only_layers or off the
        decoder_sparse_step grid, transformers' rule for Qwen3-Next."""
        cfg, hf = self.config, self.config.hf_config
        num_experts = int(hf.get("num_experts", 0) or 0)
        sparse = (num_experts > 0 and layer_idx not in set(hf.get("mlp_only_layers") or [])
                  and (layer_idx + 1) % int(hf.get("decoder_sparse_step", 1) or 1) == 0)
        if not sparse:
            return Qwen3MLP(cfg.hidden_size, cfg.intermediate_size)
        return moe_block(cfg, renormalize=bool(hf.get("norm_topk_prob", True)))

    def skip_checkpoint_tensor(self, name: str) -> bool:
        # the multi-token-prediction head: a module of its own when speculative("mtp") drafts with
        # it (models/qwen3_next_mtp.py)
        return name.startswith("mtp.")

    def text_embedding(self) -> nn.Module:
        """The token embedding (the MTP head shares it)."""
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, hidden] for the flattened batch."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def moe_block(cfg: ModelConfig, renormalize: bool) -> SharedExpertMoE:
    hf = cfg.hf_config
    try:
        num_experts, top_k = int(hf["num_experts"]), int(hf["num_experts_per_tok"])
        inter, shared = int(hf["moe_intermediate_size"]), int(hf["shared_expert_intermediate_size"])
    except KeyError as e:
        raise ConfigError(f"{cfg.path}: the MoE field {e.args[0]!r} is missing") from None
    if not 0 < top_k <= num_experts:
        raise ConfigError(f"{cfg.path}: num_experts_per_tok={top_k} must be in [1, num_experts={num_experts}]")
    return SharedExpertMoE(cfg.hidden_size, num_experts, top_k, inter, shared, renormalize)
