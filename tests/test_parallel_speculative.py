"""Speculative decoding under attention-DP x expert parallelism (CPU, gloo, 2 processes).

MTP: the next-n layer's MoE joins the expert-parallel collectives, so every rank must run it the
same number of times each step whatever its requests (dlengine/parallel/lockstep.py pads a rank's
MTP forwards up to k with empty exchanges). N-gram drafts run no model, but their verify steps
(1 + k tokens per request) go through the ranks' MoE exchanges like any step.

Against the single-process engine without speculation: greedy tokens identical with both ranks
busy, with uneven load (one rank holds more requests and finishes first, then idles while the
other drafts), with one request alone (the other rank idles throughout), and with a pool small
enough for preemption and cut-short MTP chains; acceptance as on one process."""

import functools

import pytest

from dlengine import EngineBuilder, SamplingParams
from dlengine.parallel import ParallelEngine
from dlengine.testing import tiny_checkpoint
from dlengine.testing.mtp import PROMPT_LEN, SEQ_LEN, mtp_training_prompts

from conftest import make_prompts

MTP_GREEDY = SamplingParams(max_tokens=SEQ_LEN - PROMPT_LEN, temperature=0.0, ignore_eos=True)
DP_EP = dict(attention_dp=2, ffn_ep=2, timeout_s=180)


def _greedy(max_tokens: int, ignore_eos: bool = True) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)


@functools.lru_cache(maxsize=None)
def _plain(model: str, prompts: tuple, max_tokens: int, ignore_eos: bool) -> list[list[int]]:
    """The single-process engine's greedy tokens, no speculation."""
    engine = EngineBuilder(model).dtype("float32").build()
    outs = [o.token_ids for o in engine.generate([list(p) for p in prompts], _greedy(max_tokens, ignore_eos))]
    engine.close()
    return outs


def _delta(after: list[dict], before: list[dict], key: str) -> list[int]:
    return [a[key] - b[key] for a, b in zip(after, before)]


def _check_pools_full(engine: ParallelEngine) -> None:
    for s in engine.stats():
        assert s["num_free_blocks"] == s["num_blocks"], s  # drafts' and look-ahead slots all returned


def test_mtp_under_attention_dp_expert_parallelism():
    ckpt = tiny_checkpoint("deepseek-v3-mtp")
    train = mtp_training_prompts()
    # trained prompts (drafts accepted), an unseen one (drafts mostly rejected) and two long ones
    # (the last is kept for the uneven batch, so that its prompt is not in the prefix cache)
    long = [train[6] + train[7] + train[8] + train[9], train[10] + train[11] + train[12] + train[13]]
    prompts = tuple(map(tuple, train[:6] + [make_prompts(4)[3]] + long))
    ref = _plain(ckpt, prompts, MTP_GREEDY.max_tokens, True)
    # a pool of 24 four-token blocks per rank: four requests of 40-58 tokens do not fit at once, so
    # requests are preempted and recomputed; prompts run in chunks of up to 16 tokens (a step
    # whose only request is mid-prompt samples nothing: one MTP pass, no chained one)
    engine = (EngineBuilder(ckpt).dtype("float32").cache(block_size=4, num_blocks=24)
              .scheduler(max_num_batched_tokens=16, max_model_len=64)
              .speculative("mtp", num_tokens=2).parallel(**DP_EP).build())
    try:
        # both ranks busy
        before = engine.stats()
        outs = engine.generate([list(p) for p in prompts[:8]], MTP_GREEDY)
        assert [o.token_ids for o in outs] == ref[:8]
        assert sum(o.metrics.num_preemptions for o in outs) > 0
        stats = engine.stats()
        drafted, accepted = _delta(stats, before, "num_draft_tokens"), _delta(stats, before, "num_accepted_tokens")
        assert min(drafted) > 0 and min(accepted) > 0, (drafted, accepted)  # every rank drafted and kept drafts
        assert sum(accepted) / sum(drafted) > 0.5, (drafted, accepted)  # a trained layer's acceptance
        assert stats[0]["lockstep_steps"] == stats[1]["lockstep_steps"]
        _check_pools_full(engine)

        # uneven load: requests go least-loaded first, so rank 0 holds the two short ones, rank 1
        # the long one. Rank 1 first runs a prompt chunk (one MTP pass) while rank 0 drafts (two),
        # so it tops up one; rank 0 finishes first and then only joins the collectives (the
        # target's MoE and two MTP passes a step, with no tokens) while rank 1 keeps drafting
        before = engine.stats()
        picked, lengths = (0, 8, 2), (3, 34, 7)
        outs = engine.generate([list(prompts[i]) for i in picked], [_greedy(n) for n in lengths])
        assert [o.token_ids for o in outs] == [ref[i][:n] for i, n in zip(picked, lengths)]
        stats = engine.stats()
        assert _delta(stats, before, "num_finished") == [2, 1]
        idle, idle_drafts = _delta(stats, before, "idle_steps"), _delta(stats, before, "idle_draft_forwards")
        assert idle[0] > 0 and idle[1] == 0, idle
        assert idle_drafts[0] >= 2 * idle[0], idle_drafts  # every idle step still makes k MTP exchanges
        assert idle_drafts[1] > 0, idle_drafts  # rank 1 was busy every step, yet topped up passes
        assert _delta(stats, before, "num_accepted_tokens")[1] > 0

        # one request: rank 1 has nothing at all and idles for every step
        before = engine.stats()
        [one] = engine.generate([list(prompts[2])], MTP_GREEDY)
        assert one.token_ids == ref[2]
        stats = engine.stats()
        assert _delta(stats, before, "idle_steps")[1] == _delta(stats, before, "lockstep_steps")[1] > 0

        # sampling: drafts are verified against sampled tokens; lengths only (no reference)
        outs = engine.generate([list(p) for p in prompts[:4]],
                               SamplingParams(max_tokens=12, temperature=0.7, seed=1, ignore_eos=True))
        assert [len(o.token_ids) for o in outs] == [12] * 4
        _check_pools_full(engine)
    finally:
        engine.close()


def test_ngram_under_attention_dp_expert_parallelism():
    """N-gram drafts on tiny Qwen3-MoE (whose greedy outputs repeat themselves, so drafts are
    accepted): verify steps of 1 + k tokens per request on one rank, single tokens or nothing on
    the other, all through the same MoE exchanges."""
    prompts = tuple(map(tuple, make_prompts(8)))  # lengths 1 .. 100
    ref = _plain("tiny-qwen3-moe", prompts, 32, False)
    engine = EngineBuilder("tiny-qwen3-moe").dtype("float32").speculative("ngram", num_tokens=3).parallel(**DP_EP).build()
    try:
        outs = engine.generate([list(p) for p in prompts], _greedy(32, ignore_eos=False))
        assert [o.token_ids for o in outs] == ref
        stats = engine.stats()
        assert min(s["num_accepted_tokens"] for s in stats) > 0, stats
        # uneven: rank 0 gets the two short requests and finishes first
        before = engine.stats()
        lengths = (2, 32, 5)
        outs = engine.generate([list(prompts[i]) for i in (0, 7, 1)], [_greedy(n, False) for n in lengths])
        assert [o.token_ids for o in outs] == [ref[i][:n] for i, n in zip((0, 7, 1), lengths)]
        assert _delta(engine.stats(), before, "idle_steps")[0] > 0
        _check_pools_full(engine)
    finally:
        engine.close()


# ---------------------------------------------------------------------------- no processes
class _HiddenStateDrafter:
    """A hidden-state speculator (it would run a model after every step) that says nothing about
    that model."""

    name = "undeclared"
    num_tokens = 1
    needs_hidden_states = True


def test_undeclared_hidden_state_speculator_is_refused_under_expert_parallelism():
    from types import SimpleNamespace

    import torch

    from dlengine.config import ConfigError
    from dlengine.parallel.lockstep import RankCore
    from dlengine.parallel.state import ParallelState

    ep = ParallelState(world_size=2, dp_size=2, ep_size=2, ep_group=object(), world_group=object())
    core = SimpleNamespace(model=torch.nn.Linear(2, 2), speculator=_HiddenStateDrafter())
    with pytest.raises(ConfigError, match="draft_model / max_forwards_per_step.*ffn_ep>1"):
        RankCore(core, ep)
    # declared, with no MoE layer in it: nothing to pad
    core.speculator.draft_model, core.speculator.max_forwards_per_step = torch.nn.Linear(2, 2), 1
    rank = RankCore(core, ep)
    assert rank.draft_moe == [] and rank.draft_forwards == 0
    # without expert parallelism the declaration is not needed
    del core.speculator.draft_model
    assert RankCore(core, ParallelState()).draft_moe == []
