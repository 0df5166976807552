"""Qwen3-VL video preprocessing: frame sampling, resizing, normalisation, temporal patching and the
per-frame timestamps, as transformers' `Qwen3VLVideoProcessor` and `Qwen3VLProcessor` compute them.

transformers' video processor is the reference, and is used whenever it can be: it needs
torchvision, which dlengine does not depend on. Without torchvision the same steps run here
(`preprocess_frames`), on the settings transformers resolves for the checkpoint (its
video_preprocessor_config.json, else preprocessor_config.json, over the class defaults), with
transformers' own `smart_resize`; tests/test_video_qwen3_vl.py checks the two give identical
pixels wherever torchvision is importable. The steps:

1. sampling (`sample_frame_indices`, `do_sample_frames`): `fps` frames a second of the source
   (whose fps is assumed 24 when unknown), at least `min_frames`, at most `max_frames` and the
   source's frame count, spread evenly (np.linspace, rounded) over the source;
2. resizing all frames to one (h, w), multiples of patch_size * merge_size, keeping T * h * w
   within the `size` pixel bounds (bicubic with antialiasing on uint8, as torchvision does on CPU);
3. rescaling and normalising with image_mean / image_std (float32);
4. patching: the frame count padded to a multiple of temporal_patch_size with the last frame,
   each temporal_patch_size frames x patch_size^2 pixels one patch, in the vision tower's order;
5. timestamps (`frame_timestamps`): per temporal patch the mean of its first and last frame's
   time in the source, written into the prompt as "<%.1f seconds>".
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dlengine.config import ConfigError
from dlengine.multimodal.videos import VideoClip
from dlengine.sampling_params import InvalidRequestError

DEFAULT_SOURCE_FPS = 24.0  # what transformers' Qwen3-VL processor assumes when a video's fps is unknown
BICUBIC = 3  # PIL's resampling code, as the processor configs write it


@dataclass(frozen=True)
class VideoSettings:
    """The video processor's settings for one checkpoint (names as in its config)."""

    shortest_edge: int  # size.shortest_edge: fewest pixels over all frames (T * h * w)
    longest_edge: int  # size.longest_edge: most pixels over all frames
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_frames: int
    max_frames: int
    fps: float | None  # frames a second to sample
    num_frames: int | None  # or a fixed frame count (exclusive with fps)
    do_sample_frames: bool
    do_resize: bool
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    cap_pixels_per_frame: bool
    max_video_tokens: int

    @staticmethod
    def for_checkpoint(path: str) -> "VideoSettings":
        """Resolved as transformers resolves them: the checkpoint's video processor config (its
        video_preprocessor_config.json, else preprocessor_config.json) over the defaults of
        transformers' Qwen3VLVideoProcessor."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
        from transformers.video_processing_utils import VideoProcessorMixin

        try:
            given, _ = VideoProcessorMixin.get_video_processor_dict(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} has no usable video processor config (video_preprocessor_config.json or "
                              f"preprocessor_config.json): {e}") from None

        def get(name: str):
            return given[name] if given.get(name) is not None else getattr(Qwen3VLVideoProcessor, name, None)

        size = get("size") or {}
        if not isinstance(size, dict) or not size.get("shortest_edge") or not size.get("longest_edge"):
            raise ConfigError(f"{path}: the video processor's size needs shortest_edge and longest_edge, got {size!r}")
        values = dict(shortest_edge=int(size["shortest_edge"]), longest_edge=int(size["longest_edge"]))
        for f in fields(VideoSettings):
            if f.name not in values:
                values[f.name] = get(f.name)
        values["image_mean"] = tuple(float(x) for x in values["image_mean"])
        values["image_std"] = tuple(float(x) for x in values["image_std"])
        values["cap_pixels_per_frame"] = bool(values["cap_pixels_per_frame"])  # None: transformers' uncapped default
        if values["fps"] is not None and values["num_frames"] is not None:
            raise ConfigError(f"{path}: the video processor sets both fps and num_frames; they are exclusive")
        return VideoSettings(**values)


def sample_frame_indices(s: VideoSettings, total_frames: int, source_fps: float | None) -> list[int]:
    """Indices of the frames to keep (transformers' Qwen3VLVideoProcessor.sample_frames)."""
    num_frames = s.num_frames
    if num_frames is None and s.fps is not None:
        fps = source_fps if source_fps is not None else DEFAULT_SOURCE_FPS
        num_frames = int(total_frames / fps * s.fps)
        num_frames = min(max(num_frames, s.min_frames), s.max_frames, total_frames)
    if num_frames is None:
        num_frames = min(max(total_frames, s.min_frames), s.max_frames)
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int).tolist()


def frame_timestamps(indices: list[int], source_fps: float | None, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frame's time in the source
    (transformers' Qwen3VLProcessor._calculate_timestamps)."""
    fps = source_fps if source_fps is not None else DEFAULT_SOURCE_FPS
    indices = list(indices)
    if len(indices) % temporal_patch_size:
        indices += [indices[-1]] * (temporal_patch_size - len(indices) % temporal_patch_size)
    times = [i / fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def resized_size(s: VideoSettings, num_frames: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) every frame is resized to: transformers' Qwen3-VL `smart_resize`, with its per-frame
    pixel cap when `cap_pixels_per_frame` is set."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    factor = s.patch_size * s.merge_size
    max_pixels = s.longest_edge
    if s.cap_pixels_per_frame:
        frame_cap = s.max_video_tokens * factor * factor
        max_pixels = max(min(frame_cap, s.longest_edge // num_frames), int(s.shortest_edge * 1.05)) * num_frames
    try:
        return smart_resize(num_frames, height, width, temporal_factor=s.temporal_patch_size, factor=factor,
                            min_pixels=s.shortest_edge, max_pixels=max_pixels)
    except ValueError as e:  # too few frames, or an aspect ratio over 200
        raise InvalidRequestError(f"the video cannot be processed: {e}") from None


def preprocess_frames(frames: np.ndarray, s: VideoSettings) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Sampled frames [T, H, W, 3] uint8 -> (patches [t * h * w, 3 * T_p * P * P] float32, grid
    (t, h, w) in patches): steps 2-4 of the module docstring."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # [T, C, H, W] uint8
    t, c, h, w = video.shape
    if s.do_resize:
        if s.resample != BICUBIC:
            raise ConfigError(f"video resample={s.resample} needs transformers' video processor (install torchvision); "
                              "without it only bicubic (3), Qwen3-VL's, is implemented")
        rh, rw = resized_size(s, t, h, w)
        if (rh, rw) != (h, w):
            # torchvision resizes uint8 natively on CPU with bicubic + antialias: the same call
            video = F.interpolate(video, size=[rh, rw], mode="bicubic", align_corners=False, antialias=True)
    if s.do_normalize:
        mean, std = s.image_mean, s.image_std
        if s.do_rescale:  # transformers fuses the rescale into the normalisation
            mean = torch.tensor(mean) * (1.0 / s.rescale_factor)
            std = torch.tensor(std) * (1.0 / s.rescale_factor)
        mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        video = video.to(torch.float32).sub_(mean).div_(std)
    elif s.do_rescale:
        video = video * s.rescale_factor
    else:
        video = video.to(torch.float32)
    return patchify(video, s.patch_size, s.merge_size, s.temporal_patch_size)


def patchify(video: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, C, H, W] -> ([t * h * w, C * temporal * patch^2], (t, h, w)): the frame count padded
    with the last frame, the m x m patches of one merged token consecutive."""
    if pad := -video.shape[0] % temporal:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    frames, c, height, width = video.shape
    gt, gh, gw = frames // temporal, height // patch, width // patch
    x = video.view(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


@dataclass
class VideoPixels:
    pixel_values: torch.Tensor  # [t * h * w, C * T_p * P * P] float32
    grid_thw: tuple[int, int, int]
    timestamps: list[float]  # seconds, one per temporal patch


class Qwen3VLVideoPreprocessor:
    """VideoClip -> VideoPixels with transformers' video processor when torchvision is importable
    (`backend` "transformers"), else with `preprocess_frames` ("dlengine")."""

    def __init__(self, path: str) -> None:
        from transformers.utils import is_torchvision_available

        self.path = path
        self.settings = VideoSettings.for_checkpoint(path)
        self.backend = "transformers" if is_torchvision_available() else "dlengine"
        self._reference: Any = None

    def sample(self, total_frames: int, source_fps: float | None) -> list[int]:
        """The frames to keep of a source of `total_frames` (all of them with sampling off)."""
        if not self.settings.do_sample_frames:
            return list(range(total_frames))
        return sample_frame_indices(self.settings, total_frames, source_fps)

    def __call__(self, clip: VideoClip) -> VideoPixels:
        s = self.settings
        sample = clip.frames_indices is None and s.do_sample_frames
        if clip.frames_indices is not None:  # a decoder already sampled the source
            indices = list(clip.frames_indices)
        elif sample:
            indices = self.sample(clip.total_num_frames, clip.fps)
        else:
            indices = list(range(clip.total_num_frames))
        if len(indices) < s.temporal_patch_size:
            raise InvalidRequestError(f"a video needs at least temporal_patch_size = {s.temporal_patch_size} frames "
                                      f"after sampling; this one has {len(indices)}")
        if self.backend == "transformers":
            return self._transformers(clip, sample)
        frames = clip.frames[indices] if sample else clip.frames
        pixels, grid = preprocess_frames(frames, s)
        return VideoPixels(pixels, grid, frame_timestamps(indices, clip.fps, s.temporal_patch_size))

    def _transformers(self, clip: VideoClip, sample: bool) -> VideoPixels:
        """The clip through transformers' processor, which samples it too (unless a decoder did)."""
        if self._reference is None:
            from transformers import AutoVideoProcessor

            self._reference = AutoVideoProcessor.from_pretrained(self.path, local_files_only=True)
        indices = clip.frames_indices if clip.frames_indices is not None else list(range(len(clip.frames)))
        metadata = {"total_num_frames": clip.total_num_frames, "fps": clip.fps, "frames_indices": list(indices)}
        try:
            out = self._reference(videos=[clip.frames], video_metadata=[metadata], do_sample_frames=sample,
                                  cap_pixels_per_frame=self.settings.cap_pixels_per_frame, return_metadata=True,
                                  return_tensors="pt")
        except ValueError as e:
            raise InvalidRequestError(f"the video cannot be processed: {e}") from None
        meta = out["video_metadata"][0]
        grid = tuple(int(x) for x in out["video_grid_thw"][0].tolist())
        indices = [int(i) for i in meta.frames_indices]
        return VideoPixels(out["pixel_values_videos"], grid,
                           frame_timestamps(indices, meta.fps, self.settings.temporal_patch_size))
