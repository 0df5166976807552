"""dlengine vs transformers on tiny Qwen3 checkpoints: logits close in float32, greedy tokens equal,
under every scheduling regime (prefix caching on/off, small chunks, forced preemption)."""

import functools

import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts
from hf_reference import hf_greedy, hf_logits

MAX_NEW = 24
PROMPTS = make_prompts()


@functools.lru_cache(maxsize=None)
def reference_outputs(kind: str) -> tuple:
    path = tiny_checkpoint(kind)
    return tuple(tuple(hf_greedy(path, p, MAX_NEW)) for p in PROMPTS)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


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
    "default": dict(cache=dict(block_size=16)),
    "no-prefix-cache": dict(cache=dict(block_size=16, prefix_caching=False)),
    "chunked-32": dict(cache=dict(block_size=16), scheduler=dict(max_num_batched_tokens=32)),
    "preemption": dict(cache=dict(block_size=16, num_blocks=40), scheduler=dict(max_model_len=512)),
    "block-1-no-chunking": dict(cache=dict(block_size=1), scheduler=dict(chunked_prefill=False, max_model_len=512,
                                                                          max_num_batched_tokens=512)),
    # async scheduling: step N+1 is scheduled before N's tokens are known (placeholders)
    "async": dict(cache=dict(block_size=16), async_scheduling=True),
    "async-chunked-32": dict(cache=dict(block_size=16), scheduler=dict(max_num_batched_tokens=32),
                             async_scheduling=True),
    "async-preemption": dict(cache=dict(block_size=16, num_blocks=40), scheduler=dict(max_model_len=512),
                             async_scheduling=True),
}


def build(path, setup):
    b = EngineBuilder(path).dtype("float32")
    if "cache" in setup:
        b.cache(**setup["cache"])
    if "scheduler" in setup:
        b.scheduler(**setup["scheduler"])
    if "async_scheduling" in setup:
        b.async_scheduling(setup["async_scheduling"])
    return b.build()


@pytest.mark.parametrize("setup", list(SETUPS))
def test_greedy_tokens_match_transformers(setup):
    path = tiny_checkpoint("qwen3")
    engine = build(path, SETUPS[setup])
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    ref = reference_outputs("qwen3")
    for i, (out, expected) in enumerate(zip(outs, ref)):
        assert out.token_ids == list(expected), f"prompt {i} (len {len(PROMPTS[i])}) diverged"
    if setup.endswith("preemption"):
        assert engine.stats.num_preemptions > 0
    if setup.endswith("chunked-32"):
        assert max(s.num_tokens for s in engine.stats.steps) <= 32
        # a long prompt's chunks share steps with other requests' decodes
        assert any(s.num_decodes > 0 and s.num_prefill_tokens > 0 for s in engine.stats.steps)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.check_invariants()


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
