"""Speculative decoding with the checkpoint's MTP layer (dlengine/speculative/mtp.py) on a tiny
DeepSeek-V3 whose next-n layer is trained on the model's own greedy continuations
(dlengine/testing/mtp.py), and the distribution test of the verification rule.

Greedy outputs must be token-identical to plain decoding whatever the drafts, across chunked
prefill, preemption, prefix-cache hits and k = 1..3; acceptance must be what a trained layer gives
and a random one does not."""

import dataclasses

import numpy as np
import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.config import ConfigError
from dlengine.testing import tiny_checkpoint
from dlengine.testing.mtp import PROMPT_LEN, SEQ_LEN, mtp_training_prompts

GREEDY = SamplingParams(max_tokens=SEQ_LEN - PROMPT_LEN, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint("deepseek-v3-mtp")


def _prompts():
    # trained prompts (drafts accepted), plus longer and unseen ones (drafts mostly rejected)
    rng = np.random.default_rng(5)
    unseen = [rng.integers(2, 512, n).tolist() for n in (3, 21, 45)]
    train = mtp_training_prompts()
    return train[:6] + unseen + [train[0] + train[1] + train[2]]


def _generate(ckpt, prompts, k=None, cache=None, sched=None, params=GREEDY):
    b = EngineBuilder(ckpt).dtype("float32").cache(**(cache or {})).scheduler(**(sched or {}))
    if k is not None:
        b = b.speculative("mtp", num_tokens=k)
    engine = b.build()
    return engine, [o.token_ids for o in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def reference(ckpt):
    return _generate(ckpt, _prompts())[1]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_greedy_equals_plain(ckpt, reference, k):
    engine, out = _generate(ckpt, _prompts(), k=k)
    assert out == reference
    s = engine.stats
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens > 0
    assert s.mean_accepted_length > 1.0
    assert engine.describe()["speculative"] == {"method": "mtp", "num_tokens": k}
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


@pytest.mark.parametrize("cache,sched", [
    # chunked prefill: prompts of up to 18 tokens split into chunks of 8 (the MTP layer runs on
    # every chunk so its KV covers the whole prompt)
    ({}, dict(max_num_batched_tokens=8, max_model_len=256)),
    # a pool too small for all requests at once: preemption and recompute with drafts around
    (dict(block_size=4, num_blocks=40), dict(max_num_batched_tokens=64, max_model_len=128)),
])
def test_mtp_greedy_equals_plain_chunked_and_preempted(ckpt, reference, cache, sched):
    engine, out = _generate(ckpt, _prompts(), k=2, cache=cache, sched=sched)
    assert out == reference
    assert engine.stats.num_accepted_tokens > 0
    if "num_blocks" in cache:
        assert engine.stats.num_preemptions > 0
    engine.block_manager.check_invariants()


def test_mtp_with_prefix_cache_hits(ckpt, reference):
    engine = EngineBuilder(ckpt).dtype("float32").cache(block_size=4).speculative("mtp", num_tokens=2).build()
    prompts = _prompts()
    first = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    before = engine.stats.num_cached_tokens
    again = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    assert first == reference and again == reference
    assert engine.stats.num_cached_tokens > before  # the second pass hit the first one's blocks
    # cached blocks carry the MTP layer's KV too: drafts stay as good on the second pass
    assert engine.stats.acceptance_rate > 0.3


def test_trained_mtp_layer_accepts_and_random_does_not(ckpt):
    prompts = mtp_training_prompts()[:8]
    engine, _ = _generate(ckpt, prompts, k=1)
    assert engine.stats.acceptance_rate > 0.5, engine.stats.acceptance_rate
    # the same engine with the MTP layer's weights replaced by random ones: drafts are then
    # almost never the target's tokens, so a rate above 0.5 needs the trained layer to work
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in engine.speculator.mtp.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    for module in engine.speculator.mtp.modules():
        if hasattr(module, "post_load_weights"):
            module.post_load_weights()
    engine.stats.reset()
    engine.generate(prompts, GREEDY)
    assert engine.stats.acceptance_rate < 0.1, engine.stats.acceptance_rate


def test_mtp_config_errors():
    with pytest.raises(ConfigError, match="no multi-token-prediction layer"):
        EngineBuilder("tiny-deepseek-v3").speculative("mtp", num_tokens=1).build()
    with pytest.raises(ConfigError, match="not shipped yet"):
        EngineBuilder("tiny-qwen3").speculative("mtp", num_tokens=1).build()


def test_mtp_sampling_runs(ckpt):
    engine = EngineBuilder(ckpt).dtype("float32").speculative("mtp", num_tokens=2).build()
    outs = engine.generate(mtp_training_prompts()[:4], SamplingParams(max_tokens=12, temperature=0.7, seed=1,
                                                                      ignore_eos=True))
    assert all(len(o.token_ids) == 12 for o in outs)
    assert engine.stats.num_draft_tokens > 0


# ---------------------------------------------------------------------------- distribution
class LookupDrafts:
    """Proposes, after first token t, the most frequent (token 2, token 3) that followed t in a
    plain run: deterministic drafts, often accepted, often not."""

    name = "lookup"
    num_tokens = 2

    def __init__(self, plain: list[list[int]]) -> None:
        by_first: dict[int, list[tuple[int, int]]] = {}
        for t in plain:
            by_first.setdefault(t[0], []).append((t[1], t[2]))
        self.table = {t: list(max(set(c), key=c.count)) for t, c in by_first.items()}

    def propose(self, requests):
        return [self.table.get(r.all_token_ids[-1], [3, 4]) if r.num_output_tokens == 1 else []
                for r in requests]


def _chi2_two_sample(a: list[int], b: list[int]) -> tuple[float, float]:
    """Two-sample chi-square statistic of equal-size samples and its 0.999 quantile under the null
    (Wilson-Hilferty approximation; cells pooled below 10 expected counts)."""
    values = sorted(set(a) | set(b))
    ca = np.array([a.count(v) for v in values], dtype=float)
    cb = np.array([b.count(v) for v in values], dtype=float)
    small = (ca + cb) < 20
    if small.any():
        ca = np.append(ca[~small], ca[small].sum())
        cb = np.append(cb[~small], cb[small].sum())
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    stat = float(((ca - cb) ** 2 / (ca + cb)).sum())
    df = max(1, len(ca) - 1)
    z = 3.09  # one-sided 0.999
    quantile = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    return stat, quantile


N_SAMPLES = 800
PROMPT = [5, 6, 7, 8, 9, 10, 11]
TOPK = SamplingParams(max_tokens=3, temperature=1.0, top_k=4, ignore_eos=True)


def _sample_tokens(speculator, seed_base: int) -> list[list[int]]:
    b = EngineBuilder("tiny-qwen3").dtype("float32").scheduler(max_num_seqs=N_SAMPLES)
    if speculator is not None:
        b = b.speculative(speculator, num_tokens=speculator.num_tokens)
    engine = b.build()
    params = [dataclasses.replace(TOPK, seed=seed_base + i) for i in range(N_SAMPLES)]
    outs = engine.generate([PROMPT] * N_SAMPLES, params)
    return [o.token_ids for o in outs], engine.stats


@pytest.fixture(scope="module")
def distribution_samples():
    """Tokens 1-3 sampled at temperature 1 over a 4-token support (top_k=4): a plain run, and a
    second plain run from other seeds that the drafts are made from (so they are not fitted to
    the samples they are compared with)."""
    return _sample_tokens(None, 0)[0], _sample_tokens(None, 20 * N_SAMPLES)[0]


def test_verification_keeps_the_target_distribution(distribution_samples):
    """Drafted and plain samples from disjoint seeds are samples of one distribution if the
    accept rule is right: token 2 and token 3 histograms (token 3 depends on token 2 being
    accepted or resampled right), and the joint (token 2, token 3) histogram."""
    plain, other = distribution_samples
    spec, stats = _sample_tokens(LookupDrafts(other), 10 * N_SAMPLES)
    assert stats.num_accepted_tokens > 0.3 * N_SAMPLES  # drafts decided many samples
    assert stats.num_accepted_tokens < stats.num_draft_tokens  # and were rejected often too
    for pos in (1, 2, slice(1, 3)):  # token 1 comes from the prompt step, without drafts
        stat, bound = _chi2_two_sample([tuple(t[pos]) if isinstance(pos, slice) else t[pos] for t in plain],
                                       [tuple(t[pos]) if isinstance(pos, slice) else t[pos] for t in spec])
        assert stat < bound, (pos, stat, bound)


def test_distribution_test_catches_a_wrong_accept_rule(distribution_samples, monkeypatch):
    """The test above can fail: accepting every draft (the target's samples ignored) shifts the
    histograms far past the bound."""
    from dlengine.engine.runner import StepHandle

    plain, other = distribution_samples

    def accept_all(self):
        tokens, out, row = self.token_ids(), [], 0
        for req, k in zip(self.sampled, self.num_drafts or [0] * len(self.sampled)):
            out.append(list(req.spec_token_ids[:k]) + [tokens[row + k]])
            row += 1 + k
        return out

    monkeypatch.setattr(StepHandle, "accepted_tokens", accept_all)
    spec, _ = _sample_tokens(LookupDrafts(other), 10 * N_SAMPLES)
    stat, bound = _chi2_two_sample([t[1] for t in plain], [t[1] for t in spec])
    assert stat > bound, (stat, bound)


def test_mtp_prefill_decode_roles_match_hybrid(ckpt, reference):
    """Both roles with speculative("mtp"): the prefill engine writes the prompt's MTP KV into the
    blocks it hands over (they travel with the target's, one more layer of the same group) and
    the decode engine drafts from its first step on."""
    pytest.importorskip("dlslime", reason="PD roles need dlslime (pip install 'dlengine[dlslime]')")
    from dlengine.disagg import PDRouter

    def build(role):
        return (EngineBuilder(ckpt).dtype("float32").cache(block_size=16).scheduler(max_model_len=256).role(role)
                .transfer("dlslime", transport="tcp").speculative("mtp", num_tokens=2).build())

    prefill, decode = build("prefill"), build("decode")
    try:
        outs = PDRouter(prefill, decode).generate(_prompts(), GREEDY)
        assert [o.token_ids for o in outs] == reference
        assert decode.stats.acceptance_rate > 0.3
    finally:
        prefill.close()
        decode.close()


def test_mtp_under_tensor_parallelism(ckpt):
    """tp=2 (two processes, gloo): every rank runs its shard of the MTP layer on the same
    requests, so drafts and tokens agree across ranks and with one process."""
    prompts = mtp_training_prompts()[:6]
    ref = _generate(ckpt, prompts)[1]
    engine = (EngineBuilder(ckpt).dtype("float32").speculative("mtp", num_tokens=2)
              .parallel(tp=2, timeout_s=300).build())
    try:
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == ref
        stats = engine.stats()
        assert stats[0]["num_accepted_tokens"] == stats[1]["num_accepted_tokens"] > 0
        assert stats[0]["num_steps"] == stats[1]["num_steps"]
    finally:
        engine.close()


def test_mtp_is_no_longer_refused_under_expert_parallelism(ckpt):
    # it runs: every rank tops its MTP forwards up to k a step (tests/test_parallel_speculative.py)
    cfg = EngineBuilder(ckpt).speculative("mtp", num_tokens=1).parallel(attention_dp=2, ffn_ep=2).config()
    assert cfg.parallel.ffn_ep == 2
    # speculative("mtp") with cuda_graphs(True) is no longer refused: verify steps are captured
    # (tests/test_cuda_graph_verify.py on CPU, tests/test_gpu_spec_graphs.py on a GPU)


def test_spec_counters_in_server_metrics(ckpt):
    from dlengine.serve.metrics import ServerMetrics, engine_snapshot

    engine, _ = _generate(ckpt, mtp_training_prompts()[:2], k=2)
    text = ServerMetrics("tiny").render(engine_snapshot(engine)).decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("dlengine_spec_decode_")}
    s = engine.stats
    assert values["dlengine_spec_decode_draft_tokens_total"] == s.num_draft_tokens > 0
    assert values["dlengine_spec_decode_accepted_tokens_total"] == s.num_accepted_tokens > 0
    assert values["dlengine_spec_decode_verifications_total"] == s.num_spec_verifications > 0


def test_mtp_on_a_block_fp8_checkpoint(ckpt, tmp_path):
    """DeepSeek ships V3 in block-scaled FP8, its MTP layer too: the layer is prepared and loaded
    like the target (FP8 projections and experts; the head and embedding copy unquantised).
    Acceptance is not checked: quantisation changes the tiny model's greedy continuations within
    a few tokens, so the layer's training data no longer matches them."""
    from dlengine.testing import build_fp8_checkpoint

    path = build_fp8_checkpoint(ckpt, str(tmp_path / "fp8"))
    prompts = mtp_training_prompts()[:4]
    ref = [o.token_ids for o in EngineBuilder(path).build().generate(prompts, GREEDY)]
    engine = EngineBuilder(path).speculative("mtp", num_tokens=2).build()
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == ref
    assert engine.stats.num_draft_tokens > 0
    assert type(engine.speculator.mtp.layer.eh_proj).__name__ != "Linear"  # an FP8 layer


# ---------------------------------------------------------------------------- look-ahead slots
def _record_proposals(engine) -> list[tuple[int, int]]:
    """Wrap the proposer: per proposal, (drafts it made, drafts the core may keep)."""
    records, propose = [], engine.speculator.propose
    max_len = engine.core.config.max_model_len

    def recording(requests):
        drafts = propose(requests)
        for r, d in zip(requests, drafts):
            records.append((len(d), min(r.params.max_tokens - r.num_output_tokens, max_len - r.num_tokens) - 1))
        return drafts

    engine.speculator.propose = recording
    return records


@pytest.mark.parametrize("block_size", [16, 4])
def test_mtp_chained_drafts_do_not_stop_at_block_boundaries(ckpt, block_size):
    """k = 3 on the trained prompts: with look-ahead slots every proposal has all k drafts (or
    every draft the core keeps near max_tokens), so drafts per verify step are exactly what the
    request's remaining room allows; without them chains stop where a block ends."""
    k = 3
    prompts = mtp_training_prompts()
    engine = EngineBuilder(ckpt).dtype("float32").cache(block_size=block_size).speculative("mtp", num_tokens=k).build()
    assert engine.scheduler.num_lookahead_tokens == k - 1
    records = _record_proposals(engine)
    engine.generate(prompts, GREEDY)
    s = engine.stats
    assert records and all(n == k or n >= min(k, room) for n, room in records), records
    assert s.num_draft_tokens == sum(min(k, max(0, room)) for _, room in records)
    # every verify step whose request had room for k drafts verified exactly k
    assert sum(1 for _, room in records if room >= k) * k + sum(max(0, room) for _, room in records if room < k) \
        == s.num_draft_tokens
    assert s.num_spec_verifications == sum(1 for _, room in records if room > 0)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()

    # the same run without look-ahead loses drafts at block boundaries (what the test guards)
    engine = EngineBuilder(ckpt).dtype("float32").cache(block_size=block_size).speculative("mtp", num_tokens=k).build()
    engine.scheduler.num_lookahead_tokens = 0
    records = _record_proposals(engine)
    engine.generate(prompts, GREEDY)
    assert any(n < min(k, room) for n, room in records)


def _generate_checked(engine, prompts, params=GREEDY) -> list[list[int]]:
    """Step the engine by hand, checking after every step that the block bookkeeping holds and
    that rollback returned every block past a running request's computed positions."""
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    bm = engine.block_manager
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens[o.request_id] = list(o.token_ids)
        bm.check_invariants()
        for r in engine.scheduler.running:
            assert len(r.block_ids) == bm.blocks_needed(r.num_computed_tokens), r
    assert bm.num_free_blocks == bm.num_blocks  # nothing leaked
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("cache,sched", [
    ({}, dict(max_num_batched_tokens=8, max_model_len=256)),  # chunked prefill
    (dict(block_size=4, num_blocks=40), dict(max_num_batched_tokens=64, max_model_len=128)),  # preemption
    (dict(block_size=4, num_blocks=32), dict(max_num_batched_tokens=64, max_model_len=128)),  # scarcer still
])
def test_mtp_lookahead_greedy_equals_plain_and_frees_every_block(ckpt, reference, cache, sched):
    b = EngineBuilder(ckpt).dtype("float32").cache(**cache).scheduler(**sched).speculative("mtp", num_tokens=3)
    engine = b.build()
    assert _generate_checked(engine, _prompts()) == reference
    assert engine.stats.num_accepted_tokens > 0
    if "num_blocks" in cache:
        assert engine.stats.num_preemptions > 0


def test_mtp_lookahead_with_prefix_cache_hits(ckpt, reference):
    engine = EngineBuilder(ckpt).dtype("float32").cache(block_size=4).speculative("mtp", num_tokens=3).build()
    prompts = _prompts()
    assert _generate_checked(engine, prompts) == reference
    s = engine.stats
    before, first = s.num_cached_tokens, (s.num_draft_tokens, s.num_accepted_tokens)
    assert _generate_checked(engine, prompts) == reference
    assert s.num_cached_tokens > before
    # cached blocks carry the MTP layer's KV: drafts stay about as good on the second pass
    second = (s.num_draft_tokens - first[0], s.num_accepted_tokens - first[1])
    assert second[1] / second[0] > 0.8 * first[1] / first[0]


def test_lookahead_takes_only_free_blocks_and_never_preempts():
    """Scheduler level: look-ahead comes last, from blocks nobody's tokens need, oldest request
    first; a request that cannot get it runs its step anyway (fewer drafts next time), and
    release_lookahead gives every block past the computed positions back."""
    from dlengine.cache.block_manager import BlockManager
    from dlengine.config import SchedulerConfig
    from dlengine.engine.request import Request
    from dlengine.engine.scheduler import Scheduler

    bm = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), bm, num_lookahead_tokens=2)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    old = Request("old", list(range(4)), params, arrival_time=0.0)  # 1 block for its prompt
    new = Request("new", list(range(10, 18)), params, arrival_time=1.0)  # 2 blocks
    sched.add_request(old)
    sched.add_request(new)
    out = sched.schedule()
    assert not out.preempted and [s.request for s in out.scheduled] == [old, new]
    # 3 blocks for the prompts, 2 free: old's look-ahead (positions 4-5) takes one, new's another
    assert [s.num_lookahead_tokens for s in out.scheduled] == [2, 2]
    assert len(old.block_ids) == 2 and len(new.block_ids) == 3 and bm.num_free_blocks == 0
    sched.update_after_step(out)
    for s in out.scheduled:
        s.request.append_token(1)
    sched.release_lookahead(out.scheduled)
    assert (len(old.block_ids), len(new.block_ids), bm.num_free_blocks) == (1, 2, 2)
    bm.check_invariants()

    # next step: both decode with 2 drafts (3 tokens each: old needs positions 4-6, one block;
    # new needs 8-10, one block); nothing is left for look-ahead, and nobody is preempted for it
    old.spec_token_ids, new.spec_token_ids = [1, 1], [1, 1]
    out = sched.schedule()
    assert not out.preempted and [s.num_spec_tokens for s in out.scheduled] == [2, 2]
    # old's look-ahead (positions 7-8) needs a block the pool does not have: refused, also
    # partially (position 7 fits its block); new's 11-12: position 11 fits its block, 12 does not
    assert [s.num_lookahead_tokens for s in out.scheduled] == [1, 1]
    assert bm.num_free_blocks == 0
    # rollback: no draft accepted, the computed count moves past the last token only
    for s in out.scheduled:
        s.request.num_computed_tokens += 1
        s.request.append_token(1)
        s.request.spec_token_ids = []
    sched.release_lookahead(out.scheduled)
    # what is left is what the computed positions need (old: 0-4, new: 0-8), nothing more
    assert [len(r.block_ids) for r in (old, new)] == [bm.blocks_needed(5), bm.blocks_needed(9)] == [2, 3]
    assert bm.num_free_blocks == 0
    bm.check_invariants()
    for r in (old, new):
        sched.finish_request(r)
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


def test_speculator_lookahead_must_be_a_count():
    from dlengine.cache.block_manager import BlockManager
    from dlengine.config import SchedulerConfig
    from dlengine.engine.scheduler import Scheduler

    with pytest.raises(ConfigError, match="num_lookahead_tokens"):
        Scheduler(SchedulerConfig(), BlockManager(4, 4), num_lookahead_tokens=-1)


def test_free_blocks_after_refuses_computed_positions():
    from dlengine.cache.block_manager import BlockManager
    from dlengine.engine.request import Request

    bm = BlockManager(4, 4, enable_prefix_caching=False)
    req = Request("r", list(range(6)), SamplingParams(max_tokens=4))
    assert bm.allocate_slots(req, 10)  # 3 blocks
    req.num_computed_tokens = 6
    with pytest.raises(ValueError, match="computed KV"):
        bm.free_blocks_after(req, 5)
    assert bm.free_blocks_after(req, 6) == 1 and len(req.block_ids) == 2
    bm.free(req)
    assert bm.num_free_blocks == 4
    bm.check_invariants()
