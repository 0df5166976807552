"""Qwen3.5 dense and Qwen3.5-MoE: Qwen3-Next's hybrid stack (qwen3_next.py) with
  - the Gated DeltaNet projections stored apart (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a;
    stacked here into Qwen3-Next's two GEMMs by `stacked_params`),
  - Qwen3.5: a dense SwiGLU MLP in every layer; Qwen3.5-MoE: the shared-expert MoE in every
    layer, routing weights always renormalised over the top-k,
  - M-RoPE over the partial rotary dims: three positions per token (temporal, height, width),
    interleaved over the rotary frequencies by `mrope_section`, as Qwen3-VL does.

The released checkpoints are the multimodal `*ForConditionalGeneration` (text fields under
text_config, read flat by ModelConfig; text weights under `model.language_model.`, experts as
fused 3-D tensors, the vision tower under `model.visual.`). Their vision tower is Qwen3-VL's
without deepstack (models/vision/qwen3_vl_vision.py builds both); images reach the text model
through Qwen3-VL's `Qwen3VLModel` (qwen3_vl.py): encoded once per request, their merged patch
tokens replace the image placeholders, M-RoPE positions from the front (multimodal/processor.py,
equal to transformers' Qwen3.5 `get_rope_index` for images). Text tokens carry one position on all
three axes, where M-RoPE is the 1-D partial rotary. The `*ForCausalLM` classes read text-only
checkpoints (`model.layers...`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dlengine.config import ConfigError, ModelConfig
from dlengine.kernels.context import ForwardContext
from dlengine.models.layers.mrope import MRotaryEmbedding, RopeStep
from dlengine.models.qwen3 import Qwen3MLP
from dlengine.models.qwen3_next import HybridModel, Qwen3NextForCausalLM, moe_block, rotary_dim
from dlengine.models.qwen3_vl import Qwen3VLModel, VisualRows

GDN_STACKED_PARAMS = [
    ("in_proj_qkvz", "in_proj_qkv", "qkv"),
    ("in_proj_qkvz", "in_proj_z", "z"),
    ("in_proj_ba", "in_proj_b", "b"),
    ("in_proj_ba", "in_proj_a", "a"),
]


class Qwen3_5ForCausalLM(Qwen3NextForCausalLM):
    stacked_params = Qwen3NextForCausalLM.stacked_params + GDN_STACKED_PARAMS
    grouped_layout = False

    def make_mlp(self, layer_idx: int) -> nn.Module:
        if not self.config.intermediate_size:
            raise ConfigError(f"{self.config.path}: intermediate_size is missing")
        return Qwen3MLP(self.config.hidden_size, self.config.intermediate_size)


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    def make_mlp(self, layer_idx: int) -> nn.Module:
        return moe_block(self.config, renormalize=True)


class PartialMRotary(nn.Module):
    """M-RoPE on the first rotary_dim dims of each head; the rest pass through. A forward builds
    the step's per-token tables once (`step`); every attention layer rotates with them."""

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        rope_params = cfg.hf_config.get("rope_parameters") or cfg.hf_config.get("rope_scaling") or {}
        # transformers' default when the config names no sections; always interleaved, whatever
        # `mrope_interleaved` says (transformers' Qwen3.5 rotary ignores it)
        sections = rope_params.get("mrope_section") or [11, 11, 10]
        self.dim = rotary_dim(cfg)
        self.mrope = MRotaryEmbedding(self.dim, max_position, dataclasses.replace(cfg.rope, partial_rotary_factor=1.0),
                                      sections)

    def step(self, positions: torch.Tensor) -> RopeStep:
        """positions [3, T] (or [T] when no token of the batch has M-RoPE positions of its own)."""
        return self.mrope.step(positions)

    def forward(self, rope: RopeStep, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dim
        q_rot, k_rot = rope(rope.positions, q[..., :d].contiguous(), k[..., :d].contiguous())
        return torch.cat([q_rot, q[..., d:]], dim=-1), torch.cat([k_rot, k[..., d:]], dim=-1)


class HybridVLTextModel(HybridModel):
    """`model.language_model` of the multimodal checkpoints: the hybrid stack with M-RoPE, image
    tokens' embeddings replaced by the vision tower's (Qwen3.5 has no deepstack)."""

    def __init__(self, cfg: ModelConfig, max_position: int, make_mlp, grouped_layout: bool) -> None:
        super().__init__(cfg, max_position, make_mlp, grouped_layout, rotary=PartialMRotary(cfg, max_position))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                visual: VisualRows | None = None) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        if visual is not None:
            hidden = hidden.index_copy(0, visual.rows, visual.embeds.to(hidden.dtype))
        rope = self.rotary.step(positions)  # passed down as the layers' positions
        for layer in self.layers:
            hidden, residual = layer(rope, hidden, residual, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class _VisionLanguage:
    """Mixin: `model.visual` (the vision tower) and `model.language_model` (the M-RoPE hybrid
    stack) as in the released checkpoints; the MTP tensors are skipped (speculative("mtp") loads
    them into a module of their own)."""

    text_model_class = HybridVLTextModel

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__(cfg, max_position)
        # the hybrid stack built by the base class (lm_head is already tied to its embedding)
        self.model = Qwen3VLModel(cfg, self.model)

    def skip_checkpoint_tensor(self, name: str) -> bool:
        return name.startswith("mtp.")  # the MTP head's own module reads them (models/qwen3_next_mtp.py)

    def text_embedding(self) -> nn.Module:
        return self.model.language_model.embed_tokens


class Qwen3_5ForConditionalGeneration(_VisionLanguage, Qwen3_5ForCausalLM):
    pass


class Qwen3_5MoeForConditionalGeneration(_VisionLanguage, Qwen3_5MoeForCausalLM):
    pass
