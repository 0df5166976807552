"""GPU checks of the whole engine (need a CUDA device, e.g. an H100; skipped on CPU).

bf16 greedy tokens of the tiny Qwen3 equal the CPU float32 reference, or first differ where the
float32 logits have a near tie (the gap between the reference token and the GPU's choice is
within bf16 noise), with every attention backend and with/without CUDA graphs.
"""

import pytest

from dlengine import EngineBuilder, SamplingParams

from conftest import make_prompts

pytestmark = pytest.mark.gpu
PROMPTS = make_prompts()
MAX_NEW = 32
TIE_GAP = 0.1  # logits of the tiny model are O(5); bf16 rounding moves them by ~1e-2


@pytest.fixture(scope="module")
def cpu_reference():
    engine = EngineBuilder("tiny-qwen3").device("cpu").dtype("float32").build()
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    return engine, [o.token_ids for o in outs]


def check_against_reference(ref_engine, prompts, outs, ref_tokens, tie_gap: float = TIE_GAP) -> int:
    """Number of exact matches; asserts that every mismatch starts at a float32 near tie (the
    reference engine's logits of the two candidates differ by less than tie_gap)."""
    exact = 0
    for prompt, out, ref in zip(prompts, outs, ref_tokens):
        got = out.token_ids
        if got == ref:
            exact += 1
            continue
        j = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
        logits = ref_engine.prompt_logits(prompt + ref[:j])[-1]
        gap = (logits[ref[j]] - logits[got[j]]).item()
        assert gap < tie_gap, f"diverged at token {j} with a float32 logit gap of {gap:.4f} (not a tie)"
    return exact


@pytest.mark.parametrize("attention, graphs", [("triton", True), ("triton", False), ("torch", False)])
def test_bf16_greedy_matches_cpu_fp32(cpu_reference, attention, graphs):
    ref_engine, ref_tokens = cpu_reference
    engine = (EngineBuilder("tiny-qwen3").device("cuda").dtype("bfloat16").attention(attention)
              .cuda_graphs(graphs).scheduler(max_num_batched_tokens=128).build())
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    assert check_against_reference(ref_engine, PROMPTS, outs, ref_tokens) >= len(PROMPTS) // 2
    if graphs:
        assert engine.runner.num_graph_steps > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_image_requests_replay_decode_graphs():
    """Decode steps of requests with images replay CUDA graphs (their text rows' M-RoPE positions
    shifted into the 1-D positions: engine/graph_layout.py) and give the eager engine's tokens
    (float32: the same kernels, so the tokens are exact)."""
    from dlengine.testing import tiny_checkpoint
    from vl_reference import requests

    prompts = requests()  # text only, one image, two images
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    outs = {}
    for graphs in (False, True):
        engine = (EngineBuilder(tiny_checkpoint("qwen3-vl")).device("cuda").dtype("float32")
                  .cache(block_size=16).cuda_graphs(graphs).build())
        outs[graphs] = [o.token_ids for o in engine.generate(prompts, params)]
        if graphs:
            assert engine.runner.num_graph_steps > 0
    assert outs[True] == outs[False]
