"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention (GQA with QK-norm, RoPE) and pre-norm
residual blocks, with the dense MLP replaced by a sparse mixture of experts in most layers.

A layer is sparse when it is not listed in `mlp_only_layers` and `(layer_idx + 1) %
decoder_sparse_step == 0` (transformers' rule); the others keep a dense SwiGLU MLP of
`intermediate_size`. The sparse block is a router (`mlp.gate`, a linear layer to one logit per
expert) plus `num_experts` SwiGLU experts of `moe_intermediate_size`, of which each token uses
`num_experts_per_tok`; Qwen3-MoE has no shared expert. Weight names follow the HF checkpoint; the
experts load from either per-expert or fused tensors (layers/moe.py)."""

from __future__ import annotations

import torch
from torch import nn

from dlengine.config import ConfigError, ModelConfig
from dlengine.kernels.context import ForwardContext
from dlengine.models.layers.parallel_linear import ParallelLMHead
from dlengine.models.layers.parallel_moe import ParallelFusedMoE
from dlengine.models.layers.linear import Linear
from dlengine.models.layers.moe import FusedMoE, SoftmaxTopKRouter
from dlengine.models.qwen3 import Qwen3ForCausalLM, Qwen3MLP, Qwen3Model


class MoeSettings:
    """The MoE fields of a Qwen3-MoE config.json (ModelConfig keeps the dense ones)."""

    def __init__(self, cfg: ModelConfig) -> None:
        hf = cfg.hf_config
        # released checkpoints say num_experts; transformers 5 writes num_local_experts
        self.num_experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)) or 0)
        self.top_k = int(hf.get("num_experts_per_tok", 0) or 0)
        self.intermediate_size = int(hf.get("moe_intermediate_size", 0) or 0)
        self.norm_topk_prob = bool(hf.get("norm_topk_prob", False))
        self.decoder_sparse_step = int(hf.get("decoder_sparse_step", 1) or 1)
        self.mlp_only_layers = set(hf.get("mlp_only_layers") or [])
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{cfg.path}: hidden_act={act!r} is not supported (Qwen3-MoE uses 'silu')")
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{cfg.path}: use_sliding_window=true is not supported")
        if hf.get("shared_expert_intermediate_size"):
            raise ConfigError(f"{cfg.path}: shared experts are not supported by the Qwen3-MoE model")
        if self.num_experts > 0:
            if not 0 < self.top_k <= self.num_experts:
                raise ConfigError(f"{cfg.path}: num_experts_per_tok={self.top_k} must be in [1, num_experts="
                                  f"{self.num_experts}]")
            if self.intermediate_size <= 0:
                raise ConfigError(f"{cfg.path}: moe_intermediate_size is missing")

    def is_sparse(self, layer_idx: int) -> bool:
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)


class Qwen3MoeSparseBlock(nn.Module):
    def __init__(self, hidden_size: int, moe: MoeSettings) -> None:
        super().__init__()
        self.gate = Linear(hidden_size, moe.num_experts)  # router logits
        self.experts = ParallelFusedMoE(moe.num_experts, moe.top_k, hidden_size, moe.intermediate_size,
                                router=SoftmaxTopKRouter(moe.top_k, moe.norm_topk_prob))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))


class Qwen3MoeForCausalLM(nn.Module):
    stacked_params = Qwen3ForCausalLM.stacked_params  # q/k/v and the dense layers' gate/up

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.moe = MoeSettings(cfg)
        # per-expert or fused expert tensors -> the stacked w13/w2 parameters (checked before stacked_params)
        self.expert_params = FusedMoE.checkpoint_mapping(self.moe.num_experts)
        moe = self.moe
        self.model = Qwen3Model(cfg, max_position, make_mlp=lambda i: (
            Qwen3MoeSparseBlock(cfg.hidden_size, moe) if moe.is_sparse(i)
            else Qwen3MLP(cfg.hidden_size, cfg.intermediate_size)))
        tied_to = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tied_to)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, hidden] for the flattened batch."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
