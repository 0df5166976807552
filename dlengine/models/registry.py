"""HF `architectures` name -> model class. New families register here."""

from __future__ import annotations

from torch import nn

from dlengine.config import ConfigError, ModelConfig
from dlengine.models.deepseek_v3 import DeepseekV3ForCausalLM
from dlengine.models.deepseek_v32 import DeepseekV32ForCausalLM
from dlengine.models.glm_moe_dsa import GlmMoeDsaForCausalLM
from dlengine.models.qwen3 import Qwen3ForCausalLM
from dlengine.models.qwen3_5 import (Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5MoeForCausalLM,
                                     Qwen3_5MoeForConditionalGeneration)
from dlengine.models.qwen3_moe import Qwen3MoeForCausalLM
from dlengine.models.qwen3_next import Qwen3NextForCausalLM
from dlengine.models.qwen3_vl import Qwen3VLForConditionalGeneration
from dlengine.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

# the same names are listed in architectures.py, which config.py reads without importing any class
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,  # also Kimi-K2
    "DeepseekV32ForCausalLM": DeepseekV32ForCausalLM,  # DeepSeek Sparse Attention
    "GlmMoeDsaForCausalLM": GlmMoeDsaForCausalLM,  # GLM-5, DeepSeek Sparse Attention
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen3NextForCausalLM": Qwen3NextForCausalLM,
    "Qwen3_5ForCausalLM": Qwen3_5ForCausalLM,
    "Qwen3_5ForConditionalGeneration": Qwen3_5ForConditionalGeneration,
    "Qwen3_5MoeForCausalLM": Qwen3_5MoeForCausalLM,
    "Qwen3_5MoeForConditionalGeneration": Qwen3_5MoeForConditionalGeneration,
    "Qwen3VLForConditionalGeneration": Qwen3VLForConditionalGeneration,
    "Qwen3VLMoeForConditionalGeneration": Qwen3VLMoeForConditionalGeneration,
}


def get_model_class(cfg: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[cfg.architecture]
    except KeyError:
        raise ConfigError(
            f"architecture {cfg.architecture!r} (from {cfg.path}/config.json) is not supported; "
            f"supported: {sorted(MODEL_REGISTRY)}"
        ) from None
