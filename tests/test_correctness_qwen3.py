"""dlengine vs transformers on tiny Qwen3 checkpoints: logits close in float32, greedy tokens equal,
under every scheduling regime (prefix caching on/off, small chunks, forced preemption)."""

import pytest

from dlengine import EngineBuilder, SamplingParams
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts
from hf_reference import SCHEDULING_SETUPS, check_greedy_setup, hf_logits, reference_greedy, relative_error

MAX_NEW = 24
PROMPTS = make_prompts()


def reference_outputs(kind: str) -> tuple:
    return reference_greedy(kind, tuple(map(tuple, PROMPTS)), MAX_NEW)


@pytest.mark.parametrize("kind", ["qwen3", "qwen3-yarn", "qwen3-untied"])
def test_first_step_logits_match_transformers(kind):
    path = tiny_checkpoint(kind)
    engine = EngineBuilder(path).dtype("float32").cache(block_size=16).build()
    for prompt in PROMPTS:
        ours = engine.prompt_logits(prompt)
        ref = hf_logits(path, prompt)
        assert ours.shape == ref.shape
        assert relative_error(ours[-1], ref[-1]) < 1e-4
        assert relative_error(ours, ref) < 1e-4  # every position, i.e. the whole prefill


SETUPS = {
    "default": SCHEDULING_SETUPS["default"],
    "no-prefix-cache": dict(cache=dict(block_size=16, prefix_caching=False)),
    "chunked-32": SCHEDULING_SETUPS["chunked-32"],
    "preemption": SCHEDULING_SETUPS["preemption"],
    "block-1-no-chunking": dict(cache=dict(block_size=1), scheduler=dict(chunked_prefill=False, max_model_len=512,
                                                                          max_num_batched_tokens=512)),
    # async scheduling: step N+1 is scheduled before N's tokens are known (placeholders)
    "async": dict(cache=dict(block_size=16), async_scheduling=True),
    "async-chunked-32": dict(cache=dict(block_size=16), scheduler=dict(max_num_batched_tokens=32),
                             async_scheduling=True),
    "async-preemption": dict(cache=dict(block_size=16, num_blocks=40), scheduler=dict(max_model_len=512),
                             async_scheduling=True),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_greedy_tokens_match_transformers(setup):
    check_greedy_setup("qwen3", setup, SETUPS[setup], PROMPTS, MAX_NEW)


@pytest.mark.parametrize("kind", ["qwen3-yarn", "qwen3-untied"])
def test_greedy_other_configs(kind):
    path = tiny_checkpoint(kind)
    engine = EngineBuilder(path).dtype("float32").cache(block_size=16).scheduler(max_num_batched_tokens=64).build()
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    for out, expected in zip(outs, reference_outputs(kind)):
        assert out.token_ids == list(expected)


def test_teacher_forced_logits_through_chunks_and_prefix_cache():
    """Logits of prompt + reference continuation, computed in 32-token chunks, twice (second time
    the prefix cache serves most of it), stay within tolerance of transformers at every position."""
    path = tiny_checkpoint("qwen3")
    engine = EngineBuilder(path).dtype("float32").cache(block_size=16).build()
    for prompt, cont in zip(PROMPTS[-3:], reference_outputs("qwen3")[-3:]):
        seq = prompt + list(cont)
        ref = hf_logits(path, seq)
        for _ in range(2):
            assert relative_error(engine.prompt_logits(seq, chunk_size=32), ref) < 1e-4


def test_triton_attention_backend_matches_transformers():
    """The Triton backend inside the whole engine (CPU: interpreter, so a short run)."""
    pytest.importorskip("triton")
    path = tiny_checkpoint("qwen3")
    engine = (EngineBuilder(path).dtype("float32").attention("triton").cuda_graphs(False)
              .cache(block_size=16).scheduler(max_num_batched_tokens=48).build())
    assert engine.runner.backend.name == "triton"
    picks = [0, 4, 6, 7]  # lengths 1, 17, 64, 100: decode-only, block-crossing, chunked prompts
    outs = engine.generate([PROMPTS[i] for i in picks], SamplingParams(max_tokens=8, temperature=0.0))
    ref = reference_outputs("qwen3")
    for i, out in zip(picks, outs):
        assert out.token_ids == list(ref[i][:8])
