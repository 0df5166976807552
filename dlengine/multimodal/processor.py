"""Requests with images or videos, the front's side: load and preprocess each image with
transformers' image processor (the checkpoint's preprocessor_config.json: the reference) and each
video with its video processor (multimodal/video_processing.py), expand each placeholder to the
input's tokens, hash the content and compute the prompt's M-RoPE positions, once, when the
request is added.

The prompt carries one `<|image_pad|>` per image, normally inside the model's placeholder
`<|vision_start|><|image_pad|><|vision_end|>` (what the chat template writes for an image part);
the i-th pad is expanded to the i-th image's `t * h * w / merge_size ** 2` tokens, as
transformers' Qwen3-VL processor does. Videos are expanded first, per temporal patch with its
timestamp text (multimodal/video_prompt.py): in the text before tokenising when the prompt is
text (`expand_videos_in_text`), else in the token ids (`expand_videos_in_ids`).

M-RoPE positions (transformers' `Qwen3VLModel.get_rope_index`; Qwen3.5's is the same): text
tokens get consecutive positions on all three axes; an image's tokens get (start + frame, start +
row, start + column) on its merged grid, and the text after it continues at start + max(rows,
cols). Each temporal patch of a video is placed like an image of one frame (its timestamp text
between them is text). Generated tokens continue on all axes at index + `mrope_delta`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from dlengine.config import ModelConfig
from dlengine.multimodal.images import load_image
from dlengine.multimodal.inputs import ImageInput, MultimodalInputs, VideoInput
from dlengine.multimodal.video_prompt import ProcessedVideo, VideoPlaceholders
from dlengine.multimodal.videos import load_video
from dlengine.sampling_params import InvalidRequestError

# architectures whose prompts may hold images and videos
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


class VisionPromptProcessor:
    """Turns (prompt, images, videos) into (expanded token ids, MultimodalInputs). `tokenizer`
    (the checkpoint's) tokenises the timestamps of videos in token-id prompts."""

    def __init__(self, model: ModelConfig, tokenizer=None) -> None:
        hf = model.hf_config
        self.path = model.path
        self.tokenizer = tokenizer
        self.image_token_id = int(hf["image_token_id"])
        self.merge = int((hf.get("vision_config") or {}).get("spatial_merge_size", 2))
        self.videos = self._video_placeholders(hf)
        self._image_processor = None
        self._video_processor = None

    def _video_placeholders(self, hf: dict) -> VideoPlaceholders:
        """The video, vision start and vision end tokens: ids from config.json, text from the
        tokenizer (Qwen's names when there is none)."""
        names = (("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                 ("vision_end_token_id", "<|vision_end|>"))
        args = []
        for key, default in names:
            token_id = hf.get(key)
            text = default
            if token_id is not None and self.tokenizer is not None:
                text = self.tokenizer.convert_ids_to_tokens(int(token_id)) or default
            elif token_id is None and self.tokenizer is not None:
                token_id = self.tokenizer.convert_tokens_to_ids(default)
            args += [text, -1 if token_id is None else int(token_id)]
        return VideoPlaceholders(*args)

    @staticmethod
    def for_model(model: ModelConfig, tokenizer=None) -> "VisionPromptProcessor | None":
        return VisionPromptProcessor(model, tokenizer) if model.architecture in VISION_ARCHITECTURES else None

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

    @property
    def video_processor(self):
        if self._video_processor is None:
            from dlengine.config import ConfigError
            from dlengine.multimodal.video_processing import Qwen3VLVideoPreprocessor

            try:
                self._video_processor = Qwen3VLVideoPreprocessor(self.path)
            except ConfigError as e:
                raise InvalidRequestError(str(e)) from None
        return self._video_processor

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

    def process_videos(self, videos: Sequence[Any]) -> list[ProcessedVideo]:
        """Each video loaded, sampled and patched, with its timestamps and content hash."""
        out = []
        for k, video in enumerate(videos):
            processor = self.video_processor
            try:
                clip = load_video(video, f"video {k}", processor.sample)
                pixels = processor(clip)
            except InvalidRequestError as e:
                msg = str(e)
                raise InvalidRequestError(msg if msg.startswith(f"video {k}") else f"video {k}: {msg}") from None
            t, h, w = pixels.grid_thw
            out.append(ProcessedVideo(pixels.pixel_values, pixels.grid_thw,
                                      image_content_hash(pixels.pixel_values, pixels.grid_thw),
                                      (h // self.merge) * (w // self.merge), pixels.timestamps))
        return out

    def expand_videos_in_text(self, text: str, videos: Sequence[ProcessedVideo]) -> str:
        """A text prompt with its video placeholders expanded (unchanged without any)."""
        return self.videos.expand_text(text, videos)

    def expand_videos_in_ids(self, token_ids: Sequence[int], videos: Sequence[ProcessedVideo]) -> list[int]:
        """A token-id prompt with its video placeholders expanded (unchanged without any)."""
        tokenize = None
        if self.tokenizer is not None:
            tokenize = lambda text: list(self.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        return self.videos.expand_token_ids(token_ids, videos, tokenize)

    def process(self, token_ids: Sequence[int], images: Sequence[Any],
                videos: Sequence[ProcessedVideo] = ()) -> tuple[list[int], MultimodalInputs]:
        """Image placeholders expanded; `videos` (from process_videos) already expanded in
        `token_ids` by one of the expand_videos_* methods."""
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
        video_inputs = [VideoInput(v.pixel_values, v.grid_thw, v.content_hash, offsets, v.tokens_per_frame,
                                   v.timestamps)
                        for v, offsets in zip(videos, self.videos.frame_offsets(expanded, videos))]
        blocks = [(im.offset, im.grid_thw) for im in inputs]
        blocks += [(o, (1, v.grid_thw[1], v.grid_thw[2])) for v in video_inputs for o in v.frame_offsets]
        positions, delta = mrope_positions(expanded, blocks, self.merge)
        return expanded, MultimodalInputs(inputs, positions, delta, videos=video_inputs)


# the name from before videos
ImagePromptProcessor = VisionPromptProcessor
