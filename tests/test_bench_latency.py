"""`dlengine bench latency`, the MBU/MFU estimates (also in `throughput`), and peak measurement."""

import json
import math

import pytest
import torch

from dlengine import EngineBuilder
from dlengine.bench import BenchError, LatencyConfig, run_latency, run_throughput
from dlengine.bench import peaks as peaks_mod
from dlengine.bench.common import coerce_config
from dlengine.bench.peaks import measure_peaks, resolve_peaks
from dlengine.bench.roofline import ModelCost
from dlengine.cli import build_parser, main

TINY = ["--batch-size", "2", "--input-len", "16", "--output-len", "4", "--max-model-len", "128", "--no-progress"]
GIVEN = {"peak_bandwidth_gbps": 50.0, "peak_tflops": 0.5}


def finite_pos(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def engine():
    return EngineBuilder("tiny-qwen3").cache(num_blocks=64).scheduler(max_num_seqs=8, max_model_len=128).build()


# ------------------------------------------------------------------ latency
def test_latency_cli_defaults_match_the_config():
    cfg = coerce_config(LatencyConfig, build_parser().parse_args(["bench", "latency"]))
    assert cfg == LatencyConfig()
    assert (cfg.batch_size, cfg.input_len, cfg.output_len, cfg.num_iters, cfg.num_warmup_iters) == (1, 512, 256, 3, 1)
    assert cfg.peak_bandwidth_gbps is None and cfg.peak_tflops is None


def test_latency_cli_writes_json_and_prints_a_table(tmp_path, capsys):
    path = tmp_path / "lat.json"
    rc = main(["bench", "latency", *TINY, "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(path.read_text())
    assert res["benchmark"] == "latency"
    assert (res["batch_size"], res["input_len"], res["output_len"], res["num_iters"]) == (2, 16, 4, 3)
    for key in ("prefill_ms", "prefill_tokens_per_s", "decode_ms_per_token", "p50_decode_ms_per_token",
                "p90_decode_ms_per_token", "decode_tokens_per_s", "e2e_ms", "output_tokens_per_s",
                "decode_achieved_gbps", "decode_mbu", "prefill_achieved_tflops", "prefill_mfu"):
        assert finite_pos(res[key]), (key, res[key])
    assert res["p50_decode_ms_per_token"] <= res["p90_decode_ms_per_token"]
    assert res["e2e_ms"] > res["prefill_ms"]
    assert res["num_prefill_steps"] == 1 and res["num_decode_steps"] == 3  # 16-token prompts: one step
    assert len(res["iterations"]) == 3
    assert all(it["prefix_cache_hit_tokens"] == 0 and it["preemptions"] == 0 for it in res["iterations"])
    assert res["peaks"]["kind"] == "cpu" and res["peaks"]["bandwidth_source"] == "measured"
    assert res["decode_mean_context"] == 16 + 4 / 2
    assert res["config"]["batch_size"] == 2
    for label in ("Prefill (ms)", "Decode ms / token", "Decode MBU (estimate)", "Prefill MFU (estimate)", "[cpu]"):
        assert label in out


def test_run_latency_in_process_on_a_built_engine(engine):
    res = run_latency(batch_size=2, input_len=16, output_len=4, num_iters=2, num_warmup_iters=0, progress=False,
                      engine=engine, **GIVEN)
    assert not engine.has_unfinished_requests()
    assert len(res["iterations"]) == 2
    assert res["peaks"]["copy_gbps"] == 50.0 and res["peaks"]["tflops_source"] == "given"
    cost = ModelCost.from_engine(engine)
    # the formulas in docs/bench.md
    step_bytes = cost.decode_weight_bytes + 2 * (16 + 2) * cost.kv_bytes_per_token
    assert res["decode_bytes_per_step"] == pytest.approx(step_bytes)
    assert res["decode_mbu"] == pytest.approx(step_bytes / (res["decode_ms_per_token"] / 1e3) / 1e9 / 50.0)
    flops = 2 * (2 * cost.body_params * 16 + 2 * cost.lm_head_params + 4 * 2 * 4 * 16 * 16**2 / 2)
    assert res["prefill_flops"] == pytest.approx(flops)
    assert res["prefill_mfu"] == pytest.approx(flops / (res["prefill_ms"] / 1e3) / 1e12 / 0.5)
    assert res["decode_tokens_per_s"] == pytest.approx(2 / (res["decode_ms_per_token"] / 1e3), rel=0.3)
    # a second call on the same engine draws new prompts: no prefill served from the prefix cache
    again = run_latency(batch_size=2, input_len=16, output_len=4, num_iters=1, num_warmup_iters=0, progress=False,
                        engine=engine, **GIVEN)
    assert again["iterations"][0]["prefix_cache_hit_tokens"] == 0 and not again["notes"]


def test_latency_mbu_counts_only_full_batch_decode_steps():
    """With a chunked prefill the first requests decode during the prefill phase and finish
    early; the tail steps then run fewer requests and must not be set against a full batch's
    bytes (they made the MBU read over 100% on DeepSeek-V3 dims)."""
    chunked = (EngineBuilder("tiny-qwen3").scheduler(max_num_batched_tokens=48, max_model_len=128)
               .cache(block_size=16).build())
    res = run_latency(batch_size=3, input_len=40, output_len=6, num_iters=1, num_warmup_iters=0, progress=False,
                      engine=chunked, **GIVEN)
    assert res["num_prefill_steps"] > 1 and any("full-batch" in n for n in res["notes"])
    assert 0 < res["num_full_batch_decode_steps"] < res["num_decode_steps"]
    assert res["decode_mbu"] == pytest.approx(
        res["decode_bytes_per_step"] / (res["full_batch_decode_ms_per_token"] / 1e3) / 1e9 / 50.0)


def test_latency_mbu_without_a_full_batch_step_uses_each_steps_own_batch():
    """When the prefill phase outlasts the first requests' outputs no decode step runs the whole
    batch: the MBU must set each step against the requests it ran (not against B requests, which
    read 149% on an H100 at 64 x 8k), and the table says how to get full-batch steps."""
    chunked = (EngineBuilder("tiny-qwen3").scheduler(max_num_batched_tokens=40, max_model_len=128)
               .cache(block_size=16).build())
    res = run_latency(batch_size=4, input_len=40, output_len=3, num_iters=1, num_warmup_iters=0, progress=False,
                      engine=chunked, **GIVEN)
    assert res["num_full_batch_decode_steps"] == 0 and res["full_batch_decode_ms_per_token"] is None
    assert any("--synthetic-context" in n for n in res["notes"])
    # every decode step ran fewer than B requests, so the rate is below B requests' bytes over the mean step
    assert 0 < res["decode_achieved_gbps"] < res["decode_bytes_per_step"] / (res["decode_ms_per_step"] / 1e3) / 1e9


@pytest.mark.parametrize("overrides, match", [
    ({"batch_size": 9}, "max_num_seqs"),
    ({"input_len": 120, "output_len": 20}, "max_model_len=128"),
    ({"num_iters": 0}, "num_iters"),
    ({"peak_tflops": -1.0}, "peak_tflops"),
])
def test_latency_bad_settings(engine, overrides, match):
    with pytest.raises(BenchError, match=match):
        run_latency({"batch_size": 2, "input_len": 16, "output_len": 4, "progress": False, **GIVEN, **overrides},
                    engine=engine)
    assert not engine.has_unfinished_requests()


def test_latency_checks_the_kv_cache_holds_the_batch():
    small = EngineBuilder("tiny-qwen3").cache(num_blocks=4, block_size=16).scheduler(max_model_len=64).build()
    with pytest.raises(BenchError, match="needs 6 KV blocks"):
        run_latency(batch_size=3, input_len=20, output_len=4, progress=False, engine=small, **GIVEN)


def test_latency_cli_error_is_one_line(capsys):
    rc = main(["bench", "latency", *TINY, "--max-num-seqs", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("dlengine bench: error:") and "max_num_seqs" in err and "Traceback" not in err


# ------------------------------------------------------------------ peaks
def test_measure_peaks_on_cpu():
    p = measure_peaks("cpu", copy_bytes=16 << 20, gemm_n=128, repeats=3)
    assert p["kind"] == "cpu" and p["gemm_dtype"] == "float32" and p["gemm_n"] == 128 and p["copy_bytes"] == 16 << 20
    assert finite_pos(p["copy_gbps"]) and finite_pos(p["bf16_tflops"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a build or machine without CUDA")
@pytest.mark.parametrize("fn", [measure_peaks, resolve_peaks])
def test_peaks_on_cuda_without_cuda_is_a_clear_error(fn):
    with pytest.raises(BenchError, match="cannot measure peaks on 'cuda'.*--peak-bandwidth-gbps"):
        fn("cuda")


def test_peaks_print_with_units_that_keep_their_digits():
    from dlengine.bench.metrics import _peaks_line, format_gbps, format_tflops

    assert [format_tflops(v) for v in (745.3, 1.234, 0.06705, 1.2e-5, None)] == [
        "745 TFLOP/s", "1.23 TFLOP/s", "67.0 GFLOP/s", "12.0 MFLOP/s", "-"]
    assert [format_gbps(v) for v in (2950.1, 33.558, 0.42, 0.0)] == ["2,950 GB/s", "33.6 GB/s", "420 MB/s", "0 GB/s"]
    cpu = {"copy_gbps": 33.56, "bf16_tflops": 0.0671, "gemm_dtype": "float32", "kind": "cpu",
           "bandwidth_source": "measured", "tflops_source": "measured"}
    assert _peaks_line(cpu) == "33.6 GB/s, 67.1 GFLOP/s float32 [cpu]"  # was "34 GB/s, 0.1 TFLOP/s [cpu]"
    gpu = {**cpu, "copy_gbps": 2950.0, "bf16_tflops": 745.3, "gemm_dtype": "bfloat16", "kind": "cuda",
           "bandwidth_source": "given"}
    assert _peaks_line(gpu) == "2,950 GB/s (given), 745 TFLOP/s"


def test_given_peaks_skip_measurement(monkeypatch, engine):
    def boom(*a, **k):
        raise AssertionError("measured although the value was given")

    monkeypatch.setattr(peaks_mod, "_CACHE", {})
    monkeypatch.setattr(peaks_mod, "_measure_copy", boom)
    monkeypatch.setattr(peaks_mod, "_measure_gemm", boom)
    p = resolve_peaks("cpu", 100, 2.5)
    assert (p["copy_gbps"], p["bf16_tflops"], p["bandwidth_source"], p["tflops_source"]) == (100.0, 2.5, "given", "given")
    res = run_throughput(num_prompts=2, input_len=8, output_len=3, num_warmup=0, progress=False, engine=engine,
                         peak_bandwidth_gbps=100, peak_tflops=2.5)
    assert res["peaks"]["copy_gbps"] == 100.0 and finite_pos(res["mbu_est"])
    # one given, the other measured (only that one)
    monkeypatch.setattr(peaks_mod, "_measure_gemm", lambda *a, **k: {"bf16_tflops": 7.0, "gemm_dtype": "float32"})
    p = resolve_peaks("cpu", peak_bandwidth_gbps=100)
    assert p["bf16_tflops"] == 7.0 and p["tflops_source"] == "measured" and p["bandwidth_source"] == "given"
    with pytest.raises(BenchError, match="peak_bandwidth_gbps"):
        resolve_peaks("cpu", peak_bandwidth_gbps=0)


# ------------------------------------------------------------------ estimates
def test_model_cost_counts_tied_weights_once_and_skips_an_untied_embedding():
    tied = EngineBuilder("tiny-qwen3").cache(num_blocks=8).max_model_len(128).build()
    c = ModelCost.from_engine(tied)
    m = tied.config.model
    assert c.num_params == sum(p.numel() for p in tied.model.parameters())
    assert c.lm_head_params == m.vocab_size * m.hidden_size
    assert c.body_params == c.num_params - c.lm_head_params  # tied: one table
    assert c.decode_weight_bytes == c.param_bytes == c.num_params * 4
    assert c.kv_bytes_per_token == m.num_hidden_layers * 2 * m.num_key_value_heads * m.head_dim * 4
    untied = EngineBuilder("tiny-qwen3-untied").cache(num_blocks=8).max_model_len(128).build()
    u = ModelCost.from_engine(untied)
    table = untied.config.model.vocab_size * untied.config.model.hidden_size
    assert u.body_params == u.num_params - 2 * table
    assert u.decode_weight_bytes == u.param_bytes - table * 4
    # a request = its prefill + one decode token per further output token
    P, O = 10, 5
    assert u.request_flops(P, 1) == u.prefill_flops(P)
    assert u.request_flops(P, O) == pytest.approx(u.prefill_flops(P) + sum(u.decode_flops(P + k - 1)
                                                                          for k in range(2, O + 1)))
    assert u.request_decode_kv_bytes(P, O) == pytest.approx(sum((P + k - 1) * u.kv_bytes_per_token
                                                                for k in range(2, O + 1)))
    assert u.prefill_flops(P, num_cached=4) < u.prefill_flops(P)


def test_throughput_reports_mbu_and_mfu(engine, capsys):
    res = run_throughput(num_prompts=3, input_len=12, output_len=4, num_warmup=0, progress=False, engine=engine,
                         **GIVEN)
    cost = ModelCost.from_engine(engine)
    assert res["num_decode_steps"] == 3  # one prefill step, then 3 decode steps for all 3 requests
    kv = 3 * sum((12 + k - 1) * cost.kv_bytes_per_token for k in range(2, 5))
    assert res["est_decode_bytes"] == pytest.approx(cost.decode_weight_bytes * 3 + kv)
    assert res["mbu_est"] == pytest.approx(res["est_decode_bytes"] / res["elapsed_s"] / 1e9 / 50.0)
    assert res["est_flops"] == pytest.approx(3 * cost.request_flops(12, 4))
    assert res["mfu_est"] == pytest.approx(res["est_flops"] / res["elapsed_s"] / 1e12 / 0.5)
    from dlengine.bench import format_report

    text = format_report(res)
    assert "Decode MBU (estimate)" in text and "MFU (estimate)" in text and "(given)" in text


def test_benches_on_an_async_scheduling_engine():
    # async scheduling (the CUDA default) hands a step's tokens out one step() later and computes one
    # step past the last token: phases must still be split right, and the engine left idle
    eng = (EngineBuilder("tiny-qwen3").async_scheduling(True).cache(num_blocks=64)
           .scheduler(max_num_seqs=8, max_model_len=128).build())
    from dlengine import SamplingParams

    eng.generate([[5, 6, 7]], SamplingParams(max_tokens=3))  # may leave its last step in flight
    res = run_latency(batch_size=2, input_len=16, output_len=4, num_iters=2, num_warmup_iters=0, progress=False,
                      engine=eng, **GIVEN)
    assert [(it["num_prefill_steps"], it["num_decode_steps"]) for it in res["iterations"]] == [(1, 3), (1, 3)]
    assert not res["notes"] and not eng.has_unfinished_requests()
    res = run_throughput(num_prompts=3, input_len=12, output_len=4, progress=False, engine=eng, **GIVEN)
    assert res["total_output_tokens"] == 12 and res["finish_reasons"] == {"length": 3}
    assert not eng.has_unfinished_requests()
