"""Turning what a caller passes as a video into RGB frames and what is known of their timing,
with errors that name the problem.

A video is one of:
- a list of frames, each anything `load_image` reads (PIL image, numpy array, encoded bytes, a
  file path), all of one size;
- a numpy array [T, H, W, C] (C = 1, 3 or 4; uint8, or floats in [0, 1]);
- a dict {"frames": <one of the above>, "fps": <frames per second of the source>}: the fps drives
  frame sampling and the timestamps written into the prompt; without it transformers' Qwen3-VL
  processor assumes 24;
- a video file (a path, or its encoded bytes), decoded only when a decoder that transformers'
  `load_video` drives is importable (PyAV, decord, OpenCV or torchcodec); dlengine depends on
  none of them. The decoder reads only the frames the processor samples.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from dlengine.multimodal.images import load_image
from dlengine.sampling_params import InvalidRequestError

# transformers' `load_video` backends, in the order tried, and the module each needs
VIDEO_DECODERS = (("pyav", "av"), ("decord", "decord"), ("opencv", "cv2"), ("torchcodec", "torchcodec"))


@dataclass
class VideoClip:
    """Frames of one video as the processor receives them."""

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    fps: float | None  # frames per second of the source; None: unknown
    total_num_frames: int  # frames in the source
    # indices in the source of `frames` when a decoder already sampled them; None: every frame
    frames_indices: list[int] | None = None


def video_decoder() -> str | None:
    """The first transformers video backend whose module is importable, or None."""
    import importlib.util

    for backend, module in VIDEO_DECODERS:
        if importlib.util.find_spec(module) is not None:
            return backend
    return None


def _frames_array(frames: Any, where: str) -> np.ndarray:
    """[T, H, W, 3] uint8 RGB from a list of frames or a [T, H, W, C] array."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[3] not in (1, 3, 4):
            raise InvalidRequestError(f"{where}: a numpy video must be [T, H, W, C] with C = 1, 3 or 4, "
                                      f"got shape {frames.shape}")
        if frames.dtype == np.uint8 and frames.shape[3] == 3:
            out = np.ascontiguousarray(frames)
        else:
            out = np.stack([np.asarray(load_image(f, f"{where} frame {i}")) for i, f in enumerate(frames)])
    elif isinstance(frames, (list, tuple)):
        out = [np.asarray(load_image(f, f"{where} frame {i}")) for i, f in enumerate(frames)]
        sizes = {f.shape[:2] for f in out}
        if len(sizes) > 1:
            raise InvalidRequestError(f"{where}: all frames of a video must have one size; got (height, width) "
                                      f"{sorted(sizes)}")
        out = np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)
    else:
        hint = ""
        if isinstance(frames, np.ndarray) or type(frames).__module__.startswith("PIL"):
            hint = " (a list of frames is one video: pass videos=[frames])"
        raise InvalidRequestError(f"{where}: a video is a list of frames, a [T, H, W, C] numpy array, a dict "
                                  f"{{'frames': ..., 'fps': ...}}, or a video file; not {type(frames).__name__}{hint}")
    if out.shape[0] == 0:
        raise InvalidRequestError(f"{where}: the video has no frames")
    if out.shape[1] < 1 or out.shape[2] < 1:
        raise InvalidRequestError(f"{where}: the frames are empty ({out.shape[2]} x {out.shape[1]})")
    return out


def _decode_file(video: str | bytes, where: str, sample: Callable[[int, float | None], list[int]]) -> VideoClip:
    """Decode a video file (path or encoded bytes) with transformers' `load_video`, reading only
    the frames `sample(total_frames, fps)` picks."""
    backend = video_decoder()
    if backend is None:
        raise InvalidRequestError(f"{where}: decoding a video file needs a video decoder (PyAV, decord, OpenCV or "
                                  "torchcodec), and none is installed; pass the video as a list of frames or a "
                                  "[T, H, W, C] numpy array")
    from transformers.video_utils import load_video as transformers_load_video

    if isinstance(video, (bytes, bytearray)):
        with tempfile.NamedTemporaryFile(suffix=".video") as f:
            f.write(video)
            f.flush()
            return _decode_file(f.name, where, sample)
    if not os.path.isfile(video):
        raise InvalidRequestError(f"{where}: no video file at {os.fspath(video)!r}")

    def sample_indices_fn(metadata, **_):
        return np.asarray(sample(int(metadata.total_num_frames), metadata.fps), dtype=int)

    try:
        frames, metadata = transformers_load_video(os.fspath(video), backend=backend,
                                                   sample_indices_fn=sample_indices_fn)
    except Exception as e:  # the decoders raise their own types for unreadable files
        raise InvalidRequestError(f"{where}: cannot decode the video with {backend}: {e}") from None
    frames = _frames_array(np.asarray(frames), where)
    return VideoClip(frames, metadata.fps, int(metadata.total_num_frames), [int(i) for i in metadata.frames_indices])


def load_video(video: Any, where: str, sample: Callable[[int, float | None], list[int]]) -> VideoClip:
    """A VideoClip from any of the forms in the module docstring. `sample(total_frames, fps)` picks
    the frames a decoder reads from a file (the processor samples the other forms itself)."""
    fps = None
    if isinstance(video, dict):
        unknown = set(video) - {"frames", "fps"}
        if "frames" not in video or unknown:
            raise InvalidRequestError(f"{where}: a video dict has the keys 'frames' and 'fps'; got {sorted(video)}")
        fps = video.get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise InvalidRequestError(f"{where}: fps must be a positive number, got {fps!r}")
        fps = None if fps is None else float(fps)
        video = video["frames"]
    if isinstance(video, (str, os.PathLike, bytes, bytearray)):
        clip = _decode_file(video if isinstance(video, (bytes, bytearray)) else os.fspath(video), where, sample)
        if fps is not None:
            raise InvalidRequestError(f"{where}: a video file carries its own fps; give 'fps' only with frames")
        return clip
    frames = _frames_array(video, where)
    return VideoClip(frames, fps, int(frames.shape[0]))
