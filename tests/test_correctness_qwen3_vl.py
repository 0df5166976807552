"""dlengine vs transformers on tiny Qwen3-VL checkpoints (dense and MoE) with image inputs:
first-step log-probabilities close in float32, greedy tokens equal for text-only, one-image and
two-image prompts under every scheduling regime (chunks smaller than an image, preemption, async
scheduling), and prefix caching keyed by image content."""


import numpy as np
import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.multimodal.processor import mrope_positions
from dlengine.sampling_params import InvalidRequestError
from dlengine.testing import tiny_checkpoint
from dlengine.testing.vl import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, tiny_image

from hf_reference import relative_error
from vl_reference import CASES, MAX_NEW, hf_greedy, hf_inputs, hf_vl

KINDS = ["qwen3-vl", "qwen3-vl-moe"]


def requests(cases=CASES) -> list[dict]:
    return [{"prompt": text, "images": images} for text, images in cases]


def test_mrope_positions_match_transformers():
    """The front's M-RoPE positions equal transformers' get_rope_index for a two-image prompt."""
    model = hf_vl("qwen3-vl")[0]
    inputs = hf_inputs("qwen3-vl", *CASES[2])
    ref, ref_delta = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                image_grid_thw=inputs["image_grid_thw"])
    ids = inputs["input_ids"][0].tolist()
    starts = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_ID and (i == 0 or ids[i - 1] != IMAGE_TOKEN_ID)]
    ours, delta = mrope_positions(ids, list(zip(starts, map(tuple, inputs["image_grid_thw"].tolist()))), 2)
    np.testing.assert_array_equal(ours, ref[:, 0].numpy())
    assert delta == int(ref_delta)


@pytest.mark.parametrize("kind", KINDS)
def test_first_step_logprobs_match_transformers(kind):
    """Every vocabulary entry's log-probability after the prompt, float32."""
    engine = EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(block_size=16).build()
    vocab = engine.config.model.vocab_size
    outs = engine.generate(requests(), SamplingParams(max_tokens=1, temperature=0.0, logprobs=vocab))
    model = hf_vl(kind)[0]
    for i, out in enumerate(outs):
        inputs = hf_inputs(kind, *CASES[i])
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        with torch.no_grad():
            ref = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
        ours = torch.tensor([out.logprobs[0][t] for t in range(vocab)])
        assert relative_error(ours, ref) < 1e-4, f"case {i}"


SETUPS = {
    "default": dict(cache=dict(block_size=16)),
    # an image's 16 tokens split over several steps, sharing them with other requests' decodes
    "chunked-8": dict(cache=dict(block_size=16), scheduler=dict(max_num_batched_tokens=8)),
    "preemption": dict(cache=dict(block_size=16, num_blocks=6), scheduler=dict(max_model_len=96)),
    "async-chunked-8": dict(cache=dict(block_size=16), scheduler=dict(max_num_batched_tokens=8),
                            async_scheduling=True),
}


def build(kind: str, setup: dict):
    b = EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(**setup["cache"])
    if "scheduler" in setup:
        b.scheduler(**setup["scheduler"])
    if "async_scheduling" in setup:
        b.async_scheduling(setup["async_scheduling"])
    return b.build()


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers(kind, setup):
    engine = build(kind, SETUPS[setup])
    outs = engine.generate(requests(), SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    for i, out in enumerate(outs):
        prompt, expected = hf_greedy(kind, i)
        assert out.prompt_token_ids == prompt
        assert out.token_ids == expected, f"case {i} diverged"
    if setup == "preemption":
        assert engine.stats.num_preemptions > 0
    if "chunked" in setup:
        assert max(s.num_tokens for s in engine.stats.steps) <= 8
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.check_invariants()


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
