"""Forced acceptance for benchmarking speculative decoding (dlengine/speculative/acceptance.py,
`EngineBuilder.speculative(..., forced_acceptance=p)`, `--spec-forced-acceptance P`).

The rate asserted is the per-draft conditional one: P(draft i kept | drafts 1..i-1 kept) = p,
measured as kept drafts / drafts tried, where a step with k drafts tries drafts until the first
rejection (accepted + 1 tries, or k when all are kept). The bench's `acceptance_rate` (kept /
proposed) is a different number: about (p + ... + p^k) / k."""

import json
import math

import numpy as np
import pytest

from dlengine import EngineBuilder, SamplingParams
from dlengine.cli import main
from dlengine.config import ConfigError
from dlengine.speculative.acceptance import ExactMatchAcceptance, ForcedAcceptance
from dlengine.testing import tiny_checkpoint
from dlengine.testing.mtp import PROMPT_LEN, SEQ_LEN, mtp_training_prompts

from conftest import make_prompts

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
# prompts that repeat (n-gram drafts found) and random ones (mostly none)
NGRAM_PROMPTS = [[5, 6, 7, 8] * 6, list(range(2, 30)) * 2, *make_prompts(3, lengths=(4, 17, 33))]


def _conditional_rate(records) -> tuple[float, int]:
    """(kept drafts / drafts tried, drafts tried) over (num_drafts, num_accepted) records."""
    kept = sum(a for _, a in records)
    tried = sum(a + (a < d) for d, a in records)
    return kept / tried, tried


def _assert_near(rate: float, p: float, n: int, sigmas: float = 4.5) -> None:
    bound = sigmas * math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) <= bound, f"rate {rate:.4f} vs {p} over {n} tries (bound {bound:.4f})"


def _assert_pool_full(engine) -> None:
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks


# ---------------------------------------------------------------------------- the policies alone
def test_exact_match_keeps_the_matching_prefix():
    rule = ExactMatchAcceptance()
    assert rule.num_accepted([4, 5, 6], [4, 5, 9, 1]) == 2
    assert rule.num_accepted([4, 5], [4, 5, 7]) == 2
    assert rule.num_accepted([4], [3, 3]) == 0
    assert rule.num_accepted([], [3]) == 0


def test_forced_acceptance_draws_geometric_runs():
    k, p, n = 4, 0.6, 20000
    rule = ForcedAcceptance(p, seed=3)
    counts = np.array([rule.num_accepted([0] * k, [1] * (k + 1)) for _ in range(n)])
    rate, tried = _conditional_rate([(k, int(a)) for a in counts])
    _assert_near(rate, p, tried)
    for i in range(1, k + 1):  # P(at least i kept) = p^i
        _assert_near(float((counts >= i).mean()), p**i, n)
    # reproducible from the seed, and the seed matters
    again = ForcedAcceptance(p, seed=3)
    assert [again.num_accepted([0] * k, [0] * (k + 1)) for _ in range(200)] == counts[:200].tolist()
    other = ForcedAcceptance(p, seed=4)
    assert [other.num_accepted([0] * k, [0] * (k + 1)) for _ in range(200)] != counts[:200].tolist()
    # the values of drafts and targets play no part
    assert ForcedAcceptance(1.0).num_accepted([1, 2, 3], [9, 9, 9, 9]) == 3
    assert ForcedAcceptance(0.0).num_accepted([1, 2, 3], [1, 2, 3, 4]) == 0
    assert ForcedAcceptance(0.5).num_accepted([], [7]) == 0


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), float("inf"), "0.5", True, [0.5]])
def test_rate_outside_unit_interval_is_refused(rate):
    with pytest.raises(ConfigError, match=r"forced_acceptance must be a number in \[0, 1\]"):
        EngineBuilder("tiny-qwen3").speculative("ngram", num_tokens=2, forced_acceptance=rate).config()


def test_forced_acceptance_needs_a_speculator():
    with pytest.raises(ConfigError, match="needs a speculator"):
        EngineBuilder("tiny-qwen3").speculative(None, forced_acceptance=0.5).config()
    cfg = EngineBuilder("tiny-qwen3").speculative("ngram", num_tokens=2, forced_acceptance=1).config()
    assert cfg.speculative_forced_acceptance == 1.0
    assert EngineBuilder("tiny-qwen3").speculative("ngram").config().speculative_forced_acceptance is None


def test_cli_refusals(capsys):
    args = ["bench", "latency", "--batch-size", "1", "--input-len", "8", "--output-len", "4", "--no-progress",
            "--peak-bandwidth-gbps", "10", "--peak-tflops", "1"]
    assert main([*args, "--spec-forced-acceptance", "0.5"]) == 1
    assert "needs speculative decoding (--speculative mtp | ngram)" in capsys.readouterr().err
    assert main([*args, "--speculative", "ngram", "--spec-forced-acceptance", "1.5"]) == 1
    assert "forced_acceptance must be a number in [0, 1]" in capsys.readouterr().err
    # benchmarks only: the server takes no such flag
    with pytest.raises(SystemExit) as exc:
        main(["serve", "tiny-qwen3", "--speculative", "ngram", "--spec-forced-acceptance", "0.5"])
    assert exc.value.code == 2
    assert "--spec-forced-acceptance" in capsys.readouterr().err


# ---------------------------------------------------------------------------- n-gram on tiny-qwen3
def _ngram_engine(p, k=3, seed=0):
    return (EngineBuilder("tiny-qwen3").dtype("float32").seed(seed)
            .speculative("ngram", num_tokens=k, forced_acceptance=p).build())


def test_ngram_forced_one_keeps_every_draft():
    engine = _ngram_engine(1.0)
    outs = engine.generate(NGRAM_PROMPTS, GREEDY)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)  # max_tokens holds with drafts kept
    s = engine.stats
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens == s.num_draft_tokens
    assert s.acceptance_rate == 1.0
    # n-gram proposes up to k (often fewer): the mean is 1 + the drafts actually proposed per step
    assert s.mean_accepted_length == pytest.approx(1 + s.num_draft_tokens / s.num_spec_verifications)
    assert s.mean_accepted_length > 1.5
    assert s.forced_acceptance == 1.0 and "forced_acceptance=1.0" in repr(s)
    spec = engine.describe()["speculative"]
    assert spec["forced_acceptance"] == 1.0 and "forced acceptance 1" in spec["note"]
    assert "forced acceptance 1" in repr(engine)
    _assert_pool_full(engine)
    engine.stats.reset()
    assert engine.stats.forced_acceptance == 1.0  # a setting, kept across resets


def test_ngram_forced_zero_gives_plain_greedy_tokens():
    plain = EngineBuilder("tiny-qwen3").dtype("float32").build()
    ref = [o.token_ids for o in plain.generate(NGRAM_PROMPTS, GREEDY)]
    engine = _ngram_engine(0.0)
    assert [o.token_ids for o in engine.generate(NGRAM_PROMPTS, GREEDY)] == ref
    s = engine.stats
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens == 0 and s.mean_accepted_length == 1.0
    _assert_pool_full(engine)


class RecordingDrafts:
    """Always proposes k drafts (the last token again) and records every verification."""

    name = "recording"

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.records: list[tuple[int, int]] = []

    def propose(self, requests):
        return [[r.all_token_ids[-1]] * self.num_tokens for r in requests]

    def on_verified(self, request, num_drafts, num_accepted):
        self.records.append((num_drafts, num_accepted))


def _recording_run(p, seed, params=GREEDY, k=3):
    spec = RecordingDrafts(k)
    engine = (EngineBuilder("tiny-qwen3").dtype("float32").cache(block_size=4).seed(seed)
              .speculative(spec, num_tokens=k, forced_acceptance=p).build())
    outs = engine.generate(make_prompts(8, lengths=(3, 9, 17, 30, 5, 12, 40, 21)), params)
    return engine, spec, [o.token_ids for o in outs]


def test_forced_rate_is_the_per_draft_conditional_acceptance():
    p = 0.6
    engine, spec, outs = _recording_run(p, seed=0, params=SamplingParams(max_tokens=60, temperature=0.0,
                                                                         ignore_eos=True))
    assert all(len(o) == 60 for o in outs)
    rate, tried = _conditional_rate(spec.records)
    assert tried > 300
    _assert_near(rate, p, tried)
    # the stats agree with what the proposer was told
    s = engine.stats
    assert s.num_accepted_tokens == sum(a for _, a in spec.records)
    assert s.num_draft_tokens == sum(d for d, _ in spec.records)
    # with k = 3 drafts a step: tokens per step 1 + p + p^2 + p^3 (only steps near max_tokens carry fewer)
    full = [a for d, a in spec.records if d == 3]
    assert np.mean(full) == pytest.approx(p + p**2 + p**3, abs=0.2)
    _assert_pool_full(engine)


def test_forced_runs_are_reproducible_from_the_engine_seed():
    _, spec_a, out_a = _recording_run(0.6, seed=1)
    _, spec_b, out_b = _recording_run(0.6, seed=1)
    _, spec_c, _ = _recording_run(0.6, seed=2)
    assert out_a == out_b and spec_a.records == spec_b.records
    assert spec_c.records != spec_a.records


def test_forced_acceptance_with_sampling():
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=5, ignore_eos=True)
    engine, spec, outs = _recording_run(0.6, seed=0, params=params)
    assert all(len(o) == 20 for o in outs)
    assert 0 < engine.stats.num_accepted_tokens < engine.stats.num_draft_tokens
    _assert_pool_full(engine)


# ---------------------------------------------------------------------------- MTP on tiny-deepseek-v3-mtp
MTP_GREEDY = SamplingParams(max_tokens=SEQ_LEN - PROMPT_LEN, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def mtp_ckpt():
    return tiny_checkpoint("deepseek-v3-mtp")


def _mtp_prompts():
    rng = np.random.default_rng(5)
    return mtp_training_prompts()[:4] + [rng.integers(2, 512, n).tolist() for n in (3, 21)]


def _mtp_engine(ckpt, p, k=3, **cache):
    return (EngineBuilder(ckpt).dtype("float32").cache(**cache)
            .speculative("mtp", num_tokens=k, forced_acceptance=p).build())


def test_mtp_forced_one_keeps_every_draft(mtp_ckpt):
    # 4-token blocks: kept drafts cross block ends, the chain's look-ahead included
    engine = _mtp_engine(mtp_ckpt, 1.0, block_size=4)
    outs = engine.generate(_mtp_prompts(), MTP_GREEDY)
    assert all(len(o.token_ids) == MTP_GREEDY.max_tokens for o in outs)
    s = engine.stats
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens == s.num_draft_tokens
    assert s.mean_accepted_length == pytest.approx(1 + s.num_draft_tokens / s.num_spec_verifications)
    # MTP chains k drafts every step but the last ones of a request (max_tokens cuts them)
    assert s.num_draft_tokens / s.num_spec_verifications > 2.5
    assert engine.describe()["speculative"]["forced_acceptance"] == 1.0
    _assert_pool_full(engine)


def test_mtp_forced_zero_gives_plain_greedy_tokens(mtp_ckpt):
    prompts = _mtp_prompts()
    plain = EngineBuilder(mtp_ckpt).dtype("float32").build()
    ref = [o.token_ids for o in plain.generate(prompts, MTP_GREEDY)]
    engine = _mtp_engine(mtp_ckpt, 0.0)
    # the trained prompts' drafts would be accepted by matching; forced to 0 none is
    assert [o.token_ids for o in engine.generate(prompts, MTP_GREEDY)] == ref
    s = engine.stats
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens == 0
    _assert_pool_full(engine)


def test_mtp_forced_rate(mtp_ckpt):
    p = 0.6
    engine = _mtp_engine(mtp_ckpt, p, k=1)  # one draft a step: kept / proposed is the conditional rate
    engine.generate(mtp_training_prompts()[:12], MTP_GREEDY)
    s = engine.stats
    _assert_near(s.acceptance_rate, p, s.num_draft_tokens)
    _assert_pool_full(engine)


# ---------------------------------------------------------------------------- the benchmarks
def test_bench_latency_labels_forced_acceptance(mtp_ckpt, tmp_path, capsys):
    path = tmp_path / "lat.json"
    rc = main(["bench", "latency", "--model", mtp_ckpt, "--batch-size", "2", "--input-len", "8",
               "--output-len", "12", "--num-iters", "1", "--num-warmup-iters", "0", "--no-progress",
               "--threads", "1", "--peak-bandwidth-gbps", "10", "--peak-tflops", "1",
               "--speculative", "mtp", "--num-speculative-tokens", "2", "--spec-forced-acceptance", "1.0",
               "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(path.read_text())
    assert res["spec_forced_acceptance"] == 1.0
    assert res["config"]["spec_forced_acceptance"] == 1.0
    assert res["speculative"]["forced_acceptance"] == 1.0
    assert res["spec_accepted_tokens"] == res["spec_draft_tokens"] > 0
    assert res["decode_tokens_per_request_step"] > 1.5
    assert any("forced" in n for n in res["notes"])
    assert "Draft tokens accepted (forced)" in out and "Tokens per request-step (forced)" in out
    assert "forced acceptance 1" in out  # the engine line


def test_bench_throughput_labels_forced_acceptance(tmp_path):
    from dlengine.bench import format_report, run_throughput

    engine = (EngineBuilder("tiny-qwen3").dtype("float32")
              .speculative(RecordingDrafts(2), num_tokens=2, forced_acceptance=0.6).build())
    result = run_throughput(engine=engine, num_prompts=4, input_len=8, output_len=16, progress=False,
                            peak_bandwidth_gbps=10.0, peak_tflops=1.0)
    assert result["spec_forced_acceptance"] == 0.6 and result["spec_draft_tokens"] > 0
    report = format_report(result)
    assert "Draft tokens accepted (forced)" in report and "Mean accepted length (forced)" in report
    # a real run says so too: no forced rate, no label
    plain = EngineBuilder("tiny-qwen3").dtype("float32").speculative(RecordingDrafts(2), num_tokens=2).build()
    result = run_throughput(engine=plain, num_prompts=2, input_len=8, output_len=8, progress=False,
                            peak_bandwidth_gbps=10.0, peak_tflops=1.0)
    assert result["spec_forced_acceptance"] is None
    assert "(forced)" not in format_report(result)


def test_server_refuses_a_forced_acceptance_engine():
    """Forced acceptance is for benchmarks: its outputs are not the model's, so no server may
    hand them to clients (the CLI has no such flag; a library caller gets a ConfigError)."""
    pytest.importorskip("fastapi")
    from dlengine.serve.app import create_app
    from dlengine.serve.state import ServeConfig

    engine = (EngineBuilder(tiny_checkpoint("qwen3")).dtype("float32")
              .speculative("ngram", num_tokens=2, forced_acceptance=0.5).build())
    try:
        with pytest.raises(ConfigError, match="forced_acceptance"):
            create_app(engine, ServeConfig(served_model_name="tiny"))
    finally:
        engine.close()
