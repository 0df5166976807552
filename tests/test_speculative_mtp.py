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
    (dict(block_size=4, num_blocks=40), dict(max_num_batched_tokens=64, max_model_len=256)),
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
    with pytest.raises(ConfigError, match="no multi-token-prediction layers"):
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
class FixedDrafts:
    """Proposes the same tokens for every decoding request: deterministic drafts, some accepted."""

    name = "fixed"

    def __init__(self, drafts: list[int]) -> None:
        self.drafts, self.num_tokens = drafts, len(drafts)

    def propose(self, requests):
        return [list(self.drafts) for _ in requests]


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


N_SAMPLES = 600
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
    """Tokens 2 and 3 sampled at temperature 1 over a 4-token support (top_k=4), plain and with
    drafts, from disjoint seeds: independent samples of the same distribution if verification
    is right. Drafts are the plain run's most frequent tokens 2 and 3, so many are accepted."""
    plain, _ = _sample_tokens(None, 0)
    tok2 = [t[1] for t in plain]
    tok3 = [t[2] for t in plain]
    drafts = [max(set(tok2), key=tok2.count), max(set(tok3), key=tok3.count)]
    return plain, drafts


def test_verification_keeps_the_target_distribution(distribution_samples):
    plain, drafts = distribution_samples
    spec, stats = _sample_tokens(FixedDrafts(drafts), 10 * N_SAMPLES)
    assert stats.num_accepted_tokens > 0.1 * N_SAMPLES  # drafts took part in many samples
    for pos in (1, 2):  # token 1 comes from the prompt step, without drafts
        stat, bound = _chi2_two_sample([t[pos] for t in plain], [t[pos] for t in spec])
        assert stat < bound, (pos, stat, bound)


def test_distribution_test_catches_a_wrong_accept_rule(distribution_samples, monkeypatch):
    """The test above can fail: accepting every draft (the target's samples ignored) shifts the
    histograms far past the bound."""
    from dlengine.engine.runner import StepHandle

    plain, drafts = distribution_samples

    def accept_all(self):
        tokens, out, row = self.token_ids(), [], 0
        for req, k in zip(self.sampled, self.num_drafts or [0] * len(self.sampled)):
            out.append(list(req.spec_token_ids[:k]) + [tokens[row + k]])
            row += 1 + k
        return out

    monkeypatch.setattr(StepHandle, "accepted_tokens", accept_all)
    spec, _ = _sample_tokens(FixedDrafts(drafts), 10 * N_SAMPLES)
    stat, bound = _chi2_two_sample([t[1] for t in plain], [t[1] for t in spec])
    assert stat > bound
