"""What a request carries when its prompt holds images or videos: the processed pixels of each,
where its tokens sit in the prompt, its content hash, and the M-RoPE positions of the whole prompt.

An image's tokens are one run in the prompt. A video's are one run per temporal patch (two
sampled frames, for Qwen3-VL), the runs separated by the next frame's timestamp text and vision
start / end tokens; the vision tower encodes the whole video at once and its tokens fill the runs
in order. Images and videos are both "visual inputs" below (`visual_inputs`: the images, then the
videos, the order of the model's encoder cache).

Made once by the front (multimodal/processor.py) when the request is added, and read by:
- the model, through the forward context: for a chunk of the prompt it runs the vision encoder
  once per request (`encoder_cache`, filled by the model and dropped once the last visual token
  has been computed), scatters the embeddings into that chunk's image and video tokens and takes
  the chunk's M-RoPE positions from `rope_positions`;
- the block manager: a full block that holds image or video tokens is keyed by those inputs'
  content hashes (`block_extra_key`), since every image's (video's) tokens are the same
  placeholder id.

The encoder seam (encode-prefill-decode disaggregation, docs/vision.md): an image or video whose
`embeddings` are set was encoded elsewhere, by an encoder engine, and pulled by the front
(dlengine/disagg/encoder_client.py) when the request was added; the model uses them instead of
running its vision tower on that input. Everything else (content hash, positions, prefix
caching) is the same whoever encoded it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class ImageInput:
    pixel_values: torch.Tensor  # [num_patches, C * T * P * P], float32, on the host
    grid_thw: tuple[int, int, int]  # patches per (frame, row, column) before merging
    content_hash: bytes  # of the processed pixels and grid: equal images share KV, others never
    offset: int  # index of the image's first token in the prompt
    num_tokens: int  # its tokens in the prompt (patches / merge_size ** 2)
    # [1 + deepstack levels, num_tokens, hidden] on the host: the merged patch embeddings, then
    # each deepstack feature map, computed by an encoder engine; None: the model encodes the image
    embeddings: torch.Tensor | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens

    @property
    def spans(self) -> list[tuple[int, int]]:
        """[start, end) of each run of its tokens in the prompt: one."""
        return [(self.offset, self.end)]


@dataclass
class VideoInput:
    pixel_values: torch.Tensor  # [num_patches, C * T * P * P], float32, on the host
    grid_thw: tuple[int, int, int]  # patches per (temporal patch, row, column) before merging
    content_hash: bytes  # of the processed pixels and grid
    frame_offsets: list[int]  # prompt index of the first token of each temporal patch (grid_thw[0] of them)
    tokens_per_frame: int  # tokens of one temporal patch (h * w / merge_size ** 2)
    timestamps: list[float]  # seconds of each temporal patch, as written before its tokens
    # [1 + deepstack levels, num_tokens, hidden] on the host (all temporal patches, in order),
    # computed by an encoder engine; None: the model encodes the video
    embeddings: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.frame_offsets) * self.tokens_per_frame

    @property
    def end(self) -> int:
        return self.frame_offsets[-1] + self.tokens_per_frame

    @property
    def spans(self) -> list[tuple[int, int]]:
        """[start, end) of each temporal patch's tokens in the prompt."""
        return [(o, o + self.tokens_per_frame) for o in self.frame_offsets]


@dataclass
class MultimodalInputs:
    images: list[ImageInput]
    mrope_positions: np.ndarray  # [3, prompt_len] int64: (temporal, height, width) position per prompt token
    mrope_delta: int  # generated token i (index in all tokens) sits at position i + mrope_delta on all axes
    encoder_cache: Any = field(default=None, repr=False)  # the model's visual embeddings while the prompt runs
    videos: list[VideoInput] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return self.mrope_positions.shape[1]

    @property
    def images_end(self) -> int:
        """Prompt index after the last image token."""
        return max((im.end for im in self.images), default=0)

    @property
    def visual_inputs(self) -> list:
        """The images, then the videos: the order of the rows of the model's encoder cache."""
        return [*self.images, *self.videos]

    @property
    def visual_end(self) -> int:
        """Prompt index after the last image or video token."""
        return max((x.end for x in self.visual_inputs), default=0)

    def rope_positions(self, start: int, num: int) -> np.ndarray:
        """[3, num] M-RoPE positions of tokens start .. start + num - 1 (prompt or generated)."""
        out = np.empty((3, num), dtype=np.int64)
        in_prompt = max(0, min(num, self.prompt_len - start))
        out[:, :in_prompt] = self.mrope_positions[:, start : start + in_prompt]
        out[:, in_prompt:] = np.arange(start + in_prompt, start + num, dtype=np.int64) + self.mrope_delta
        return out

    def text_rope_offset(self, start: int, num: int) -> int | None:
        """The offset d with rope_positions(start, num) == start + i + d on every axis (generated
        tokens and text after the last image: what a plain 1-D position start + i + d gives a
        model whose M-RoPE axes are equal), or None where an axis differs (image or video tokens).
        CUDA-graph steps feed such rows as 1-D positions (engine/graph_layout.py)."""
        if start >= self.prompt_len:
            return self.mrope_delta
        pos = self.rope_positions(start, num)
        d = int(pos[0, 0]) - start
        want = np.arange(start, start + num, dtype=np.int64) + d
        return d if (pos == want[None, :]).all() else None

    def images_overlapping(self, start: int, end: int) -> list[tuple[int, ImageInput]]:
        """(index, image) of the images with tokens in [start, end)."""
        return [(k, im) for k, im in enumerate(self.images) if im.offset < end and im.end > start]

    def spans_overlapping(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """(index in `visual_inputs`, span start, span end, the span's first row in that input's
        embeddings) of the token runs with tokens in [start, end)."""
        out = []
        for k, x in enumerate(self.visual_inputs):
            row = 0
            for lo, hi in x.spans:
                if lo < end and hi > start:
                    out.append((k, lo, hi, row))
                row += hi - lo
        return out

    def block_extra_key(self, block_index: int, block_size: int) -> bytes:
        """Bytes the prefix-cache hash of full block `block_index` adds to its token ids: the
        content hashes of the images and videos with tokens in it (b"" for a text-only block)."""
        lo = block_index * block_size
        hit = sorted({k for k, *_ in self.spans_overlapping(lo, lo + block_size)})
        inputs = self.visual_inputs
        return b"".join(inputs[k].content_hash for k in hit)
