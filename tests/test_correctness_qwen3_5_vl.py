"""dlengine vs transformers on tiny Qwen3.5 checkpoints with a vision tower (dense
`Qwen3_5ForConditionalGeneration`, MoE `Qwen3_5MoeForConditionalGeneration`): the Gated DeltaNet
hybrid text model with M-RoPE over its partial rotary dims, and Qwen3-VL's vision tower without
deepstack. First-step log-probabilities close in float32, greedy tokens equal for text-only,
one-image and two-image prompts with chunks smaller than an image and with preemption, prefix
caching keyed by image content, and the encoder role (EPD) handing over the model's own
embeddings."""


import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.models.qwen3_5 import HybridVLTextModel
from dlengine.testing import tiny_checkpoint
from dlengine.testing.vl import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, tiny_image

from hf_reference import relative_error
from vl_reference import (CASES, MAX_NEW, SETUPS, check_first_step_logprobs, check_greedy_tokens, check_mrope_positions,
                          hf_greedy, hf_inputs, hf_vl, requests)

KINDS = ["qwen3.5-vl", "qwen3.5-moe-vl"]
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def test_mrope_positions_match_transformers():
    """Qwen3.5's get_rope_index places images as Qwen3-VL's does."""
    check_mrope_positions("qwen3.5-vl")


@pytest.mark.parametrize("kind", KINDS)
def test_first_step_logprobs_match_transformers(kind):
    """The vision weights come from the checkpoint's `model.visual.*` and the tower has no
    deepstack mergers."""
    engine = EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(block_size=16).build()
    assert isinstance(engine.model.model.language_model, HybridVLTextModel)
    assert not engine.model.model.visual.deepstack_indexes
    check_first_step_logprobs(engine, kind)


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers(kind, setup):
    check_greedy_tokens(kind, setup)


def test_prefix_cache_keys_image_blocks_by_content():
    """The same image twice: the prompt's blocks (and the DeltaNet state saved at the last full
    one) come from the cache. Another image of the same size (the same token ids): no block from
    the image on is reused, and the tokens equal those of an engine that never saw the first."""
    bs = 4
    kind = "qwen3.5-moe-vl"
    engine = EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(block_size=bs).build()
    text = "Once upon a time there was a tiny language model " + IMAGE_PLACEHOLDER + " that wanted to be exact"
    [first] = engine.generate([{"prompt": text, "images": [tiny_image()]}], GREEDY)
    image_start = first.prompt_token_ids.index(IMAGE_TOKEN_ID)
    image_end = image_start + 16
    n = len(first.prompt_token_ids)
    [same] = engine.generate([{"prompt": text, "images": [tiny_image()]}], GREEDY)
    assert same.metrics.num_cached_tokens == (n - 1) // bs * bs >= image_end // bs * bs  # past the image
    assert same.token_ids == first.token_ids
    other_image = tiny_image(seed=7)
    [other] = engine.generate([{"prompt": text, "images": [other_image]}], GREEDY)
    assert other.prompt_token_ids == first.prompt_token_ids  # the same ids: only the content differs
    assert other.metrics.num_cached_tokens <= image_start // bs * bs  # nothing of the image's blocks
    fresh = EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(block_size=bs).build()
    [expected] = fresh.generate([{"prompt": text, "images": [other_image]}], GREEDY)
    assert other.token_ids == expected.token_ids


def test_encoder_role_hands_over_the_models_embeddings():
    """The encoder role (the vision tower alone) gives the model's own image embeddings, one
    level (no deepstack), and a hybrid engine fed them gives the tokens it computes itself."""
    pytest.importorskip("dlslime")
    kind = "qwen3.5-vl"
    staging = {"staging_bytes": 1 << 20}
    encoder = (EngineBuilder(tiny_checkpoint(kind)).dtype("float32").role("encode").transfer("dlslime")
               .encoder_cache(**staging).build())
    hybrid = EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(block_size=16).encoder_cache(**staging).build()
    try:
        text, imgs = CASES[2]
        [(_, _, a), (_, _, b)] = encoder.embed(imgs)
        req = hybrid.make_request({"prompt": text, "images": imgs})
        tokens, deepstack = hybrid.model.model.encode_images(req.multimodal)
        assert deepstack == [] and a.shape[0] == 1
        assert torch.equal(torch.cat([a, b], dim=1), tokens[None])
        ec = encoder.encode(imgs)
        assert ec["num_levels"] == 1 and [im["num_tokens"] for im in ec["images"]] == [16, 15]
        rid = hybrid.add_request({"prompt": text, "images": imgs}, GREEDY, ec_transfer_params=ec)
        final = None
        while hybrid.has_unfinished_requests():
            final = next((o for o in hybrid.step() if o.request_id == rid and o.finished), final)
        assert final.token_ids == hf_greedy(kind, 2)[1]
        assert hybrid.describe()["ec_pulls"]["pulled"] == 1
    finally:
        encoder.close()
        hybrid.close()


def test_bench_roofline_leaves_the_vision_tower_out():
    """A decode step reads the text model's weights; the tower runs once per image."""
    from dlengine.bench.roofline import ModelCost

    engine = EngineBuilder(tiny_checkpoint("qwen3.5-vl")).dtype("float32").cache(block_size=16).build()
    cost = ModelCost.from_engine(engine)
    assert cost.num_params == sum(p.numel() for p in engine.model.model.language_model.parameters())
    assert cost.param_bytes == cost.num_params * 4  # tied: the LM head is the embedding table


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_engine_on_gpu_matches_transformers(kind):
    """On a CUDA device with the GPU kernels (Triton Gated DeltaNet, the attention backend, CUDA
    graphs for decode steps without images): first-step log-probabilities near the CPU oracle's
    (TF32 and kernel reduction orders allow 1e-3) and its greedy tokens, images included."""
    engine = EngineBuilder(tiny_checkpoint(kind)).device("cuda").dtype("float32").cache(block_size=16).build()
    assert engine.describe()["kernels"].get("gdn", "torch") != "torch"
    vocab = engine.config.model.vocab_size
    outs = engine.generate(requests(), SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=vocab))
    model = hf_vl(kind)[0]
    for i, out in enumerate(outs):
        inputs = hf_inputs(kind, *CASES[i])
        with torch.no_grad():
            ref = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
        ours = torch.tensor([out.logprobs[0][t] for t in range(vocab)])
        assert relative_error(ours, ref) < 1e-3, f"case {i}"
        assert out.token_ids == hf_greedy(kind, i)[1], f"case {i} diverged"
