"""GLM-5 (GlmMoeDsaForCausalLM): DeepSeek-V3.2's architecture (models/deepseek_v32.py) with two
differences, both as transformers' GlmMoeDsa implements them:
- the indexer rotates its keys and queries with interleaved-pair RoPE (DeepSeek-V3.2: rotate-half);
- `indexer_types` may mark layers "shared": they have no indexer (and no indexer key cache) and
  attend to the tokens the previous layer selected.
Both are read from the config by DSASettings; the classes are DeepSeek-V3.2's."""

from __future__ import annotations

from dlengine.models.deepseek_v32 import DeepseekV32ForCausalLM


class GlmMoeDsaForCausalLM(DeepseekV32ForCausalLM):
    pass
