"""Qwen3-VL (Qwen3VLForConditionalGeneration): a ViT (models/vision/qwen3_vl_vision.py) whose
merged patch tokens replace the prompt's image and video placeholder tokens, and Qwen3's text
model with
  - M-RoPE (layers/mrope.py): three positions per token, interleaved over the rotary frequencies;
  - deepstack: features from early ViT blocks added to the hidden states at the image and video
    tokens after decoder layers 0, 1, ... (one feature map per layer).

Images and videos reach the model through the forward context (`ctx.multimodal`: per request
with either, its rows in the batch and its MultimodalInputs). A request's images and videos are
encoded once, at the first chunk that reaches one of their tokens, kept on the request while its
prompt runs (chunked prefill takes each chunk's slice; a video's tokens are one run per temporal
patch, separated by timestamp text) and dropped after the chunk holding the last of them. A
request recomputed after preemption encodes again. Images and videos an encoder engine already encoded (EPD,
their `embeddings` set by the front) skip the vision tower. Text-only requests use their 1-D position on all
three axes, as transformers does.

Checkpoint layout (the released one): `model.visual.*`, `model.language_model.{embed_tokens,
layers, norm}`, `lm_head` (tied to the embedding when `tie_word_embeddings`). The MoE variant is
in qwen3_vl_moe.py.
"""

from __future__ import annotations

import torch
from torch import nn

from dlengine.config import ConfigError, ModelConfig
from dlengine.kernels.context import ForwardContext, MultimodalSegment
from dlengine.models.layers.decoder import PreNormDecoderLayer
from dlengine.models.layers.mrope import MRotaryEmbedding, RopeStep
from dlengine.models.layers.norm import RMSNorm
from dlengine.models.layers.parallel_linear import ParallelLMHead, VocabParallelEmbedding
from dlengine.models.qwen3 import Qwen3Attention, Qwen3ForCausalLM, Qwen3MLP
from dlengine.models.vision.qwen3_vl_vision import Qwen3VLVisionModel


class Qwen3VLAttention(Qwen3Attention):
    """Qwen3's attention, rotated by the forward's M-RoPE tables instead of a position table."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, rotary=None)

    def forward(self, rope: RopeStep, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = hidden.shape[0]
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden).split([hq, hkv, hkv], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, ctx, rope, rope.positions, q_norm=self.q_norm, k_norm=self.k_norm)
        return self.o_proj(out)


class Qwen3VLDecoderLayer(PreNormDecoderLayer):
    def __init__(self, cfg: ModelConfig, layer_idx: int, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3VLAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp


class VisualRows:
    """This step's image tokens: their rows in the batch, their embeddings, and the deepstack
    features to add at those rows after decoder layers 0, 1, ..."""

    def __init__(self, rows: torch.Tensor, embeds: torch.Tensor, deepstack: list[torch.Tensor]) -> None:
        self.rows, self.embeds, self.deepstack = rows, embeds, deepstack


class Qwen3VLTextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, make_mlp) -> None:
        super().__init__()
        rope_params = cfg.hf_config.get("rope_parameters") or cfg.hf_config.get("rope_scaling") or {}
        sections = rope_params.get("mrope_section")
        if not sections:
            raise ConfigError(f"{cfg.path}: Qwen3-VL needs rope_parameters.mrope_section")
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = MRotaryEmbedding(cfg.head_dim, max_position, cfg.rope, sections)
        self.layers = nn.ModuleList(Qwen3VLDecoderLayer(cfg, i, make_mlp(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                visual: VisualRows | None = None) -> torch.Tensor:
        """positions [3, T] (or [T] when no token of the batch has M-RoPE positions of its own)."""
        hidden, residual = self.embed_tokens(input_ids), None
        if visual is not None:
            hidden = hidden.index_copy(0, visual.rows, visual.embeds.to(hidden.dtype))
        rope = self.rotary.step(positions)
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(rope, hidden, residual, ctx)
            if visual is not None and i < len(visual.deepstack):
                # the layer's output is hidden + residual: adding to either part adds to the sum
                hidden = hidden.index_add(0, visual.rows, visual.deepstack[i].to(hidden.dtype))
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3VLModel(nn.Module):
    """`model.` of the checkpoint: the vision tower and a text model. The text model is passed in
    (Qwen3-VL's, or Qwen3.5's hybrid stack): it takes `(input_ids, positions, ctx, visual)`, with
    positions [3, T] or [T] and `visual` the step's image rows (VisualRows) or None."""

    def __init__(self, cfg: ModelConfig, language_model: nn.Module) -> None:
        super().__init__()
        vision_config = cfg.hf_config.get("vision_config")
        if not isinstance(vision_config, dict):
            raise ConfigError(f"{cfg.path}: config.json has no vision_config")
        self.visual = Qwen3VLVisionModel(vision_config)
        self.language_model = language_model

    def encode_images(self, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All of a request's images and videos (`inputs.visual_inputs`, images first) ->
        (tokens [sum of their tokens, hidden], deepstack list; empty for a tower without
        deepstack, Qwen3.5's). The vision tower runs once over all of them: attention never
        crosses an image or a video frame, so batching them changes nothing. An image whose
        embeddings an encoder engine computed (`ImageInput.embeddings`, [1 + levels, tokens,
        hidden]) is not encoded again, nor is such a video (`VideoInput.embeddings`: all its
        temporal patches' tokens, in order)."""
        device = self.language_model.embed_tokens.weight.device
        items = inputs.visual_inputs
        local = [x for x in items if x.embeddings is None]
        if len(local) == len(items):
            pixels = torch.cat([x.pixel_values for x in items]).to(device)
            return self.visual(pixels, [x.grid_thw for x in items])
        if local:
            pixels = torch.cat([x.pixel_values for x in local]).to(device)
            local_tokens, local_features = self.visual(pixels, [x.grid_thw for x in local])
        tokens, levels, row = [], [], 0
        for x in items:
            if x.embeddings is not None:
                e = x.embeddings.to(device, non_blocking=True)
                tokens.append(e[0])
                levels.append(list(e[1:]))
            else:
                tokens.append(local_tokens[row : row + x.num_tokens])
                levels.append([f[row : row + x.num_tokens] for f in local_features])
                row += x.num_tokens
        return torch.cat(tokens), [torch.cat(level) for level in zip(*levels)]

    def gather_multimodal(self, segments: list[MultimodalSegment], positions: torch.Tensor
                          ) -> tuple[torch.Tensor, VisualRows | None]:
        """([3, T] positions, this step's image and video rows) from the batch's requests with
        images or videos."""
        if not segments:
            return positions, None
        pos3 = positions.expand(3, -1).clone()
        rows, embeds, deepstack = [], [], []
        for seg in segments:
            mm = seg.inputs
            end = seg.start + seg.num_tokens
            pos3[:, seg.row : seg.row + seg.num_tokens] = torch.from_numpy(
                mm.rope_positions(seg.start, seg.num_tokens)).to(positions.device)
            overlapping = mm.spans_overlapping(seg.start, end)
            if not overlapping:
                continue
            if mm.encoder_cache is None:
                mm.encoder_cache = self.encode_images(mm)
            tokens, features = mm.encoder_cache
            firsts = [0]  # each input's first row in `tokens`
            for x in mm.visual_inputs:
                firsts.append(firsts[-1] + x.num_tokens)
            for k, span_lo, span_hi, span_row in overlapping:
                lo, hi = max(seg.start, span_lo), min(end, span_hi)
                first = firsts[k] + span_row + lo - span_lo
                src = slice(first, first + hi - lo)
                rows.append(torch.arange(seg.row + lo - seg.start, seg.row + hi - seg.start, device=positions.device))
                embeds.append(tokens[src])
                deepstack.append([f[src] for f in features])
            if end >= mm.visual_end:
                mm.encoder_cache = None  # every image and video token has been computed
        if not rows:
            return pos3, None
        return pos3, VisualRows(torch.cat(rows), torch.cat(embeds),
                                [torch.cat(level) for level in zip(*deepstack)])

    def forward(self, input_ids, positions, ctx):
        positions, visual = self.gather_multimodal(list(ctx.multimodal), positions)
        return self.language_model(input_ids, positions, ctx, visual)


class Qwen3VLForConditionalGeneration(nn.Module):
    stacked_params = Qwen3ForCausalLM.stacked_params

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen3VLModel(cfg, Qwen3VLTextModel(cfg, max_position, self.make_mlp))
        tied_to = self.model.language_model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tied_to)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        return Qwen3MLP(self.config.hidden_size, self.config.intermediate_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, hidden] for the flattened batch."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
