"""The tiny DeepSeek-V4 checkpoint: transformers' DeepseekV4ForCausalLM with random weights from a
fixed seed, written in the released checkpoint's layout (no `model.` prefix, `embed`, `head`,
`hc_head_fn`, ...), which transformers' conversion mapping reads back.

Small window (16) and compress rates (CSA 4, HCA 16) with an indexer of 16 heads (so an entry scores exactly 0, a tie, only when all 16 ReLUs are 0) that keeps 8 entries, so
prompts of a few hundred tokens cross the window, many compression periods and the sparse
choice. YaRN on the "compress" RoPE, a swiglu_limit small enough to clamp, two hash-routed
layers. Tensors transformers initialises to constants (sinks, position biases, hyper-connection
base / scale, score-correction bias, tid2eid) are re-randomised so bugs in them show.
"""

from __future__ import annotations

import json
import os

CSA, HCA, SLIDING = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


def deepseek_v4_config() -> dict:
    return dict(
        vocab_size=512, hidden_size=64, moe_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, q_lora_rank=32, partial_rotary_factor=0.25,
        num_experts_per_tok=2, n_routed_experts=8, n_shared_experts=1, routed_scaling_factor=1.5,
        layer_types=[CSA, HCA, SLIDING, CSA], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        compress_rates={CSA: 4, HCA: 16}, sliding_window=16, o_groups=2, o_lora_rank=16,
        index_n_heads=16, index_head_dim=16, index_topk=8, hc_mult=4, hc_sinkhorn_iters=20,
        swiglu_limit=2.0, max_position_embeddings=1024, rope_theta=10000.0, compress_rope_theta=160000.0,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=0,
    )


def released_name(name: str) -> str:
    """transformers' save_pretrained name -> the released checkpoint's."""
    if name.startswith("model."):
        name = name[len("model."):]
    renames = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn",
               "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}
    return renames.get(name, name)


def rerandomise_v4(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("position_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("hc.base", "hc_head.hc_base")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("hc.scale", "hc_head.hc_scale")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
            elif name.endswith("tid2eid"):
                experts = model.config.n_routed_experts
                b.copy_(torch.rand(b.shape[0], experts, generator=gen).argsort(dim=-1)[:, : b.shape[1]])


def build_deepseek_v4_checkpoint(path: str, seed: int, sharpen, router_gain: float, build_tokenizer,
                                 recipe: dict) -> str:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM, GenerationConfig

    cfg = DeepseekV4Config(**deepseek_v4_config())
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).to(torch.float32)
    sharpen(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(router_gain)
    rerandomise_v4(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    file = os.path.join(path, "model.safetensors")
    tensors = {released_name(k): v for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id).save_pretrained(path)
    build_tokenizer(cfg.vocab_size).save_pretrained(path)
    with open(os.path.join(path, "dlengine_recipe.json"), "w") as f:
        json.dump(recipe, f)
    return path
