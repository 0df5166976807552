"""dlengine vs transformers on tiny Qwen3-VL checkpoints (dense and MoE) with image inputs:
first-step log-probabilities close in float32, greedy tokens equal for text-only, one-image and
two-image prompts under every scheduling regime (chunks smaller than an image, preemption, async
scheduling), and prefix caching keyed by image content."""


import numpy as np
import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.sampling_params import InvalidRequestError
from dlengine.testing import tiny_checkpoint
from dlengine.testing.vl import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, tiny_image

from vl_reference import (CASES, MAX_NEW, SETUPS, check_first_step_logprobs, check_greedy_tokens, check_mrope_positions,
                          hf_greedy, requests)

KINDS = ["qwen3-vl", "qwen3-vl-moe"]


def test_mrope_positions_match_transformers():
    check_mrope_positions("qwen3-vl")


@pytest.mark.parametrize("kind", KINDS)
def test_first_step_logprobs_match_transformers(kind):
    check_first_step_logprobs(EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(block_size=16).build(), kind)


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers(kind, setup):
    check_greedy_tokens(kind, setup)


def test_add_request_and_step_with_images():
    engine = EngineBuilder(tiny_checkpoint("qwen3-vl")).dtype("float32").cache(block_size=16).build()
    rid = engine.add_request(requests()[1], SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == rid:
                final = out
    assert final.token_ids == hf_greedy("qwen3-vl", 1)[1]


def test_images_as_arrays_and_paths(tmp_path):
    """A numpy array and a PNG file of the same pixels give the PIL image's tokens."""
    image = tiny_image()
    file = tmp_path / "image.png"
    image.save(file)
    engine = EngineBuilder(tiny_checkpoint("qwen3-vl")).dtype("float32").cache(block_size=16).build()
    text = CASES[1][0]
    outs = engine.generate([{"prompt": text, "images": [np.asarray(image)]}, {"prompt": text, "images": [str(file)]}],
                           SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    for out in outs:
        assert out.token_ids == hf_greedy("qwen3-vl", 1)[1]


def test_prefix_cache_keys_image_blocks_by_content():
    """The same image twice: its blocks come from the cache. Another image of the same size (the
    same token ids): only the blocks before the image do, and the tokens are still exact."""
    bs = 4
    engine = EngineBuilder(tiny_checkpoint("qwen3-vl")).dtype("float32").cache(block_size=bs).build()
    text = "Once upon a time there was a tiny language model " + IMAGE_PLACEHOLDER + " that wanted to be exact"
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    [first] = engine.generate([{"prompt": text, "images": [tiny_image()]}], params)
    image_start = first.prompt_token_ids.index(IMAGE_TOKEN_ID)
    image_end = image_start + 16
    [same] = engine.generate([{"prompt": text, "images": [tiny_image()]}], params)
    assert same.metrics.num_cached_tokens >= image_end // bs * bs  # every full block of the image hit
    assert same.token_ids == first.token_ids
    other_image = tiny_image(seed=7)
    [other] = engine.generate([{"prompt": text, "images": [other_image]}], params)
    assert other.prompt_token_ids == first.prompt_token_ids  # the same ids: only the content differs
    assert other.metrics.num_cached_tokens == image_start // bs * bs  # the text before the image only
    # exact against an engine that never saw the first image
    fresh = EngineBuilder(tiny_checkpoint("qwen3-vl")).dtype("float32").cache(block_size=bs).build()
    [expected] = fresh.generate([{"prompt": text, "images": [other_image]}], params)
    assert other.token_ids == expected.token_ids


def test_bad_image_requests_are_refused():
    engine = EngineBuilder(tiny_checkpoint("qwen3-vl")).dtype("float32").cache(block_size=16).build()
    with pytest.raises(InvalidRequestError, match="1 image placeholders .* but 2 images"):
        engine.generate([{"prompt": "a " + IMAGE_PLACEHOLDER, "images": [tiny_image(), tiny_image()]}])
    with pytest.raises(InvalidRequestError, match="0 image placeholders"):
        engine.generate([{"prompt": "no placeholder", "images": [tiny_image()]}])
    with pytest.raises(InvalidRequestError, match="an image is a PIL image"):
        engine.generate([{"prompt": IMAGE_PLACEHOLDER, "images": [42]}])
    with pytest.raises(InvalidRequestError, match="no image file"):
        engine.generate([{"prompt": IMAGE_PLACEHOLDER, "images": ["/nonexistent.png"]}])
    with pytest.raises(InvalidRequestError, match="keys 'prompt' and 'images'"):
        engine.generate([{"text": "hello"}])
    text_only = EngineBuilder("tiny-qwen3").dtype("float32").cache(block_size=16).build()
    with pytest.raises(InvalidRequestError, match="takes no images"):
        text_only.generate([{"prompt": "hello", "images": [tiny_image()]}])


def test_mrope_tables_through_the_triton_rope_kernel():
    """The per-token M-RoPE tables drive the fused norm + rope + KV-write kernel (the GPU path)
    exactly as the torch reference rotates with them (interpreter on CPU)."""
    pytest.importorskip("triton")
    from dlengine.config import RopeConfig
    from dlengine.kernels.norm_rope import norm_rope_torch, norm_rope_triton
    from dlengine.models.layers.mrope import MRotaryEmbedding

    rotary = MRotaryEmbedding(16, 64, RopeConfig(), [4, 2, 2])
    positions = torch.tensor([[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]])
    step = rotary.step(positions)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(7, 4, 16, generator=gen), torch.randn(7, 2, 16, generator=gen)
    want_q, want_k = norm_rope_torch.rope(q.clone(), k.clone(), step.positions, step.cos_cached, step.sin_cached)
    got_q, got_k = norm_rope_triton.rope(q.clone(), k.clone(), step.positions, step.cos_cached, step.sin_cached)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    # a text token (equal positions on all axes) is rotated as plain RoPE at that position
    text = rotary.step(torch.tensor([4]))
    torch.testing.assert_close(text.cos_cached[0], step.cos_cached[6])
