"""Requests with images, the front's side: load and preprocess each image with transformers'
image processor (the checkpoint's preprocessor_config.json: the reference), expand each image
placeholder to the image's token count, hash the image's content and compute the prompt's
M-RoPE positions, once, when the request is added.

The prompt carries one `<|image_pad|>` per image, normally inside the model's placeholder
`<|vision_start|><|image_pad|><|vision_end|>` (what the chat template writes for an image part);
the i-th pad is expanded to the i-th image's `t * h * w / merge_size ** 2` tokens, as
transformers' Qwen3-VL processor does.

M-RoPE positions (transformers' `Qwen3VLModel.get_rope_index`, images only; Qwen3.5's
`get_rope_index` gives the same for images): text tokens get
consecutive positions on all three axes; an image's tokens get (start + frame, start + row,
start + column) on its merged grid, and the text after it continues at start + max(rows, cols).
Generated tokens continue on all axes at index + `mrope_delta`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from dlengine.config import ModelConfig
from dlengine.multimodal.images import load_image
from dlengine.multimodal.inputs import ImageInput, MultimodalInputs
from dlengine.sampling_params import InvalidRequestError

# architectures whose prompts may hold images
VISION_ARCHITECTURES = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                        "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")


def image_content_hash(pixel_values, grid_thw: Sequence[int]) -> bytes:
    """Hash of what the model sees of an image: its processed pixels and patch grid."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(grid_thw, dtype=np.int64).tobytes())
    h.update(pixel_values.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def mrope_positions(token_ids: Sequence[int], images: Sequence[tuple[int, tuple[int, int, int]]],
                    merge: int) -> tuple[np.ndarray, int]:
    """([3, len(token_ids)] positions, delta) for a prompt whose images are (offset, grid_thw)."""
    n = len(token_ids)
    pos = np.empty((3, n), dtype=np.int64)
    cur, i = 0, 0
    for offset, (t, h, w) in sorted(images):
        pos[:, i:offset] = np.arange(cur, cur + offset - i)
        cur += offset - i
        gt, gh, gw = t, h // merge, w // merge
        tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
        size = gt * gh * gw
        pos[0, offset : offset + size] = tt.reshape(-1) + cur
        pos[1, offset : offset + size] = hh.reshape(-1) + cur
        pos[2, offset : offset + size] = ww.reshape(-1) + cur
        cur += max(gh, gw)
        i = offset + size
    pos[:, i:] = np.arange(cur, cur + n - i)
    return pos, int(pos.max()) + 1 - n if n else 0


class ImagePromptProcessor:
    """Turns (prompt token ids, images) into (expanded token ids, MultimodalInputs)."""

    def __init__(self, model: ModelConfig) -> None:
        hf = model.hf_config
        self.path = model.path
        self.image_token_id = int(hf["image_token_id"])
        self.merge = int((hf.get("vision_config") or {}).get("spatial_merge_size", 2))
        self._image_processor = None

    @staticmethod
    def for_model(model: ModelConfig) -> "ImagePromptProcessor | None":
        return ImagePromptProcessor(model) if model.architecture in VISION_ARCHITECTURES else None

    @property
    def image_processor(self):
        if self._image_processor is None:
            from transformers import AutoImageProcessor

            try:
                self._image_processor = AutoImageProcessor.from_pretrained(self.path)
            except (OSError, ValueError) as e:
                raise InvalidRequestError(f"{self.path} has no usable image processor config "
                                          f"(preprocessor_config.json): {e}") from None
        return self._image_processor

    def process_images(self, images: Sequence[Any]) -> list[tuple[Any, tuple[int, int, int], bytes, int]]:
        """(pixel values, grid_thw, content hash, token count) of each image, in order: what the
        model (or an encoder engine) needs of an image, without a prompt."""
        if not images:
            return []
        pil = [load_image(im, f"image {k}") for k, im in enumerate(images)]
        out = self.image_processor(images=pil, return_tensors="pt")
        pixels, grids = out["pixel_values"], [tuple(int(x) for x in g) for g in out["image_grid_thw"].tolist()]
        result, patch_start = [], 0
        for grid in grids:
            num_patches = grid[0] * grid[1] * grid[2]
            px = pixels[patch_start : patch_start + num_patches]
            result.append((px, grid, image_content_hash(px, grid), num_patches // (self.merge * self.merge)))
            patch_start += num_patches
        return result

    def process(self, token_ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], MultimodalInputs]:
        pads = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if len(pads) != len(images):
            raise InvalidRequestError(
                f"the prompt has {len(pads)} image placeholders (<|image_pad|>, id {self.image_token_id}) but "
                f"{len(images)} images were given; put <|vision_start|><|image_pad|><|vision_end|> where each "
                "image goes")
        expanded: list[int] = []
        inputs: list[ImageInput] = []
        prev = 0
        for pad, (px, grid, content_hash, num_tokens) in zip(pads, self.process_images(images)):
            expanded.extend(token_ids[prev:pad])
            inputs.append(ImageInput(px, grid, content_hash, len(expanded), num_tokens))
            expanded.extend([self.image_token_id] * num_tokens)
            prev = pad + 1
        expanded.extend(token_ids[prev:])
        positions, delta = mrope_positions(expanded, [(im.offset, im.grid_thw) for im in inputs], self.merge)
        return expanded, MultimodalInputs(inputs, positions, delta)
