"""Qwen3.5 dense and Qwen3.5-MoE, text path: Qwen3-Next's hybrid stack (qwen3_next.py) with
  - the Gated DeltaNet projections stored apart (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a;
    stacked here into Qwen3-Next's two GEMMs by `stacked_params`),
  - Qwen3.5: a dense SwiGLU MLP in every layer; Qwen3.5-MoE: the shared-expert MoE in every
    layer, routing weights always renormalised over the top-k,
  - M-RoPE positions, which for text equal the 1-D partial rotary (see qwen3_next.py).

The released checkpoints are the multimodal `*ForConditionalGeneration` (text fields under
text_config, read flat by ModelConfig; text weights under `model.language_model.`, experts as
fused 3-D tensors): those classes hold the text model at `model.language_model` and skip the
vision tower's tensors (`model.visual.`; the vision path comes with Qwen3-VL). The
`*ForCausalLM` classes read text-only checkpoints (`model.layers...`).
"""

from __future__ import annotations

from torch import nn

from dlengine.config import ConfigError, ModelConfig
from dlengine.models.qwen3 import Qwen3MLP
from dlengine.models.qwen3_next import HybridModel, Qwen3NextForCausalLM, moe_block

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


class LanguageModel(nn.Module):
    """`model.language_model` of the multimodal checkpoints (the vision tower is not built)."""

    def __init__(self, language_model: HybridModel) -> None:
        super().__init__()
        self.language_model = language_model

    def forward(self, input_ids, positions, ctx):
        return self.language_model(input_ids, positions, ctx)


class _TextPathOfMultimodal:
    """Mixin: the text model under `model.language_model`, vision and MTP tensors skipped."""

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__(cfg, max_position)
        self.model = LanguageModel(self.model)

    def skip_checkpoint_tensor(self, name: str) -> bool:
        return name.startswith(("model.visual.", "mtp."))


class Qwen3_5ForConditionalGeneration(_TextPathOfMultimodal, Qwen3_5ForCausalLM):
    pass


class Qwen3_5MoeForConditionalGeneration(_TextPathOfMultimodal, Qwen3_5MoeForCausalLM):
    pass
