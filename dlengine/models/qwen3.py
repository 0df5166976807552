"""Qwen3 dense (Qwen3ForCausalLM): GQA attention with per-head RMSNorm on q and k (QK-norm)
before RoPE, SwiGLU MLP, pre-norm residual blocks. Weight names follow the HF checkpoint; q/k/v
and gate/up are stacked into one GEMM each (see `stacked_params`)."""

from __future__ import annotations

import torch
from torch import nn

from dlengine.config import ConfigError, ModelConfig
from dlengine.models.layers.activation import SiluAndMul
from dlengine.models.layers.decoder import PreNormDecoderLayer
from dlengine.kernels.context import ForwardContext
from dlengine.models.layers.attention import PagedAttention
from dlengine.models.layers.parallel_linear import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                                    RowParallelLinear, VocabParallelEmbedding)
from dlengine.models.layers.norm import RMSNorm
from dlengine.models.layers.rotary import RotaryEmbedding


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if h % hkv:
            raise ConfigError(f"num_attention_heads={h} is not a multiple of num_key_value_heads={hkv}")
        # under tensor parallelism this rank's heads only (kv heads replicated when fewer than tp)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, h, hkv, bias=cfg.attention_bias)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d
        self.o_proj = RowParallelLinear(h * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.rotary = rotary
        self.attn = PagedAttention(layer_idx, self.num_heads, self.num_kv_heads, d, scale=d**-0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        # QK-norm, RoPE and the KV-cache write happen inside (one fused kernel on GPUs)
        out = self.attn(q, k, v, ctx, self.rotary, positions, q_norm=self.q_norm, k_norm=self.k_norm)
        return self.o_proj(out)


class Qwen3MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, ["gate", "up"])
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Qwen3DecoderLayer(PreNormDecoderLayer):
    """Pre-norm block: attention, then the feed-forward `mlp` (a dense SwiGLU unless the model
    passes another, e.g. Qwen3-MoE's sparse block)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp if mlp is not None else Qwen3MLP(cfg.hidden_size, cfg.intermediate_size)


class Qwen3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, make_mlp=None) -> None:
        """`make_mlp(layer_idx)` builds a layer's feed-forward block (default: dense SwiGLU)."""
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(cfg, i, rotary, make_mlp(i) if make_mlp else None) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, ctx):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3ForCausalLM(nn.Module):
    # (our parameter, HF name, shard id): HF's separate projections load into one stacked GEMM
    stacked_params = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", "gate"),
        ("gate_up_proj", "up_proj", "up"),
    ]

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg, max_position)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size,
                                      self.model.embed_tokens if cfg.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, hidden] for the flattened batch."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
