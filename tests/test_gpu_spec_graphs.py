"""GPU checks of speculative decoding under CUDA graphs (need a CUDA device, e.g. an H100; skipped
on CPU): verify steps (1 + k tokens per request) replay captured graphs.

tiny-qwen3 with n-gram drafts (GQA, the Triton extend kernel in the graph) and the tiny DeepSeek-V3
with its trained MTP layer (MLA, the absorbed Triton kernel with rows built on the device; the MTP
layer reads the graph's static hidden states) run with cuda_graphs(True) and cuda_graphs(False)
in float32 (IEEE dots in our kernels, no TF32): the greedy tokens are identical, the verify graphs
were replayed, and every block is free at the end. Mixed prompt lengths, batches that are not a
captured size (padding requests) and different max_tokens (the batch shrinks through other
padded sizes; more requests than the largest graph run eagerly first) are in the runs; n-gram
proposals shorter than k exercise padding drafts. bf16 runs are only run, not compared token by
token (tests/test_gpu_mla_engine.py says why for the tiny MoE model). The MTP proposer's drafting
after graph steps replays its own captured graphs (speculative/mtp_graphs.py); the eager engine's
proposer has none.
"""

import pytest

from dlengine import EngineBuilder, SamplingParams

from conftest import make_prompts

pytestmark = pytest.mark.gpu
MAX_GRAPH_BATCH = 8  # a short ladder (1, 2, 4, 8): quick captures, and 11 requests exceed it


def _ngram_prompts() -> list[list[int]]:
    # random prompts of mixed lengths (the tiny model's greedy continuations repeat themselves,
    # which n-gram lookup drafts from) and prompts that repeat from the start
    return make_prompts(7) + [[5, 6, 7, 8] * 3, [20, 21] * 5, [3, 4, 5, 6, 7] * 4, [40, 41]]


def _params(n: int, base: int = 12) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=base + 3 * (i % 5), temperature=0.0, ignore_eos=True) for i in range(n)]


def _generate(model: str, method: str, k: int, graphs: bool, prompts, params, dtype: str = "float32"):
    engine = (EngineBuilder(model).device("cuda").dtype(dtype).attention("triton")
              .speculative(method, num_tokens=k).cuda_graphs(graphs, max_batch=MAX_GRAPH_BATCH).build())
    outs = [o.token_ids for o in engine.generate(prompts, params)]
    return engine, outs


def _check(engine, eager_engine, outs, eager_outs, k: int) -> None:
    assert outs == eager_outs
    g = engine.runner.graph_runner
    assert g is not None and g.query_lens == (1, 1 + k)
    assert g.num_verify_replays > 0, g.num_replays
    assert engine.runner.num_graph_steps == sum(g.num_replays.values())
    assert eager_engine.runner.graph_runner is None
    for e in (engine, eager_engine):
        assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
        e.block_manager.check_invariants()


@pytest.mark.parametrize("k, num_prompts", [(1, 11), (3, 11), (3, 5)])
def test_ngram_verify_graphs_match_eager(k, num_prompts):
    prompts = _ngram_prompts()[-num_prompts:]
    params = _params(len(prompts))
    engine, outs = _generate("tiny-qwen3", "ngram", k, True, prompts, params)
    eager, eager_outs = _generate("tiny-qwen3", "ngram", k, False, prompts, params)
    _check(engine, eager, outs, eager_outs, k)
    s, e = engine.stats, eager.stats
    assert s.num_accepted_tokens > 0
    # drafts depend on tokens only: the same proposals, verified and accepted alike
    assert (s.num_draft_tokens, s.num_accepted_tokens) == (e.num_draft_tokens, e.num_accepted_tokens)


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_verify_graphs_match_eager(k):
    from dlengine.testing.mtp import mtp_training_prompts

    # trained prompts (drafts mostly accepted), unseen ones of other lengths (mostly rejected)
    prompts = mtp_training_prompts()[:7] + make_prompts(4, lengths=(3, 21, 45, 9), seed=5)
    params = _params(len(prompts), base=20)
    engine, outs = _generate("tiny-deepseek-v3-mtp", "mtp", k, True, prompts, params)
    eager, eager_outs = _generate("tiny-deepseek-v3-mtp", "mtp", k, False, prompts, params)
    _check(engine, eager, outs, eager_outs, k)
    s, e = engine.stats, eager.stats
    assert engine.describe()["cuda_graphs"] is True
    # the MTP layer drafts from the graph's static hidden states as well as from the eager
    # forward's: acceptance is as high (a wrong row would change the drafts, not the tokens;
    # exact counts may differ where float32 rounding flips a near-tie of the MTP head)
    # (on CPU, float32, torch kernels: acceptance 0.45 at k = 1, 0.28 at k = 3 on these prompts)
    assert s.acceptance_rate > 0.2 and abs(s.acceptance_rate - e.acceptance_rate) < 0.05, \
        (s.acceptance_rate, e.acceptance_rate)


def test_mtp_bf16_graphs_run_and_free_everything():
    from dlengine.testing.mtp import mtp_training_prompts

    prompts = mtp_training_prompts()[:5]
    engine, outs = _generate("tiny-deepseek-v3-mtp", "mtp", 2, True, prompts, _params(5), dtype="bfloat16")
    assert all(len(o) == p.max_tokens for o, p in zip(outs, _params(5)))
    assert engine.runner.graph_runner.num_verify_replays > 0
    assert engine.stats.num_accepted_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_draft_graphs_replay_and_match_eager(k):
    """The MTP drafting of graph steps runs from the proposer's own graphs
    (speculative/mtp_graphs.py): one per target graph, one replay per graph step, decode and
    verify steps alike; tokens equal the eager engine's (whose proposer has no graphs)."""
    from dlengine.testing.mtp import mtp_training_prompts

    prompts = mtp_training_prompts()[:7] + make_prompts(4, lengths=(3, 21, 45, 9), seed=5)
    params = _params(len(prompts), base=20)
    engine, outs = _generate("tiny-deepseek-v3-mtp", "mtp", k, True, prompts, params)
    eager, eager_outs = _generate("tiny-deepseek-v3-mtp", "mtp", k, False, prompts, params)
    assert outs == eager_outs
    drafts, target = engine.speculator.graphs, engine.runner.graph_runner
    assert eager.speculator.graphs is None
    assert drafts is not None and set(drafts.graphs) == set(target.graphs)
    assert drafts.num_replays[1 + k] > 0, drafts.num_replays
    assert sum(drafts.num_replays.values()) == engine.runner.num_graph_steps
    s, e = engine.stats, eager.stats
    assert s.acceptance_rate > 0.2 and abs(s.acceptance_rate - e.acceptance_rate) < 0.05, \
        (s.acceptance_rate, e.acceptance_rate)
    # requests asking for logprobs never verify drafts: their steps replay the decode graphs, and
    # the proposer drafts after them from its decode-keyed graphs
    lp = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)] * 3
    decode_before = drafts.num_replays[1]
    assert [o.token_ids for o in engine.generate(prompts[:3], lp)] == \
        [o.token_ids for o in eager.generate(prompts[:3], lp)]
    assert drafts.num_replays[1] > decode_before, drafts.num_replays
    for e_ in (engine, eager):
        assert e_.block_manager.num_free_blocks == e_.block_manager.num_blocks
