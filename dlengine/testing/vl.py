"""Tiny Qwen3-VL checkpoints (dense `Qwen3VLForConditionalGeneration` and MoE
`Qwen3VLMoeForConditionalGeneration`) and tiny Qwen3.5 checkpoints with a vision tower (dense
`Qwen3_5ForConditionalGeneration` and MoE `Qwen3_5MoeForConditionalGeneration`), built with
transformers' own classes, for tests and docs.

The layout is the released one: text weights under `model.language_model.`, the vision tower
under `model.visual.`, the MoE experts as fused 3-D tensors stored as the released checkpoints
store them (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]). Beside config.json and the weights
the folder holds what the engine and transformers' processor read: a tokenizer with Qwen's vision
special tokens and a chat template that renders image and video parts, a `preprocessor_config.json`
for transformers' Qwen2-VL image processor (patch 4, merge 2: a 32 x 32 image is 16 image tokens),
and a `video_preprocessor_config.json` for its Qwen3-VL video processor (2 fps, 4 to 16 frames,
2 frames a temporal patch: 4 frames of 32 x 32 are 2 x 16 video tokens).

Shapes are picked to catch bugs: three vision blocks with deepstack taps after blocks 0 and 1
(merged into decoder layers 0 and 1 of three), a 4 x 4 learned position grid that every image
interpolates, M-RoPE sections [4, 2, 2] over 8 rotary frequencies, non-square expert tensors.

The Qwen3.5 kinds ("qwen3.5-vl", "qwen3.5-moe-vl") take the text model of testing/hybrid.py's
"qwen3.5" / "qwen3.5-moe" (four layers: DeltaNet, DeltaNet, full attention, DeltaNet) with half
of each head rotating (partial_rotary_factor 0.5: 8 frequencies, sections [4, 2, 2], so height
and width drive two each), and a two-block vision tower without deepstack (Qwen3.5 has none);
the MoE experts are fused on disk as the released Qwen3.5-MoE stores them.
"""

from __future__ import annotations

import json
import os

QWEN3_5_VL_KINDS = ("qwen3.5-vl", "qwen3.5-moe-vl")
VL_KINDS = ("qwen3-vl", "qwen3-vl-moe") + QWEN3_5_VL_KINDS
# special tokens first, so their ids are fixed: 0 pad, 1 eos, ...
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
VISION_START_ID, VISION_END_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 4, 5, 6, 7
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

# ChatML with Qwen-VL's image and video parts: a content list renders its text parts verbatim and
# each image or video part as the placeholder the processor expands
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}{% else %}"
    "{% for part in message.content %}"
    "{% if part.type == 'text' %}{{ part.text }}"
    "{% elif part.type in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.type in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                              "mrope_interleaved": True},
             eos_token_id=1, pad_token_id=0, bos_token_id=None)
_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[1])
_VISION = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, patch_size=4,
               temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
# Qwen3.5's tower: Qwen3-VL's without deepstack (transformers' Qwen3.5 vision config has no such field)
_QWEN3_5_VISION = dict({k: v for k, v in _VISION.items() if k != "deepstack_visual_indexes"}, depth=2)
# what transformers' Qwen2-VL image processor reads; pixels bounds keep a 32 x 32 image at its size
_PREPROCESSOR = dict(patch_size=4, temporal_patch_size=2, merge_size=2,
                     size={"shortest_edge": 8 * 8, "longest_edge": 128 * 128},
                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
# what transformers' Qwen3-VL video processor reads (the released checkpoints ship this file too);
# the pixel bounds hold over all frames: 16 frames of 64 x 64 keep their size
_VIDEO_PREPROCESSOR = dict(patch_size=4, temporal_patch_size=2, merge_size=2,
                           size={"shortest_edge": 8 * 8, "longest_edge": 16 * 64 * 64},
                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], fps=2, min_frames=4,
                           max_frames=16, do_sample_frames=True)


def build_vl_tokenizer(vocab_size: int, corpus: str):
    """testing's byte-level BPE (trained on `corpus`) with the vision special tokens and the
    image-aware chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>",
                                   chat_template=VL_CHAT_TEMPLATE)
    ids = fast.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == list(range(len(SPECIAL_TOKENS))), ids
    return fast


def build_vl_model(kind: str):
    """(transformers model in float32, its text config)."""
    import transformers as tf

    if kind not in VL_KINDS:
        raise ValueError(f"unknown Qwen3-VL kind {kind!r}; known: {VL_KINDS}")
    ids = dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
               vision_end_token_id=VISION_END_ID)
    if kind in QWEN3_5_VL_KINDS:
        return _build_qwen3_5_vl_model(kind, ids)
    if kind == "qwen3-vl":
        cfg = tf.Qwen3VLConfig(text_config=dict(_TEXT), vision_config=dict(_VISION), tie_word_embeddings=True, **ids)
        return tf.Qwen3VLForConditionalGeneration(cfg), cfg.text_config
    cfg = tf.Qwen3VLMoeConfig(text_config=dict(_TEXT, **_MOE), vision_config=dict(_VISION), tie_word_embeddings=False,
                              **ids)
    return tf.Qwen3VLMoeForConditionalGeneration(cfg), cfg.text_config


def _build_qwen3_5_vl_model(kind: str, ids: dict):
    import transformers as tf

    from dlengine.testing.hybrid import hybrid_text_config

    moe = kind == "qwen3.5-moe-vl"
    text = hybrid_text_config("qwen3.5-moe" if moe else "qwen3.5")
    text["rope_parameters"].update(partial_rotary_factor=0.5, mrope_section=[4, 2, 2])
    if moe:
        cfg = tf.Qwen3_5MoeConfig(text_config=text, vision_config=dict(_QWEN3_5_VISION), tie_word_embeddings=False,
                                  **ids)
        return tf.Qwen3_5MoeForConditionalGeneration(cfg), cfg.text_config
    cfg = tf.Qwen3_5Config(text_config=text, vision_config=dict(_QWEN3_5_VISION), tie_word_embeddings=True, **ids)
    return tf.Qwen3_5ForConditionalGeneration(cfg), cfg.text_config


def transpose_experts_on_disk(path: str) -> None:
    """transformers writes fused experts in its in-memory layout ([E, 2I, H], [E, H, I]); the
    released Qwen3-VL-MoE checkpoints store their transposes, which transformers transposes back
    at load (its conversion mapping for qwen3_vl_moe)."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    for name in list(tensors):
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})


def write_preprocessor_config(path: str) -> None:
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(dict(_PREPROCESSOR, image_processor_type="Qwen2VLImageProcessor"), f, indent=2)


def write_video_preprocessor_config(path: str) -> None:
    with open(os.path.join(path, "video_preprocessor_config.json"), "w") as f:
        json.dump(dict(_VIDEO_PREPROCESSOR, video_processor_type="Qwen3VLVideoProcessor"), f, indent=2)


def tiny_video(num_frames: int = 4, width: int = 32, height: int = 32, seed: int = 0) -> list:
    """A deterministic random video: a list of RGB PIL frames."""
    return [tiny_image(width, height, seed=seed * 1000 + i) for i in range(num_frames)]


def tiny_image(width: int = 32, height: int = 32, seed: int = 0):
    """A deterministic random RGB PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")
