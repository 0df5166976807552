"""The multi-token-prediction (MTP) head of Qwen3-Next and Qwen3.5 / Qwen3.5-MoE, as a draft model
(`EngineBuilder.speculative("mtp", num_tokens=k)`; the proposer is speculative/mtp.py's).

The released checkpoints store it beside the target as `mtp.*` (transformers does not build it;
the layout below is the one vLLM's qwen3_next_mtp.py / qwen3_5_mtp.py and SGLang load):

    mtp.pre_fc_norm_embedding, mtp.pre_fc_norm_hidden   zero-centred RMSNorms
    mtp.fc                                              [hidden, 2 * hidden], no bias
    mtp.layers.0                                        one full-attention decoder layer (gated
                                                        attention; the MoE with its shared expert
                                                        in the MoE models, a SwiGLU MLP in dense
                                                        Qwen3.5), Qwen3-Next's / Qwen3.5's names
    mtp.norm                                            zero-centred RMSNorm
    (the embedding and the LM head are the target's)

At position i, with the target's final hidden state h_i (the LM head's input) and the token
t_{i+1} after it:

    x = fc([pre_fc_norm_embedding(embed(t_{i+1})), pre_fc_norm_hidden(h_i)])   (embedding first)
    y = norm(layer(x))                                                          (residual added)
    logits of t_{i+2} = lm_head(y)

and a chained draft feeds y back as the next position's hidden state. Unlike DeepSeek's next-n
layer, position 0's embedding is not zeroed (neither vLLM nor SGLang does for these models).

The layer's K/V live in the paged cache as layer `num_hidden_layers` of the full-attention group
(`cache_specs`), in the same blocks as the target's, like DeepSeek-V3's MTP layer. Its rotary is
the 1-D partial one: for text tokens M-RoPE is exactly that (docs/gdn.md); requests with images
draft with 1-D positions (acceptance only, never tokens). Only `mtp.layers.0` is loaded (the
released models have one); chained drafts reuse it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dlengine.cache.specs import FullAttentionSpec
from dlengine.config import ConfigError, ModelConfig
from dlengine.kernels.context import ForwardContext
from dlengine.models.layers.linear import Linear
from dlengine.models.layers.moe import FusedMoE
from dlengine.models.layers.norm import ZeroCentredRMSNorm
from dlengine.models.qwen3 import Qwen3MLP
from dlengine.models.qwen3_next import FULL, HybridDecoderLayer, PartialRotary, Qwen3NextForCausalLM, moe_block

PREFIX = "mtp."


def num_mtp_layers(cfg: ModelConfig) -> int | None:
    """MTP layers the config declares: Qwen3.5's `mtp_num_hidden_layers`, or
    `num_nextn_predict_layers`; None when it says neither (the checkpoint's tensors decide)."""
    hf = cfg.hf_config
    for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers"):
        if hf.get(key) is not None:
            return int(hf[key])
    return None


class _MTPModule(nn.Module):
    """`mtp.` of the checkpoint."""

    def __init__(self, cfg: ModelConfig, layer_index: int, max_position: int) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.pre_fc_norm_embedding = ZeroCentredRMSNorm(h, eps)
        self.pre_fc_norm_hidden = ZeroCentredRMSNorm(h, eps)
        self.fc = Linear(2 * h, h)
        if int(cfg.hf_config.get("num_experts", 0) or 0) > 0:
            mlp = moe_block(cfg, renormalize=bool(cfg.hf_config.get("norm_topk_prob", True)))
        else:
            if not cfg.intermediate_size:
                raise ConfigError(f"{cfg.path}: intermediate_size is missing")
            mlp = Qwen3MLP(h, cfg.intermediate_size)
        # mtp.layers.0 attends through cache layer `layer_index` (after the target's layers)
        self.layers = nn.ModuleList([HybridDecoderLayer(cfg, layer_index, FULL, PartialRotary(cfg, max_position), mlp,
                                                        grouped_layout=False)])
        self.norm = ZeroCentredRMSNorm(h, eps)


class Qwen3NextMTP(nn.Module):
    """The first MTP layer of a Qwen3-Next / Qwen3.5 checkpoint as a module of its own, built and
    loaded like the target (dlengine.assemble.build_model, model_cls=Qwen3NextMTP): parameter names
    are the checkpoint's `mtp.*`; every other tensor is skipped. `forward` gives y; the logits come
    from the target's LM head (`SharedHeadMTP`)."""

    # q/k/v and gate/up (the shared expert's too) stacked, as the target's attention layers
    stacked_params = Qwen3NextForCausalLM.stacked_params

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        n = num_mtp_layers(cfg)
        if n is not None and n < 1:
            raise ConfigError(f"{cfg.path}: the checkpoint has no multi-token-prediction layers "
                              "(config.json mtp_num_hidden_layers / num_nextn_predict_layers is 0)")
        self.config = cfg
        self.layer_index = cfg.num_hidden_layers
        self.expert_params = FusedMoE.checkpoint_mapping(int(cfg.hf_config.get("num_experts", 0) or 0))
        self.mtp = _MTPModule(cfg, self.layer_index, max_position)

    def skip_checkpoint_tensor(self, name: str) -> bool:
        """Read `mtp.*` only, and of it the first layer (later ones: no released model has them)."""
        return not name.startswith(PREFIX) or (name.startswith(PREFIX + "layers.")
                                               and not name.startswith(PREFIX + "layers.0."))

    def cache_specs(self, target_specs: list) -> list:
        """The target's specs with this layer added to its full-attention group: one more layer in
        the same blocks (block tables, prefix caching, preemption and KV migration are shared)."""
        out, added = [], False
        for spec in target_specs:
            if isinstance(spec, FullAttentionSpec) and not added:
                spec, added = dataclasses.replace(spec, layers=spec.layers + (self.layer_index,)), True
            out.append(spec)
        if not added:
            raise ConfigError("the MTP layer's K/V need the target's full-attention cache group; the target has none")
        return out

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """embeds: embeddings of the next tokens [T, H]; hidden: the target's (or the previous
        chained pass's) hidden states at the same positions [T, H]. Returns y [T, H]."""
        m = self.mtp
        x = m.fc(torch.cat([m.pre_fc_norm_embedding(embeds), m.pre_fc_norm_hidden(hidden)], dim=-1))
        out, residual = m.layers[0](positions, x, None, ctx)
        y, _ = m.norm(out, residual)
        return y


class SharedHeadMTP(nn.Module):
    """The MTP layer with the target's LM head, as the MTP proposer runs it: forward(positions,
    embeds, hidden, ctx) -> y, compute_logits(y), cache_specs(specs)."""

    def __init__(self, mtp: Qwen3NextMTP, lm_head: nn.Module) -> None:
        super().__init__()
        self.layer, self.lm_head = mtp, lm_head

    def cache_specs(self, target_specs: list) -> list:
        return self.layer.cache_specs(target_specs)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        return self.layer(positions, embeds, hidden, ctx)

    def compute_logits(self, y: torch.Tensor) -> torch.Tensor:
        return self.lm_head(y)
