"""Tiny DeepSeek Sparse Attention checkpoints (DeepSeek-V3.2, GLM-5) for tests, built with
transformers' own DeepseekV32ForCausalLM / GlmMoeDsaForCausalLM.

They take the tiny DeepSeek-V3's shape (MLA with YaRN, one dense layer then MoE layers with a
shared expert) plus an indexer of 8 heads x 16 dims and index_topk 16, so prompts of a few dozen
tokens already make the indexer choose: sparse attention really selects. Eight indexer heads keep
exact-zero scores (every head's relu zero, a tie) rare. "glm-moe-dsa" has 4 layers, the third
"shared" (it reuses the second's top-k, with no indexer of its own), rms_norm_eps 1e-5 (the
latent norms keep transformers' 1e-6) and one expert group, as GLM-5.

Besides the usual sharpening (testing/__init__.py), the indexer's key-norm bias is re-drawn
around 0 and the router's score-correction bias randomised, as for DeepSeek-V3.
"""

from __future__ import annotations

DSA_KINDS = ("deepseek-v32", "glm-moe-dsa")
TINY_INDEX_TOPK = 16

_YARN = {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
         "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}


def dsa_config(kind: str) -> dict:
    cfg = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=1024,
        rope_parameters=dict(_YARN), rms_norm_eps=1e-6, tie_word_embeddings=False,
        index_n_heads=8, index_head_dim=16, index_topk=TINY_INDEX_TOPK,
        bos_token_id=None, eos_token_id=1, pad_token_id=0,
    )
    if kind == "glm-moe-dsa":
        cfg.update(num_hidden_layers=4, n_group=1, topk_group=1, rms_norm_eps=1e-5,
                   indexer_types=["full", "full", "shared", "full"])
    elif kind != "deepseek-v32":
        raise ValueError(f"unknown DSA kind {kind!r}; known: {DSA_KINDS}")
    return cfg


def build_dsa_model(kind: str, seed: int, sharpen, router_gain: float):
    """(transformers model in float32, sharpened, its config). `sharpen` and `router_gain` are
    the shared tiny-checkpoint recipe's (dlengine.testing passes them: no import back)."""
    import torch
    import transformers as tf

    config_cls, model_cls = {"deepseek-v32": (tf.DeepseekV32Config, tf.DeepseekV32ForCausalLM),
                             "glm-moe-dsa": (tf.GlmMoeDsaConfig, tf.GlmMoeDsaForCausalLM)}[kind]
    cfg = config_cls(**dsa_config(kind))
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch.float32)
    sharpen(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(router_gain)
            elif name.endswith("indexer.k_norm.bias"):  # sharpen drew it around 1, as a norm weight
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    return model, cfg
