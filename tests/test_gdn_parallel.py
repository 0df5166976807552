"""Tensor parallelism of the Gated DeltaNet hybrids on CPU (gloo, 2 processes): each rank keeps
half the DeltaNet heads (q/k/v/z/b/a projections column-parallel, conv channels and state slots
cut by head, out_proj row-parallel) and the greedy tokens equal the single-process engine's, on a
batch of prompts (lengths 1..100) run twice so that the second round resumes prefix-cache
checkpoints on every rank."""

import functools

import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.config import ConfigError, ModelConfig
from dlengine.models.qwen3_5 import Qwen3_5ForConditionalGeneration
from dlengine.parallel import ParallelEngine
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts

PROMPTS = make_prompts(8)  # lengths 1 .. 100
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@functools.lru_cache(maxsize=None)
def reference(kind: str) -> tuple:
    engine = EngineBuilder(kind).dtype("float32").cache(block_size=16).build()
    outs = tuple(tuple(o.token_ids) for o in engine.generate(PROMPTS, GREEDY))
    engine.close()
    return outs


@pytest.mark.parametrize("kind", ["tiny-qwen3-next", "tiny-qwen3.5", "tiny-qwen3.5-moe"])
def test_tensor_parallel_matches_single_process(kind):
    engine = EngineBuilder(kind).dtype("float32").cache(block_size=16).parallel(tp=2, timeout_s=180).build()
    assert isinstance(engine, ParallelEngine)
    procs = engine.processes
    try:
        for _ in range(2):  # the second round hits the prefix cache (state checkpoints per rank)
            assert [tuple(o.token_ids) for o in engine.generate(PROMPTS, GREEDY)] == list(reference(kind))
    finally:
        engine.close()
    for p in procs:
        p.join(10)
    assert [p.exitcode for p in procs] == [0, 0]


def test_rank_state_holds_its_heads():
    cfg = ModelConfig.from_pretrained(tiny_checkpoint("qwen3.5"))
    full = Qwen3_5ForConditionalGeneration.cache_specs(cfg, dtype=torch.float32)[1]
    half = Qwen3_5ForConditionalGeneration.cache_specs(cfg, dtype=torch.float32, tp_size=2, tp_rank=1)[1]
    shapes = {t.name: t.shape for t in full.tensors}
    assert {t.name: t.shape for t in half.tensors} == {"conv": (shapes["conv"][0] // 2, shapes["conv"][1]),
                                                     "ssm": (shapes["ssm"][0] // 2, *shapes["ssm"][1:])}
    with pytest.raises(ConfigError, match="linear_num_key_heads=2 is not divisible by tensor-parallel size 4"):
        Qwen3_5ForConditionalGeneration.cache_specs(cfg, dtype=torch.float32, tp_size=4, tp_rank=0)
