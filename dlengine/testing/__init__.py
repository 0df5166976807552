"""Deterministic tiny checkpoints built with transformers' own model classes.

No weights can be downloaded in CI, so tests, docs and the CLI's default model use checkpoints
made here: transformers' `Qwen3ForCausalLM` (or `Qwen3MoeForCausalLM`, `DeepseekV3ForCausalLM`) with random weights from a
fixed seed, written with `save_pretrained` next to a small byte-level BPE tokenizer. They are
cached on disk (under $DLENGINE_CACHE or ~/.cache/dlengine) keyed by a recipe version, so they are
built once.

Weights are drawn at about 1/sqrt(hidden) rather than HF's 0.02, and norm weights are
re-randomised: with near-uniform attention a RoPE, mask or cache bug would hide inside the
comparison tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from dlengine.testing.dsa import DSA_KINDS, build_dsa_model
from dlengine.testing.hybrid import HYBRID_KINDS, build_hybrid_model, fuse_experts_on_disk, rerandomise_hybrid
from dlengine.testing.hybrid_mtp import HYBRID_MTP_KINDS
from dlengine.testing.vl import (QWEN3_5_VL_KINDS, VL_KINDS, build_vl_model, build_vl_tokenizer,
                                 transpose_experts_on_disk, write_preprocessor_config, write_video_preprocessor_config)

RECIPE_VERSION = "2"  # 2: the tokenizer carries a chat template (CHAT_TEMPLATE)
# kinds whose recipe changed since, each with its own version: a new cache folder, so a stale one
# is never read, while the other kinds keep theirs
# (VL 2.1: the chat template renders video parts; video_preprocessor_config.json)
KIND_RECIPE_VERSIONS = {kind: "2.1" for kind in VL_KINDS}
PRESETS = {"tiny-qwen3": "qwen3", "tiny-qwen3-yarn": "qwen3-yarn", "tiny-qwen3-untied": "qwen3-untied",
           "tiny-qwen3-moe": "qwen3-moe", "tiny-deepseek-v3": "deepseek-v3", "tiny-kimi-k2": "kimi-k2",
           "tiny-deepseek-v3-fp8": "deepseek-v3-fp8", "tiny-qwen3-next": "qwen3-next", "tiny-qwen3.5": "qwen3.5",
           "tiny-qwen3.5-moe": "qwen3.5-moe", "tiny-qwen3-vl": "qwen3-vl", "tiny-qwen3-vl-moe": "qwen3-vl-moe",
           "tiny-qwen3.5-vl": "qwen3.5-vl", "tiny-qwen3.5-moe-vl": "qwen3.5-moe-vl",
           "tiny-deepseek-v32": "deepseek-v32", "tiny-glm-moe-dsa": "glm-moe-dsa", "tiny-deepseek-v3-mtp": "deepseek-v3-mtp",
           "tiny-deepseek-v4": "deepseek-v4", "tiny-qwen3.5-moe-mtp": "qwen3.5-moe-mtp",
           "tiny-qwen3-next-mtp": "qwen3-next-mtp"}
# kinds derived from another kind's checkpoint by a post-processing step: kind -> source kind
_DERIVED = {"deepseek-v3-fp8": "deepseek-v3", "deepseek-v3-mtp": "deepseek-v3", **HYBRID_MTP_KINDS}
FP8_BLOCK = (128, 128)
ROUTER_GAIN = 2.0  # qwen3-moe: router weights are drawn this much larger, for decisive routing

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paged attention keeps the key value cache in "
    "fixed size blocks, so requests of different lengths share one pool of memory. Continuous "
    "batching admits new requests every step, and chunked prefill splits long prompts so that "
    "decodes keep flowing. Prefix caching reuses blocks of identical prompt prefixes. "
    "Once upon a time there was a tiny language model that wanted to be exact. "
    "0123456789 + - * / = ( ) [ ] { } < > ! ? , . ; : ' \" hello world Hello World "
)


def cache_root() -> str:
    root = os.environ.get("DLENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dlengine")
    os.makedirs(root, exist_ok=True)
    return root


_DEEPSEEK_KINDS = ("deepseek-v3", "kimi-k2")


def _deepseek_config(kind: str) -> dict:
    """DeepseekV3Config fields: MLA attention (q and kv LoRA ranks, decoupled interleaved RoPE on
    8 dims, YaRN with mscale), one dense layer then sparse ones with a shared expert. moe sizes are
    non-square so a transposed load fails. "kimi-k2" is Kimi-K2's shape of the same architecture:
    one expert group (plain top-k over sigmoid scores), more experts, its scaling factor."""
    cfg = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=1024,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1,
                      "rope_theta": 10000.0},
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True,
        bos_token_id=None, eos_token_id=1, pad_token_id=0,
    )
    if kind == "kimi-k2":
        cfg.update(n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1,
                   routed_scaling_factor=2.827, num_attention_heads=2, num_key_value_heads=2,
                   q_lora_rank=48, kv_lora_rank=24, qk_nope_head_dim=24, v_head_dim=20)
    return cfg


def _model_config(kind: str) -> dict:
    if kind in _DEEPSEEK_KINDS:
        return _deepseek_config(kind)
    cfg = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    if kind == "qwen3-yarn":
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    elif kind == "qwen3-untied":
        cfg["tie_word_embeddings"] = False
        cfg["num_hidden_layers"] = 3
        cfg["attention_bias"] = True
    elif kind == "qwen3-moe":
        # 3 layers, the middle one dense (mlp_only_layers); moe_intermediate_size 24 keeps the
        # stacked expert tensors non-square ([8, 48, 64] and [8, 64, 24]), so a transposed load fails
        cfg.update(num_hidden_layers=3, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=24, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])
    elif kind != "qwen3":
        raise ValueError(f"unknown tiny model kind {kind!r}; known: {sorted(set(PRESETS.values()))}")
    return cfg


# A ChatML-style chat template in plain text (the tiny vocabulary has no <|im_start|> tokens, so the
# markers are ordinary BPE pieces): a system block listing the tools, one block per message, an
# assistant's tool calls in Qwen3's <tool_call>{json}</tool_call> form. It only shapes prompts;
# token ids and weights are those of version 1.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages and messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Call a tool with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}{% if not (tools and loop.first and message.role == 'system') %}"
    "<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls or [] %}<tool_call>{\"name\": {{ call.function.name | tojson }}, "
    "\"arguments\": {{ call.function.arguments }}}</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on a fixed corpus: deterministic, any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def _sharpen(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _is_fp8_quantised(name: str, tensor) -> bool:
    """What DeepSeek's FP8 checkpoints (and transformers' FP8 quantiser) store in FP8: the weight
    of every linear projection and expert. Embeddings, lm_head, norms and the router gate (with
    its score-correction bias) keep their precision."""
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return False
    # an MTP layer's copies of the embedding and the output head stay unquantised like the originals
    return not (name in ("model.embed_tokens.weight", "lm_head.weight") or name.endswith("mlp.gate.weight")
                or name.endswith(("shared_head.head.weight", ".embed_tokens.weight")))


def build_fp8_checkpoint(src: str, path: str, block: tuple[int, int] = FP8_BLOCK) -> str:
    """Quantise a DeepSeek-V3 checkpoint at `src` the way DeepSeek ships V3 / Kimi-K2: each linear
    weight float8_e4m3fn with a float32 `weight_scale_inv` per 128 x 128 block (amax / 448; tiny
    matrices are one partial block; tests pass smaller `block`s for multi-block grids), other tensors bfloat16 except the float32
    e_score_correction_bias; config.json gets DeepSeek's quantization_config."""
    import torch
    from safetensors.torch import load_file, save_file

    from dlengine.kernels.fp8.fp8_torch import quantize_weight_blockwise

    os.makedirs(path, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if _is_fp8_quantised(name, t):
            q, scale_inv = quantize_weight_blockwise(t, block)
            out[name] = q
            out[name[: -len("weight")] + "weight_scale_inv"] = scale_inv
        elif name.endswith("e_score_correction_bias"):
            out[name] = t.float()
        else:
            out[name] = t.to(torch.bfloat16)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(src):
        if f not in ("model.safetensors", "config.json", "dlengine_recipe.json"):
            shutil.copy(os.path.join(src, f), os.path.join(path, f))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["dtype"] = "bfloat16"
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block),
                                  "activation_scheme": "dynamic"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def build_tiny_checkpoint(kind: str, path: str, seed: int = 0) -> str:
    import torch
    from transformers import GenerationConfig

    if kind in _DERIVED:
        if kind == "deepseek-v3-mtp":  # a trained next-n layer added (testing/mtp.py)
            from dlengine.testing.mtp import build_mtp_checkpoint

            build_mtp_checkpoint(tiny_checkpoint(_DERIVED[kind], seed), path, seed)
        elif kind in HYBRID_MTP_KINDS:  # a trained mtp.* head added (testing/hybrid_mtp.py)
            from dlengine.testing.hybrid_mtp import build_hybrid_mtp_checkpoint

            build_hybrid_mtp_checkpoint(kind, tiny_checkpoint(_DERIVED[kind], seed), path, seed)
        else:
            build_fp8_checkpoint(tiny_checkpoint(_DERIVED[kind], seed), path)
        with open(os.path.join(path, "dlengine_recipe.json"), "w") as f:
            json.dump({"kind": kind, "seed": seed, "version": RECIPE_VERSION, "source": _DERIVED[kind]}, f)
        return path
    if kind in HYBRID_KINDS:
        return _build_hybrid_checkpoint(kind, path, seed)
    if kind in VL_KINDS:
        return _build_vl_checkpoint(kind, path, seed)
    if kind in DSA_KINDS:
        return _build_dsa_checkpoint(kind, path, seed)
    if kind == "deepseek-v4":
        from dlengine.testing.deepseek_v4 import build_deepseek_v4_checkpoint

        return build_deepseek_v4_checkpoint(path, seed, _sharpen, ROUTER_GAIN, build_tokenizer,
                                            {"kind": kind, "seed": seed, "version": RECIPE_VERSION})
    if kind.endswith("-moe"):
        from transformers import Qwen3MoeConfig as config_cls, Qwen3MoeForCausalLM as model_cls
    elif kind in _DEEPSEEK_KINDS:
        from transformers import DeepseekV3Config as config_cls, DeepseekV3ForCausalLM as model_cls
    else:
        from transformers import Qwen3Config as config_cls, Qwen3ForCausalLM as model_cls

    cfg = config_cls(**_model_config(kind))
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch.float32)
    _sharpen(model, seed)
    if kind.endswith("-moe") or kind in _DEEPSEEK_KINDS:
        _gain_routers(model)
    if kind in _DEEPSEEK_KINDS:
        # transformers initialises the score-correction bias (a buffer, which _sharpen skips) to
        # zeros: randomise it so that selecting with it and weighting without it are both tested
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id).save_pretrained(path)
    build_tokenizer(cfg.vocab_size).save_pretrained(path)
    with open(os.path.join(path, "dlengine_recipe.json"), "w") as f:
        json.dump({"kind": kind, "seed": seed, "version": RECIPE_VERSION}, f)
    return path


def _build_hybrid_checkpoint(kind: str, path: str, seed: int) -> str:
    """Qwen3-Next / Qwen3.5 / Qwen3.5-MoE (testing/hybrid.py)."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model, text_cfg = build_hybrid_model(kind)
    model = model.to(torch.float32)
    _sharpen(model, seed)
    rerandomise_hybrid(model, seed)
    _gain_routers(model)
    model.save_pretrained(path, safe_serialization=True)
    if kind == "qwen3.5-moe":
        fuse_experts_on_disk(path)
    GenerationConfig(eos_token_id=text_cfg.eos_token_id, pad_token_id=text_cfg.pad_token_id).save_pretrained(path)
    build_tokenizer(text_cfg.vocab_size).save_pretrained(path)
    with open(os.path.join(path, "dlengine_recipe.json"), "w") as f:
        json.dump({"kind": kind, "seed": seed, "version": RECIPE_VERSION}, f)
    return path


def _build_vl_checkpoint(kind: str, path: str, seed: int) -> str:
    """Qwen3-VL / Qwen3-VL-MoE / Qwen3.5 and Qwen3.5-MoE with images (testing/vl.py): weights,
    tokenizer with the vision tokens, the image processor's preprocessor_config.json and the video
    processor's video_preprocessor_config.json."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model, text_cfg = build_vl_model(kind)
    model = model.to(torch.float32)
    _sharpen(model, seed)
    if kind in QWEN3_5_VL_KINDS:
        rerandomise_hybrid(model, seed)
    _gain_routers(model)
    model.save_pretrained(path, safe_serialization=True)
    if kind == "qwen3-vl-moe":
        transpose_experts_on_disk(path)
    elif kind == "qwen3.5-moe-vl":
        fuse_experts_on_disk(path)
    GenerationConfig(eos_token_id=text_cfg.eos_token_id, pad_token_id=text_cfg.pad_token_id).save_pretrained(path)
    build_vl_tokenizer(text_cfg.vocab_size, _CORPUS).save_pretrained(path)
    write_preprocessor_config(path)
    write_video_preprocessor_config(path)
    with open(os.path.join(path, "dlengine_recipe.json"), "w") as f:
        json.dump({"kind": kind, "seed": seed, "version": KIND_RECIPE_VERSIONS[kind]}, f)
    return path


def _build_dsa_checkpoint(kind: str, path: str, seed: int) -> str:
    """DeepSeek-V3.2 / GLM-5 (testing/dsa.py)."""
    from transformers import GenerationConfig

    model, cfg = build_dsa_model(kind, seed, _sharpen, ROUTER_GAIN)
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id).save_pretrained(path)
    build_tokenizer(cfg.vocab_size).save_pretrained(path)
    with open(os.path.join(path, "dlengine_recipe.json"), "w") as f:
        json.dump({"kind": kind, "seed": seed, "version": RECIPE_VERSION}, f)
    return path


def _gain_routers(model) -> None:
    """MoE router weights ROUTER_GAIN times larger: decisive routing, so a float rounding
    difference rarely flips an expert choice between us and transformers."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(ROUTER_GAIN)


def tiny_checkpoint(kind: str = "qwen3", seed: int = 0) -> str:
    """Path of the cached tiny checkpoint `kind`, building it on first use (safe under
    concurrent test processes: built in a temp folder, then renamed into place)."""
    version = KIND_RECIPE_VERSIONS.get(kind, RECIPE_VERSION)
    path = os.path.join(cache_root(), f"tiny-{kind}-s{seed}-v{version}")
    if os.path.isfile(os.path.join(path, "dlengine_recipe.json")):
        return path
    tmp = tempfile.mkdtemp(prefix=f".tiny-{kind}-", dir=cache_root())
    try:
        build_tiny_checkpoint(kind, tmp, seed)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
