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


def test_mtp_refuses_expert_parallelism_and_cuda_graphs(ckpt):
    with pytest.raises(ConfigError, match="MTP layer.s MoE"):
        EngineBuilder(ckpt).speculative("mtp", num_tokens=1).parallel(attention_dp=2, ffn_ep=2).config()
    with pytest.raises(ConfigError, match="cuda_graphs"):
        EngineBuilder(ckpt).speculative("mtp", num_tokens=1).cuda_graphs(True).config()


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
