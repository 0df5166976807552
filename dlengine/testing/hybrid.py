"""Tiny Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) for tests, built with
transformers' own classes in the layout the released checkpoints use: Qwen3-Next as
Qwen3NextForCausalLM with per-expert tensors; Qwen3.5 / Qwen3.5-MoE as the multimodal
*ForConditionalGeneration (text fields under text_config, a one-block vision tower whose tensors
the engine skips) with the experts fused into 3-D tensors on disk.

Four layers: linear, linear, full, linear attention (two consecutive DeltaNet layers, and a full
attention layer between DeltaNet layers). Beside the usual sharpening, tensors transformers sets
to constants are re-randomised in ranges that keep the recurrence meaningful: zero-centred norm
weights around 0 (they scale by 1 + w), dt_bias around -3 and A in [0.3, 3] so most heads decay
slowly (a state bug then shows many tokens later instead of being forgotten)."""

from __future__ import annotations

import os

HYBRID_KINDS = ("qwen3-next", "qwen3.5", "qwen3.5-moe")
LAYER_TYPES = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]


def hybrid_text_config(kind: str) -> dict:
    cfg = dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, rms_norm_eps=1e-6, max_position_embeddings=1024,
        layer_types=list(LAYER_TYPES), hidden_act="silu", eos_token_id=1, pad_token_id=0, bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32)
    if kind == "qwen3-next":
        # a dense layer among the sparse ones (mlp_only_layers), as Qwen3MoE's tiny checkpoint has
        cfg.update(moe, intermediate_size=96, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                   tie_word_embeddings=False)
    elif kind == "qwen3.5":
        # tied like the small released Qwen3.5 models; the text config says so too, so that
        # transformers' text-only class (AutoModelForCausalLM, the oracle) ties as well
        cfg.update(intermediate_size=96, tie_word_embeddings=True)
    elif kind == "qwen3.5-moe":
        cfg.update(moe)
    else:
        raise ValueError(f"unknown hybrid kind {kind!r}; known: {HYBRID_KINDS}")
    if kind != "qwen3-next":
        # M-RoPE sections over the 4 rotary frequencies (text tokens use one position on all three)
        cfg["rope_parameters"].update(mrope_section=[2, 1, 1], mrope_interleaved=True)
    return cfg


_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=64, patch_size=4,
               temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)


def build_hybrid_model(kind: str):
    """(transformers model in float32, the config whose eos/pad the generation config takes)."""
    import transformers as tf

    text = hybrid_text_config(kind)
    if kind == "qwen3-next":
        cfg = tf.Qwen3NextConfig(**text)
        return tf.Qwen3NextForCausalLM(cfg), cfg
    if kind == "qwen3.5":
        cfg = tf.Qwen3_5Config(text_config=text, vision_config=_VISION, tie_word_embeddings=True)
        return tf.Qwen3_5ForConditionalGeneration(cfg), cfg.text_config
    cfg = tf.Qwen3_5MoeConfig(text_config=text, vision_config=_VISION, tie_word_embeddings=False)
    return tf.Qwen3_5MoeForConditionalGeneration(cfg), cfg.text_config


def rerandomise_hybrid(model, seed: int) -> None:
    """After the generic sharpening: zero-centred norms, DeltaNet decay parameters."""
    import torch

    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" in name:
                continue
            if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))  # used as 1 + w
            elif name.endswith("linear_attn.dt_bias"):
                p.copy_(-3.0 + torch.randn(p.shape, generator=gen))
            elif name.endswith("linear_attn.A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.3, 3.0, generator=gen).log())


def fuse_experts_on_disk(path: str) -> None:
    """Rewrite per-expert tensors (what save_pretrained writes) as the released Qwen3.5-MoE
    stores them: `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I]."""
    import re

    import torch
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    per_expert = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out = {}
    for name, t in tensors.items():
        m = per_expert.match(name)
        if m:
            groups.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
        else:
            out[name] = t
    for prefix, parts in groups.items():
        n = 1 + max(e for e, _ in parts)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]])
                                                     for e in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n)])
    save_file(out, file, metadata={"format": "pt"})
