"""Video inputs for Qwen3-VL (dense and MoE) against transformers on the tiny checkpoints: the
prompt with its per-frame timestamps and video tokens, M-RoPE positions equal to
`get_rope_index`, first-step log-probabilities close in float32, greedy tokens equal for a video
prompt and a video + image prompt (also with chunks of 8 tokens, a temporal patch split over
steps; and for Qwen3.5 with a vision tower), prefix caching keyed by video content, and bad video
input refused by name.

The oracle's prompt restates transformers' Qwen3VLProcessor format ("<%.1f seconds>" then the
vision block, per temporal patch); its pixels come from transformers' video processor when
torchvision is importable, else from dlengine's port of it, which
`test_preprocessing_matches_transformers_processor` checks (wherever torchvision is) equal to
transformers' whole processor: prompt ids, pixels and grid."""

import functools

import numpy as np
import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.multimodal.video_processing import VideoSettings, preprocess_frames, sample_frame_indices
from dlengine.sampling_params import InvalidRequestError
from dlengine.testing import tiny_checkpoint
from dlengine.testing.vl import (IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, VIDEO_PLACEHOLDER, VIDEO_TOKEN_ID, tiny_image,
                                 tiny_video)

from vl_reference import assert_first_step_logprobs

KINDS = ["qwen3-vl", "qwen3-vl-moe"]
MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
# (text, images, videos): 4 frames of 32 x 32 are 2 temporal patches of 16 tokens; 6 frames of
# 40 x 24 at 1 fps are 3 of 15 (a 5 x 3 merged grid)
CASES = [
    ("<|im_start|>user\n" + VIDEO_PLACEHOLDER + "What happens in it?<|im_end|>\n<|im_start|>assistant\n",
     [], [tiny_video()]),
    ("Compare " + IMAGE_PLACEHOLDER + " with\n" + VIDEO_PLACEHOLDER + " please", [tiny_image(seed=3)],
     [{"frames": tiny_video(6, 40, 24, seed=1), "fps": 1.0}]),
]


def video_frames(video):
    """(frames [T, H, W, 3] uint8, fps or None) of a test video."""
    if isinstance(video, dict):
        return np.stack([np.asarray(f) for f in video["frames"]]), video["fps"]
    return np.stack([np.asarray(f) for f in video]), None


def reference_timestamps(indices, fps):
    """transformers' Qwen3VLProcessor rule: per 2 frames, the mean of their times (fps 24 if unknown)."""
    fps = fps or 24
    idx = list(indices) + list(indices[-1:]) * (len(indices) % 2)
    return [(idx[i] / fps + idx[i + 1] / fps) / 2 for i in range(0, len(idx), 2)]


@functools.lru_cache(maxsize=4)
def hf_vl(kind: str):
    import transformers as tf

    path = tiny_checkpoint(kind)
    cls = {"qwen3-vl": tf.Qwen3VLForConditionalGeneration, "qwen3-vl-moe": tf.Qwen3VLMoeForConditionalGeneration,
           "qwen3.5-vl": tf.Qwen3_5ForConditionalGeneration}[kind]
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return model, tf.AutoImageProcessor.from_pretrained(path), tf.AutoTokenizer.from_pretrained(path)


def reference_video(kind: str, video) -> tuple[torch.Tensor, tuple, list[float]]:
    """(pixel_values_videos, grid, timestamps) of one video."""
    frames, fps = video_frames(video)
    settings = VideoSettings.for_checkpoint(tiny_checkpoint(kind))
    indices = sample_frame_indices(settings, len(frames), fps)
    pixels, grid = preprocess_frames(frames[indices], settings)
    return pixels, grid, reference_timestamps(indices, fps)


def hf_inputs(kind: str, text: str, images: list, videos: list) -> dict:
    """transformers' model inputs: the video placeholders replaced as its processor does, image
    pads expanded to their token counts."""
    _, image_processor, tokenizer = hf_vl(kind)
    kwargs, pixels, grids = {}, [], []
    for video in videos:
        px, grid, times = reference_video(kind, video)
        pixels.append(px)
        grids.append(grid)
        per_frame = grid[1] * grid[2] // 4
        frames = "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>"
                         for t in times)
        text = text.replace(VIDEO_PLACEHOLDER, frames, 1)
    if videos:
        kwargs.update(pixel_values_videos=torch.cat(pixels), video_grid_thw=torch.tensor(grids))
    ids = tokenizer.encode(text)
    if images:
        kwargs.update(image_processor(images=images, return_tensors="pt"))
        counts = iter((kwargs["image_grid_thw"].prod(-1) // 4).tolist())
        ids = [t for tok in ids for t in ([tok] * next(counts) if tok == IMAGE_TOKEN_ID else [tok])]
    input_ids = torch.tensor([ids])
    types = (input_ids == IMAGE_TOKEN_ID).int() + 2 * (input_ids == VIDEO_TOKEN_ID).int()
    return dict(kwargs, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=types)


@functools.lru_cache(maxsize=None)
def hf_greedy(kind: str, case: int) -> tuple[list[int], list[int]]:
    inputs = hf_inputs(kind, *CASES[case])
    with torch.no_grad():
        out = hf_vl(kind)[0].generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


def requests(cases=CASES) -> list[dict]:
    return [{"prompt": text, "images": images, "videos": videos} for text, images, videos in cases]


@functools.lru_cache(maxsize=8)
def engine(kind: str = "qwen3-vl", block_size: int = 16, chunk: int | None = None):
    b = EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(block_size=block_size)
    if chunk is not None:
        b.scheduler(max_num_batched_tokens=chunk)
    return b.build()


def test_prompt_and_mrope_positions_match_transformers():
    """The expanded prompt (timestamps, one vision block per temporal patch) and its M-RoPE
    positions equal transformers' for a video + image prompt."""
    model = hf_vl("qwen3-vl")[0]
    inputs = hf_inputs("qwen3-vl", *CASES[1])
    request = engine().make_request(requests()[1])
    assert request.prompt_token_ids == inputs["input_ids"][0].tolist()
    ref, ref_delta = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                image_grid_thw=inputs["image_grid_thw"],
                                                video_grid_thw=inputs["video_grid_thw"])
    mm = request.multimodal
    np.testing.assert_array_equal(mm.mrope_positions, ref[:, 0].numpy())
    assert mm.mrope_delta == int(ref_delta)
    [video] = mm.videos
    assert video.grid_thw == (3, 6, 10) and video.tokens_per_frame == 15
    assert [f"{t:.1f}" for t in video.timestamps] == ["0.5", "2.5", "4.5"]  # 6 frames at 1 fps, 2 a patch


@pytest.mark.parametrize("kind", KINDS)
def test_first_step_logprobs_match_transformers(kind):
    """Every vocabulary entry's log-probability after the prompt, float32."""
    assert_first_step_logprobs(engine(kind), hf_vl(kind)[0], requests(), [hf_inputs(kind, *case) for case in CASES])


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers(kind, chunk):
    """Whole prompts, and chunks of 8 tokens (each temporal patch's 15-16 tokens split over steps
    that also decode the other request)."""
    e = engine(kind, chunk=chunk)
    outs = e.generate(requests(), GREEDY)
    for i, out in enumerate(outs):
        prompt, expected = hf_greedy(kind, i)
        assert out.prompt_token_ids == prompt
        assert out.token_ids == expected, f"case {i} diverged"
    if chunk:
        assert max(s.num_tokens for s in e.stats.steps) <= chunk
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
    e.block_manager.check_invariants()


@pytest.mark.parametrize("kind", ["qwen3.5-vl"])
def test_qwen3_5_greedy_tokens_match_transformers(kind):
    """Qwen3.5 shares the processor, the tower and the M-RoPE rule: the hybrid text model with
    the video + image prompt, in chunks of 8 (one case: the reference's DeltaNet is slow on CPU)."""
    [out] = engine(kind, chunk=8).generate(requests()[1:], GREEDY)
    prompt, expected = hf_greedy(kind, 1)
    assert out.prompt_token_ids == prompt
    assert out.token_ids == expected


def test_video_forms_give_the_same_tokens():
    """A [T, H, W, C] array is the list of frames; a token-id prompt gives the text prompt's ids
    (the placeholder follows a newline); fps moves the timestamps and the sampling."""
    e = engine()
    text, _, [frames] = CASES[0]
    ref_prompt, ref_tokens = hf_greedy("qwen3-vl", 0)
    as_array = np.stack([np.asarray(f) for f in frames])
    ids = e.tokenizer.encode(text)
    outs = e.generate([{"prompt": text, "videos": [as_array]}, {"prompt": ids, "videos": [frames]}], GREEDY)
    for out in outs:
        assert out.prompt_token_ids == ref_prompt and out.token_ids == ref_tokens
    # 8 frames at 2 fps: 2 fps sampling keeps all 8, timestamps 0.25, 1.25, 2.25, 3.25
    request = e.make_request({"prompt": text, "videos": [{"frames": tiny_video(8), "fps": 2}]})
    assert [f"{t:.2f}" for t in request.multimodal.videos[0].timestamps] == ["0.25", "1.25", "2.25", "3.25"]
    assert "<3.2 seconds>" in e.tokenizer.decode(request.prompt_token_ids)
    # 40 frames at the assumed 24 fps: 2 fps keeps int(40 / 24 * 2) = 3 -> min_frames 4
    request = e.make_request({"prompt": text, "videos": [tiny_video(40, 8, 8)]})
    assert request.multimodal.videos[0].grid_thw[0] == 2


def test_prefix_cache_keys_video_blocks_by_content():
    """The same video twice: its blocks come from the cache. Another video of the same size (the
    same token ids): only the blocks before the video do, and the tokens are still exact."""
    bs = 4
    e = engine(block_size=bs)
    text = "Once upon a time there was a tiny language model " + VIDEO_PLACEHOLDER + " that wanted to be exact"
    [first] = e.generate([{"prompt": text, "videos": [tiny_video()]}], GREEDY)
    video_start = first.prompt_token_ids.index(VIDEO_TOKEN_ID)
    video_end = len(first.prompt_token_ids) - first.prompt_token_ids[::-1].index(VIDEO_TOKEN_ID)
    [same] = e.generate([{"prompt": text, "videos": [tiny_video()]}], GREEDY)
    assert same.metrics.num_cached_tokens >= video_end // bs * bs  # every full block of the video hit
    assert same.token_ids == first.token_ids
    other_video = tiny_video(seed=7)
    [other] = e.generate([{"prompt": text, "videos": [other_video]}], GREEDY)
    assert other.prompt_token_ids == first.prompt_token_ids  # the same ids: only the content differs
    # the text before the video, and the first timestamp's text and vision start before its pads
    first_block_with_pads = video_start // bs
    assert other.metrics.num_cached_tokens == first_block_with_pads * bs
    fresh = EngineBuilder(tiny_checkpoint("qwen3-vl")).dtype("float32").cache(block_size=bs).build()
    [expected] = fresh.generate([{"prompt": text, "videos": [other_video]}], GREEDY)
    assert other.token_ids == expected.token_ids


def test_bad_video_requests_are_refused(tmp_path):
    e = engine()
    frames = tiny_video()
    cases = [
        ({"prompt": "a " + VIDEO_PLACEHOLDER, "videos": [frames, frames]}, "1 video placeholders .* but 2 videos"),
        ({"prompt": "no placeholder", "videos": [frames]}, "0 video placeholders"),
        ({"prompt": [4, 7, 5, 7], "videos": [frames]}, "2 video placeholders .* but 1 videos"),
        ({"prompt": VIDEO_PLACEHOLDER, "videos": [frames[:1]]}, "at least temporal_patch_size = 2 frames"),
        ({"prompt": VIDEO_PLACEHOLDER, "videos": [[tiny_image(), tiny_image(40, 24)]]}, "all frames of a video"),
        ({"prompt": VIDEO_PLACEHOLDER, "videos": [42]}, "a video is a list of frames"),
        ({"prompt": VIDEO_PLACEHOLDER, "videos": frames}, r"pass videos=\[frames\]"),
        ({"prompt": VIDEO_PLACEHOLDER, "videos": [[]]}, "the video has no frames"),
        ({"prompt": VIDEO_PLACEHOLDER, "videos": [np.zeros((4, 8, 8), np.uint8)]}, r"\[T, H, W, C\]"),
        ({"prompt": VIDEO_PLACEHOLDER, "videos": [{"frames": frames, "fps": -1}]}, "fps must be a positive"),
        ({"prompt": VIDEO_PLACEHOLDER, "videos": [{"frames": frames, "rate": 2}]}, "'frames' and 'fps'"),
        ({"prompt": VIDEO_PLACEHOLDER, "videos": [str(tmp_path / "missing.mp4")]}, "video 0"),
        ({"prompt": VIDEO_PLACEHOLDER, "videos": "clip.mp4"}, "'videos' is a list of videos"),
    ]
    for prompt, match in cases:
        with pytest.raises(InvalidRequestError, match=match):
            e.generate([prompt])
    from dlengine.multimodal.videos import video_decoder

    if video_decoder() is None:
        with pytest.raises(InvalidRequestError, match="needs a video decoder"):
            e.generate([{"prompt": VIDEO_PLACEHOLDER, "videos": [b"\x00\x00\x00\x18ftypmp42"]}])
    text_only = EngineBuilder("tiny-qwen3").dtype("float32").cache(block_size=16).build()
    with pytest.raises(InvalidRequestError, match="takes no videos"):
        text_only.generate([{"prompt": "hello", "videos": [frames]}])
    # encode-prefill-decode params for a request with videos are checked before any pull
    # (tests/test_epd_video.py pulls videos' embeddings)
    with pytest.raises(InvalidRequestError, match="ec_transfer_params is missing"):
        e.add_request(requests()[0], GREEDY, ec_transfer_params={"engine_id": "unused"})
    assert not e.has_unfinished_requests()


def test_preprocessing_matches_transformers_processor():
    """transformers' Qwen3VLProcessor (text, image and video together) gives our prompt ids,
    pixels and grid. Needs torchvision, which transformers' video processor imports."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    path = tiny_checkpoint("qwen3-vl")
    text, images, [video] = CASES[1]
    frames, fps = video_frames(video)
    processor = AutoProcessor.from_pretrained(path)
    ref = processor(text=[text], images=images, videos=[frames], video_metadata=[{"total_num_frames": len(frames),
                    "fps": fps, "frames_indices": list(range(len(frames)))}], return_tensors="pt")
    request = engine().make_request(requests()[1])
    assert request.prompt_token_ids == ref["input_ids"][0].tolist()
    [ours] = request.multimodal.videos
    assert ours.grid_thw == tuple(ref["video_grid_thw"][0].tolist())
    assert torch.equal(ours.pixel_values, ref["pixel_values_videos"])
    settings = VideoSettings.for_checkpoint(path)
    port, _ = preprocess_frames(frames[sample_frame_indices(settings, len(frames), fps)], settings)
    assert torch.equal(port, ref["pixel_values_videos"])
