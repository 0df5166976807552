"""DeepSeek-V3 (DeepseekV3ForCausalLM; Kimi-K2 uses the same architecture): multi-head latent
attention (layers/mla.py) and pre-norm residual blocks whose feed-forward is a dense SwiGLU MLP in
the first `first_k_dense_replace` layers and a DeepSeek MoE in the others.

The MoE block: a router linear (`mlp.gate.weight`, float32 as in transformers) whose logits go
through the grouped sigmoid router (`GroupedTopKRouter`: score-correction bias, n_group /
topk_group, norm_topk_prob, routed_scaling_factor) into `n_routed_experts` SwiGLU experts of
`moe_intermediate_size` (FusedMoE), plus `n_shared_experts` always-on experts, stored as one dense
SwiGLU of n_shared_experts * moe_intermediate_size (`mlp.shared_experts`).

A layer is sparse when `layer_idx >= first_k_dense_replace` and `layer_idx % moe_layer_freq == 0`
(DeepSeek's reference code; transformers ignores moe_layer_freq, which is 1 in every released
config). MLA runs on the torch reference or the Triton kernels (kernels/mla/mla_triton.py).
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from dlengine.cache.specs import MLALatentSpec
from dlengine.config import ConfigError, ModelConfig
from dlengine.models.layers.decoder import PreNormDecoderLayer
from dlengine.kernels.context import ForwardContext
from dlengine.models.layers.parallel_linear import ParallelLMHead, VocabParallelEmbedding
from dlengine.models.layers.parallel_moe import ParallelFusedMoE
from dlengine.models.layers.linear import default_weight_loader
from dlengine.models.layers.mla import MLAAttention
from dlengine.models.layers.moe import FusedMoE, GroupedTopKRouter
from dlengine.models.layers.mtp import MultiTokenPredictionLayer
from dlengine.models.layers.norm import RMSNorm
from dlengine.models.layers.rotary import RotaryEmbedding
from dlengine.models.qwen3 import Qwen3MLP


class DeepseekMoeSettings:
    """The MoE fields of a DeepSeek-V3 config.json."""

    def __init__(self, cfg: ModelConfig) -> None:
        hf = cfg.hf_config
        self.num_experts = int(hf.get("n_routed_experts", hf.get("num_local_experts", 0)) or 0)
        self.top_k = int(hf.get("num_experts_per_tok", 0) or 0)
        self.intermediate_size = int(hf.get("moe_intermediate_size", 0) or 0)
        self.num_shared_experts = int(hf.get("n_shared_experts", 0) or 0)
        self.norm_topk_prob = bool(hf.get("norm_topk_prob", True))
        self.routed_scaling_factor = float(hf.get("routed_scaling_factor", 1.0) or 1.0)
        self.n_group = int(hf.get("n_group", 1) or 1)
        self.topk_group = int(hf.get("topk_group", 1) or 1)
        self.first_k_dense_replace = int(hf.get("first_k_dense_replace", 0) or 0)
        self.moe_layer_freq = int(hf.get("moe_layer_freq", 1) or 1)
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{cfg.path}: hidden_act={act!r} is not supported (DeepSeek-V3 uses 'silu')")
        scoring = hf.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ConfigError(f"{cfg.path}: scoring_func={scoring!r} is not supported (DeepSeek-V3 uses 'sigmoid')")
        method = hf.get("topk_method", "noaux_tc")
        if method != "noaux_tc":
            raise ConfigError(f"{cfg.path}: topk_method={method!r} is not supported (DeepSeek-V3 uses 'noaux_tc')")
        if self.num_experts > 0:
            if not 0 < self.top_k <= self.num_experts:
                raise ConfigError(f"{cfg.path}: num_experts_per_tok={self.top_k} must be in [1, n_routed_experts="
                                  f"{self.num_experts}]")
            if self.intermediate_size <= 0:
                raise ConfigError(f"{cfg.path}: moe_intermediate_size is missing")

    def is_sparse(self, layer_idx: int) -> bool:
        return (self.num_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)


class RouterGate(nn.Module):
    """The router's linear layer, kept and computed in float32 whatever the model dtype (as
    transformers does: `_keep_in_fp32_modules_strict = ["gate.weight", ...]`)."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)


class DeepseekV3MoE(nn.Module):
    def __init__(self, hidden_size: int, moe: DeepseekMoeSettings) -> None:
        super().__init__()
        self.gate = RouterGate(hidden_size, moe.num_experts)
        router = GroupedTopKRouter(moe.num_experts, moe.top_k, moe.n_group, moe.topk_group, moe.norm_topk_prob,
                                   moe.routed_scaling_factor)
        self.experts = ParallelFusedMoE(moe.num_experts, moe.top_k, hidden_size, moe.intermediate_size, router=router)
        self.shared_experts = (Qwen3MLP(hidden_size, moe.intermediate_size * moe.num_shared_experts)
                               if moe.num_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekV3DecoderLayer(PreNormDecoderLayer):
    attention_cls: type[nn.Module] = MLAAttention  # DeepSeek-V3.2 (deepseek_v32.py): MLA + indexer

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = self.attention_cls(cfg, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp


class DeepseekV3Model(nn.Module):
    layer_cls: type[nn.Module] = DeepseekV3DecoderLayer

    def __init__(self, cfg: ModelConfig, max_position: int, moe: DeepseekMoeSettings) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        # RoPE acts on the qk_rope_head_dim dims only (transformers sets config.head_dim to it)
        rotary = RotaryEmbedding(int(cfg.hf_config["qk_rope_head_dim"]), max_position, cfg.rope)
        self.layers = nn.ModuleList(
            self.layer_cls(cfg, i, rotary, DeepseekV3MoE(cfg.hidden_size, moe) if moe.is_sparse(i)
                           else Qwen3MLP(cfg.hidden_size, cfg.intermediate_size))
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, ctx):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden


_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekV3ForCausalLM(nn.Module):
    model_cls: type[nn.Module] = DeepseekV3Model  # the layer stack; DSA models swap in their own
    # HF's separate gate/up projections (dense layers and shared experts) load into one GEMM; MLA's
    # projections load by their own names (no q/k/v rows: a q_proj must stay q_proj)
    stacked_params = [
        ("gate_up_proj", "gate_proj", "gate"),
        ("gate_up_proj", "up_proj", "up"),
    ]

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        if not cfg.uses_mla:
            raise ConfigError(f"{cfg.path}: kv_lora_rank is missing; DeepseekV3ForCausalLM needs MLA fields")
        self.config = cfg
        self.moe = DeepseekMoeSettings(cfg)
        # per-expert or fused expert tensors -> FusedMoE's stacked w13/w2; the router's score
        # correction bias lives in the router module (checkpoint: mlp.gate.e_score_correction_bias)
        self.expert_params = FusedMoE.checkpoint_mapping(self.moe.num_experts) + [
            ("experts.router.e_score_correction_bias", "gate.e_score_correction_bias", None),
        ]
        self.model = self.model_cls(cfg, max_position, self.moe)
        tied_to = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tied_to)

    def skip_checkpoint_tensor(self, name: str) -> bool:
        """DeepSeek-V3 checkpoints append their multi-token-prediction (MTP) module as extra decoder
        layers `model.layers.{num_hidden_layers + i}.*` (num_nextn_predict_layers of them). The
        target model does not use them (transformers drops them too); `speculative("mtp")` loads
        them into a separate `DeepseekV3MTP` (below)."""
        m = _LAYER_INDEX.match(name)
        return m is not None and int(m.group(1)) >= self.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, hidden] for the flattened batch."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def num_nextn_layers(cfg: ModelConfig) -> int:
    """How many multi-token-prediction layers the checkpoint carries (0: none)."""
    return int(cfg.hf_config.get("num_nextn_predict_layers", 0) or 0)


class DeepseekV3MTP(nn.Module):
    """The first next-n layer of a DeepSeek-V3 checkpoint, `model.layers.{num_hidden_layers}.*`,
    as a module of its own (loaded with the same loader; parameter names match the checkpoint).

    Its attention is MLA on cache layer `num_hidden_layers` (the cache spec gets one more layer,
    `cache_specs`), its block is the checkpoint's (MoE when that index is sparse). The embedding
    is the target's (DeepSeek shares it; the checkpoint's copy `model.layers.N.embed_tokens` is not
    read). Later next-n layers (num_nextn_predict_layers > 1, no released model has them) are not
    loaded: chained drafts reuse this one layer."""

    stacked_params = DeepseekV3ForCausalLM.stacked_params

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        if num_nextn_layers(cfg) < 1:
            raise ConfigError(f"{cfg.path}: the checkpoint has no multi-token-prediction layers "
                              "(config.json num_nextn_predict_layers is 0 or missing)")
        self.config = cfg
        self.layer_index = cfg.num_hidden_layers
        moe = DeepseekMoeSettings(cfg)
        self.expert_params = FusedMoE.checkpoint_mapping(moe.num_experts) + [
            ("experts.router.e_score_correction_bias", "gate.e_score_correction_bias", None),
        ]
        rotary = RotaryEmbedding(int(cfg.hf_config["qk_rope_head_dim"]), max_position, cfg.rope)
        i = self.layer_index

        def make_block() -> DeepseekV3DecoderLayer:
            mlp = DeepseekV3MoE(cfg.hidden_size, moe) if moe.is_sparse(i) else Qwen3MLP(cfg.hidden_size,
                                                                                        cfg.intermediate_size)
            return DeepseekV3DecoderLayer(cfg, i, rotary, mlp)

        layer = MultiTokenPredictionLayer(cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps, make_block)
        # nested as model.layers.{i} so names are the checkpoint's
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(i): layer})

    @property
    def layer(self) -> MultiTokenPredictionLayer:
        return self.model.layers[str(self.layer_index)]

    def skip_checkpoint_tensor(self, name: str) -> bool:
        """Read only this layer's tensors, minus its copy of the shared embedding."""
        prefix = f"model.layers.{self.layer_index}."
        return not name.startswith(prefix) or name == prefix + "embed_tokens.weight"

    def cache_specs(self, target_specs: list) -> list:
        """The target's specs with this layer added to its MLA latent group: one more layer in the
        same blocks, so the MTP KV shares block tables, prefix caching and preemption."""
        out = []
        for spec in target_specs:
            if isinstance(spec, MLALatentSpec):
                spec = dataclasses.replace(spec, layers=spec.layers + (self.layer_index,))
            out.append(spec)
        return out

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        return self.layer(positions, embeds, hidden, ctx)

    def compute_logits(self, y: torch.Tensor) -> torch.Tensor:
        return self.layer.compute_logits(y)
