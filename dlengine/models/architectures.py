"""Names of the Hugging Face `architectures` dlengine can build, without importing any model class.

ModelConfig.from_pretrained reads this to refuse an unsupported checkpoint before it parses any
field (an unsupported family's config.json often lacks the fields a supported one has, and a
"missing field" error would hide the real problem). Keep it equal to the keys of
registry.MODEL_REGISTRY, which maps the same names to their classes; tests/test_config.py checks.
"""

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "DeepseekV3ForCausalLM",  # also Kimi-K2
    "DeepseekV32ForCausalLM",  # DeepSeek Sparse Attention (docs/dsa.md)
    "GlmMoeDsaForCausalLM",  # GLM-5, DeepSeek Sparse Attention
    "DeepseekV4ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen3NextForCausalLM",
    "Qwen3_5ForCausalLM",  # text-only checkpoints of Qwen3.5
    "Qwen3_5ForConditionalGeneration",  # released Qwen3.5, with image inputs (models/qwen3_5.py)
    "Qwen3_5MoeForCausalLM",
    "Qwen3_5MoeForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",  # Qwen3-VL with image inputs (models/qwen3_vl.py)
    "Qwen3VLMoeForConditionalGeneration",
)

# multimodal checkpoints whose text-model fields sit under "text_config" (ModelConfig reads them
# from there; top-level tie_word_embeddings wins, as transformers ties by the top-level config)
NESTED_TEXT_CONFIG: tuple[str, ...] = (
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
)
