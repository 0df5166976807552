"""Where a video's tokens go in a prompt, as transformers' Qwen3VLProcessor writes them.

The prompt holds one video placeholder per video: `<|vision_start|><|video_pad|><|vision_end|>`
(what Qwen's chat template writes for a video part) or a bare `<|video_pad|>`. The processor
collapses the wrapper to the bare pad, then replaces the i-th pad by, for each temporal patch of
the i-th video,

    "<{timestamp:.1f} seconds>" <|vision_start|> <|video_pad|> x tokens_per_frame <|vision_end|>

so every temporal patch is its own vision block, labelled with its time in the source video.

A text prompt is expanded as text and then tokenised whole, exactly as transformers does. A
token-id prompt is expanded token by token, each timestamp tokenised on its own (as vLLM does);
that equals the text form unless the text just before a video would merge with the timestamp's
"<" (a prompt ending in a space before the placeholder can).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dlengine.sampling_params import InvalidRequestError


@dataclass
class ProcessedVideo:
    """A video as the processor made it, before its place in the prompt is known."""

    pixel_values: torch.Tensor  # [t * h * w, C * T_p * P * P] float32
    grid_thw: tuple[int, int, int]  # temporal patches, rows, columns (in patches)
    content_hash: bytes
    tokens_per_frame: int  # tokens of one temporal patch: h * w / merge_size ** 2
    timestamps: list[float]  # seconds, one per temporal patch


def timestamp_text(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


class VideoPlaceholders:
    """Expands video placeholders in text or token ids (see the module docstring)."""

    def __init__(self, video_token: str, video_token_id: int, start_token: str, start_token_id: int,
                 end_token: str, end_token_id: int) -> None:
        self.video_token, self.video_token_id = video_token, video_token_id
        self.start_token, self.start_token_id = start_token, start_token_id
        self.end_token, self.end_token_id = end_token, end_token_id

    def _count_error(self, found: int, given: int) -> InvalidRequestError:
        return InvalidRequestError(
            f"the prompt has {found} video placeholders ({self.video_token}, id {self.video_token_id}) but {given} "
            f"videos were given; put {self.start_token}{self.video_token}{self.end_token} where each video goes")

    def expand_text(self, text: str, videos: Sequence[ProcessedVideo]) -> str:
        """The text with each video placeholder replaced by its videos's frames."""
        if not videos and self.video_token not in text:
            return text
        wrapper = self.start_token + self.video_token + self.end_token
        parts = text.replace(wrapper, self.video_token).split(self.video_token)
        if len(parts) - 1 != len(videos):
            raise self._count_error(len(parts) - 1, len(videos))
        out = [parts[0]]
        for video, after in zip(videos, parts[1:]):
            pads = self.video_token * video.tokens_per_frame
            out.extend(timestamp_text(t) + self.start_token + pads + self.end_token for t in video.timestamps)
            out.append(after)
        return "".join(out)

    def expand_token_ids(self, ids: Sequence[int], videos: Sequence[ProcessedVideo],
                         tokenize: Callable[[str], list[int]] | None) -> list[int]:
        """The token ids with each video placeholder replaced by its video's frames;
        `tokenize(text)` gives a timestamp's ids (no special tokens added)."""
        if not videos and self.video_token_id not in ids:
            return list(ids)
        wrapper = [self.start_token_id, self.video_token_id, self.end_token_id]
        out: list[int] = []
        places: list[int] = []  # index in `out` where each placeholder's expansion goes
        i = 0
        while i < len(ids):
            if list(ids[i : i + 3]) == wrapper or ids[i] == self.video_token_id:
                places.append(len(out))
                i += 3 if ids[i] != self.video_token_id else 1
            else:
                out.append(ids[i])
                i += 1
        if len(places) != len(videos):
            raise self._count_error(len(places), len(videos))
        if tokenize is None:
            raise InvalidRequestError("a token-id prompt with videos needs the checkpoint's tokenizer (for the frame "
                                      "timestamps); this checkpoint has none")
        for place, video in reversed(list(zip(places, videos))):
            frames: list[int] = []
            for t in video.timestamps:
                frames += tokenize(timestamp_text(t))
                frames += [self.start_token_id] + [self.video_token_id] * video.tokens_per_frame + [self.end_token_id]
            out[place:place] = frames
        return out

    def frame_offsets(self, ids: Sequence[int], videos: Sequence[ProcessedVideo]) -> list[list[int]]:
        """Per video, the prompt index where each temporal patch's tokens start, read from the
        runs of video pads of an expanded prompt."""
        runs: list[tuple[int, int]] = []
        i = 0
        while i < len(ids):
            if ids[i] == self.video_token_id:
                j = i
                while j < len(ids) and ids[j] == self.video_token_id:
                    j += 1
                runs.append((i, j - i))
                i = j
            else:
                i += 1
        expected = [(v.tokens_per_frame, len(v.timestamps)) for v in videos]
        want = [n for n, frames in expected for _ in range(frames)]
        if [n for _, n in runs] != want:
            raise InvalidRequestError(f"the prompt's video tokens ({len(runs)} runs of {self.video_token}) do not "
                                      f"match the videos' frames ({len(want)} runs); put one placeholder "
                                      f"{self.start_token}{self.video_token}{self.end_token} where each video goes")
        offsets, k = [], 0
        for n, frames in expected:
            offsets.append([start for start, _ in runs[k : k + frames]])
            k += frames
        return offsets
