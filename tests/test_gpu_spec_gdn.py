"""GPU checks of speculative decoding on the Gated DeltaNet hybrids (need a CUDA device, e.g. an
H100; skipped on CPU).

Tiny Qwen3.5-MoE and Qwen3-Next with n-gram drafts, and their trained MTP heads
(tiny-qwen3.5-moe-mtp, tiny-qwen3-next-mtp), run with cuda_graphs(True) and cuda_graphs(False) in
float32 (IEEE dots in our kernels, no TF32) against the plain engine: greedy tokens identical to
plain decoding in both, verify graphs replayed (their state layers run position by position with
draft snapshots: kernels/context.py StatePositions) and, for MTP, the draft graphs too; every
block and state slot free at the end. The GDN ops are our Triton kernels here (the CPU tests run
the torch references), so this is also the check of the one-token Triton kernels on verify rows.
"""

import pytest

from dlengine import EngineBuilder, SamplingParams

from conftest import make_prompts

pytestmark = pytest.mark.gpu
MAX_GRAPH_BATCH = 8
REPEATING = {"qwen3.5-moe": [342] * 8, "qwen3-next": [17] * 12}  # prompts the tiny models continue by repeating


def _params(n: int, base: int = 16) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=base + 3 * (i % 5), temperature=0.0, ignore_eos=True) for i in range(n)]


def _engine(model: str, graphs: bool, method: str | None = None, k: int = 0):
    b = EngineBuilder(model).device("cuda").dtype("float32").attention("triton").cuda_graphs(
        graphs, max_batch=MAX_GRAPH_BATCH)
    if method:
        b.speculative(method, num_tokens=k)
    return b.build()


def _check_free(engine) -> None:
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.state_slots.num_free == bm.state_slots.num_slots


@pytest.mark.parametrize("kind", ["qwen3.5-moe", "qwen3-next"])
@pytest.mark.parametrize("k", [1, 3])
def test_ngram_on_hybrids_matches_plain_with_and_without_graphs(kind, k):
    from dlengine.testing import tiny_checkpoint

    path = tiny_checkpoint(kind)
    prompts = [REPEATING[kind], [20, 21] * 5] + make_prompts(9, lengths=(1, 2, 5, 16, 17, 31, 64, 100, 7), seed=3)
    params = _params(len(prompts))
    plain = [o.token_ids for o in _engine(path, False).generate(prompts, params)]
    for graphs in (True, False):
        engine = _engine(path, graphs, "ngram", k)
        assert [o.token_ids for o in engine.generate(prompts, params)] == plain, f"graphs={graphs}"
        assert engine.stats.num_accepted_tokens > 0
        if graphs:
            assert engine.runner.graph_runner.num_verify_replays > 0
        _check_free(engine)


@pytest.mark.parametrize("kind", ["qwen3.5-moe", "qwen3-next"])
@pytest.mark.parametrize("k", [1, 2])
def test_mtp_on_hybrids_matches_plain_with_and_without_graphs(kind, k):
    from dlengine.testing import tiny_checkpoint
    from dlengine.testing.mtp import mtp_training_prompts

    path = tiny_checkpoint(f"{kind}-mtp")
    prompts = mtp_training_prompts()[:7] + make_prompts(4, lengths=(3, 21, 45, 9), seed=5)
    params = _params(len(prompts), base=20)
    plain = [o.token_ids for o in _engine(path, False).generate(prompts, params)]
    for graphs in (True, False):
        engine = _engine(path, graphs, "mtp", k)
        assert [o.token_ids for o in engine.generate(prompts, params)] == plain, f"graphs={graphs}"
        assert engine.stats.acceptance_rate > 0.3
        if graphs:
            assert engine.runner.graph_runner.num_verify_replays > 0
            assert engine.speculator.graphs is not None and engine.speculator.graphs.num_replays[1 + k] > 0
        _check_free(engine)


def test_bf16_hybrid_speculation_runs():
    """bf16 with graphs: only run (the tiny MoE's near-tied logits make bf16 token comparisons
    flaky), checking that drafts are accepted and everything is returned."""
    from dlengine.testing import tiny_checkpoint

    engine = (EngineBuilder(tiny_checkpoint("qwen3.5-moe-mtp")).device("cuda").dtype("bfloat16")
              .speculative("mtp", num_tokens=2).build())
    from dlengine.testing.mtp import mtp_training_prompts

    outs = engine.generate(mtp_training_prompts()[:8], _params(8))
    assert all(len(o.token_ids) >= 16 for o in outs)
    assert engine.stats.num_draft_tokens > 0
    _check_free(engine)
