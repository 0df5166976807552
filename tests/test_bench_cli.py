"""`dlengine bench`: the CLI (in-process and as a subprocess), its JSON output, the workloads,
the metrics, the library entry point, and clean errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dlengine import EngineBuilder
from dlengine.bench import BenchError, ThroughputConfig, load_jsonl_requests, random_requests, run_throughput
from dlengine.bench.datasets import length_bounds
from dlengine.bench.metrics import percentile, summarize
from dlengine.cli import build_parser, main

SMALL = ["--num-prompts", "4", "--input-len", "16", "--output-len", "4", "--max-model-len", "128",
         "--max-num-seqs", "8", "--no-progress"]
SUMMARY_KEYS = [
    "engine", "device", "dtype", "attention_backend", "num_requests", "total_input_tokens", "total_output_tokens",
    "elapsed_s", "requests_per_s", "input_tokens_per_s", "output_tokens_per_s", "total_tokens_per_s",
    *[f"{s}_{m}_ms" for m in ("ttft", "tpot", "e2el") for s in ("mean", "p50", "p90", "p99")],
    "num_preemptions", "prefix_cache_hit_tokens", "num_steps", "config", "requests",
]


def run_cli(args, tmp_path, capsys, name="out.json"):
    path = tmp_path / name
    rc = main(["bench", *args, "--json", str(path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(path.read_text()), captured.out


# ------------------------------------------------------------------ CLI
def test_cli_defaults_match_the_config():
    args = build_parser().parse_args(["bench", "throughput"])
    from dlengine.bench.common import coerce_config

    cfg = coerce_config(ThroughputConfig, args)
    assert cfg == ThroughputConfig()
    brief = ("tiny-qwen3", 64, 128, 64, 0.0)
    assert (cfg.model, cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.range_ratio) == brief
    assert cfg.ignore_eos and cfg.prefix_caching and cfg.progress and cfg.temperature == 0.0


def test_bench_defaults_to_throughput_and_writes_json(tmp_path, capsys):
    res, out = run_cli(SMALL, tmp_path, capsys)
    for key in SUMMARY_KEYS:
        assert key in res, key
    assert res["benchmark"] == "throughput" and res["dataset"] == "random"
    assert res["num_requests"] == 4
    assert res["total_input_tokens"] == 4 * 16
    assert res["total_output_tokens"] == 4 * 4  # ignore_eos: exactly output_len each
    assert res["finish_reasons"] == {"length": 4}
    assert [r["output_len"] for r in res["requests"]] == [4] * 4
    assert res["elapsed_s"] > 0 and res["output_tokens_per_s"] == pytest.approx(16 / res["elapsed_s"])
    assert res["total_tokens_per_s"] == pytest.approx(80 / res["elapsed_s"])
    assert 0 < res["p50_ttft_ms"] <= res["p99_ttft_ms"] and res["mean_tpot_ms"] > 0
    assert res["device"].split(":")[0] in ("cpu", "cuda") and res["dtype"] and res["attention_backend"]
    assert res["engine"].startswith("Engine(")
    assert res["config"]["num_prompts"] == 4 and res["config"]["max_model_len"] == 128
    assert res["num_preemptions"] == 0
    for label in ("Requests/s", "Output tokens/s", "TTFT", "TPOT", "Preemptions", "Prefix-cache hit tokens"):
        assert label in out
    assert "Engine(" in out


def test_throughput_subcommand_range_ratio_and_prefix_cache(tmp_path, capsys):
    # one sequence at a time, so every prompt after the first finds the shared 32-token prefix cached
    args = ["throughput", "--num-prompts", "4", "--input-len", "16", "--output-len", "4", "--range-ratio", "0.5",
            "--prefix-len", "32", "--max-num-seqs", "1", "--max-model-len", "128", "--block-size", "16",
            "--no-progress", "--seed", "3"]
    res, _ = run_cli(args, tmp_path, capsys)
    lo_in, hi_in = length_bounds(16, 0.5)
    lo_out, hi_out = length_bounds(4, 0.5)
    for r in res["requests"]:
        assert 32 + lo_in <= r["prompt_len"] <= 32 + hi_in
        assert lo_out <= r["output_len"] <= hi_out
    assert res["total_output_tokens"] == sum(r["output_len"] for r in res["requests"])
    assert res["prefix_cache_hit_tokens"] == 32 * 3
    assert res["max_seqs_per_step"] == 1

    res, _ = run_cli([*args, "--no-prefix-caching"], tmp_path, capsys, "nocache.json")
    assert res["prefix_cache_hit_tokens"] == 0 and res["prefix_caching"] is False


def test_shared_prefix_admitted_together_is_computed_once(tmp_path, capsys):
    # every prompt fits the first step; all but the first wait one step and hit the 32-token prefix
    args = ["throughput", "--num-prompts", "4", "--input-len", "16", "--output-len", "4", "--prefix-len", "32",
            "--max-model-len", "128", "--block-size", "16", "--no-progress", "--seed", "3"]
    res, out = run_cli(args, tmp_path, capsys)
    assert res["prefix_cache_hit_tokens"] == 32 * 3 and res["prefix_cache_hit_requests"] == 3
    assert res["num_prompt_tokens_computed"] == res["total_input_tokens"] - 32 * 3
    assert "Prefix-cache hits (requests)" in out and "3 of 4" in out


def test_jsonl_dataset(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "hello world", "output_len": 5},
        {"prompt": [5, 6, 7, 8]},
        {"prompt": "The quick brown fox jumps over the lazy dog", "output_len": 2},
        {"prompt": [9, 10], "output_len": 7},
    ]
    data.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[2:]))
    res, _ = run_cli(["--dataset", "jsonl", "--dataset-path", str(data), "--output-len", "3", "--num-prompts", "3",
                      "--no-progress"], tmp_path, capsys)
    assert res["dataset"] == f"jsonl:{data}"
    assert res["num_requests"] == 3  # the first --num-prompts lines
    assert [r["output_len"] for r in res["requests"]] == [5, 3, 2]
    assert res["total_output_tokens"] == 10
    assert res["requests"][1]["prompt_len"] == 4

    res, _ = run_cli(["--dataset", "jsonl", "--dataset-path", str(data), "--no-progress"], tmp_path, capsys, "all.json")
    assert res["num_requests"] == 4 and res["total_output_tokens"] == 5 + 64 + 2 + 7


def test_cli_as_subprocess(tmp_path):
    path = tmp_path / "sub.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dlengine.cli", "bench", *SMALL, "--json", str(path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "found in sys.modules" not in proc.stderr  # runpy's double-import warning
    assert "Output tokens/s" in proc.stdout
    res = json.loads(path.read_text())
    assert res["total_output_tokens"] == 16 and res["num_requests"] == 4


@pytest.mark.parametrize("extra, match", [
    (["--model", "{tmp}/no-such-model"], "{tmp}/no-such-model"),
    (["--dataset", "jsonl", "--dataset-path", "{tmp}/missing.jsonl"], "{tmp}/missing.jsonl"),
    (["--dataset", "jsonl"], "dataset_path"),
    (["--input-len", "120", "--output-len", "20", "--max-model-len", "128"], "max_model_len=128"),
    (["--range-ratio", "1.5"], "range_ratio"),
    (["--num-prompts", "0"], "num_prompts"),
    (["--block-size", "12"], "block_size"),
    (["--dtype", "int3"], "int3"),
])
def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys, extra, match):
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    rc = main(["bench", "--num-prompts", "2", "--input-len", "8", "--output-len", "2", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("dlengine bench: error:")
    assert match.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err


def test_bad_jsonl_line_is_named(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    rc = main(["bench", "--dataset", "jsonl", "--dataset-path", str(data), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{data}:2" in err and "prompt" in err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--num-prompts", "many"])
    assert e.value.code == 2
    assert "--num-prompts" in capsys.readouterr().err


# ------------------------------------------------------------------ library
def test_run_throughput_from_python_with_a_built_engine():
    engine = EngineBuilder("tiny-qwen3").cache(num_blocks=64).scheduler(max_num_seqs=4, max_model_len=128).build()
    res = run_throughput({"num_prompts": 6, "input_len": 8, "output_len": 3}, engine=engine, progress=False)
    assert res["num_requests"] == 6 and res["total_output_tokens"] == 18
    assert res["max_seqs_per_step"] <= 4
    assert not engine.has_unfinished_requests()
    # the engine is still usable, and a second run counts only its own steps
    again = run_throughput(ThroughputConfig(num_prompts=2, input_len=8, output_len=2, progress=False, num_warmup=0),
                           engine=engine)
    assert again["total_output_tokens"] == 4 and again["num_steps"] == 2
    with pytest.raises(BenchError, match="unknown ThroughputConfig option"):
        run_throughput({"num_prompt": 3}, engine=engine)


# ------------------------------------------------------------------ workloads and metrics
def test_random_requests_lengths_vocab_and_determinism():
    reqs = random_requests(200, 20, 10, vocab_size=50, range_ratio=0.5, prefix_len=3, exclude_ids=[1, 0, None], seed=7)
    lo, hi = length_bounds(20, 0.5)
    assert (lo, hi) == (10, 30)
    lens = [r.prompt_len - 3 for r in reqs]
    assert min(lens) >= lo and max(lens) <= hi and len(set(lens)) > 5
    assert all(5 <= r.output_len <= 15 for r in reqs)
    assert all(0 not in r.prompt and 1 not in r.prompt and max(r.prompt) < 50 for r in reqs)
    assert len({tuple(r.prompt[:3]) for r in reqs}) == 1  # the shared prefix
    again = random_requests(200, 20, 10, vocab_size=50, range_ratio=0.5, prefix_len=3, exclude_ids=[1, 0], seed=7)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]
    fixed = random_requests(5, 16, 4, vocab_size=512)
    assert all(r.prompt_len == 16 and r.output_len == 4 for r in fixed)
    assert length_bounds(1, 0.9) == (1, 2)
    with pytest.raises(BenchError, match="range_ratio"):
        length_bounds(10, 1.0)


@pytest.mark.parametrize("line, match", [
    ("not json", "not valid JSON"),
    ('["a list"]', "JSON object"),
    ('{"prompt": ""}', "empty"),
    ('{"prompt": [1, "x"]}', "list of integers"),
    ('{"prompt": 5}', "string or a list"),
    ('{"prompt": "x", "output_len": 0}', "output_len"),
])
def test_jsonl_loader_errors(tmp_path, line, match):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(BenchError, match=match) as e:
        load_jsonl_requests(p, None, 4)
    assert f"{p}:2" in str(e.value)


def test_percentiles_match_numpy():
    vals = list(np.random.default_rng(0).exponential(size=101))
    s = summarize(vals)
    assert s["mean"] == pytest.approx(np.mean(vals))
    for p in (50, 90, 99):
        assert s[f"p{p}"] == pytest.approx(np.percentile(vals, p))
    assert summarize([1.0, 2.0, 3.0, 4.0])["p50"] == 2.5
    assert summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert percentile([3.0], 99) == 3.0


# ------------------------------------------------------------------ CPU threads
def test_cpu_thread_choice(monkeypatch):
    import torch

    from dlengine.bench import cpu_threads as ct

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(ct, "physical_cores", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))  # 8 cores, 2 threads each
    for busy, threads in ((0.0, 7), (9.6, 6), (15.0, 1), (40.0, 1)):  # one core kept spare
        monkeypatch.setattr(ct, "busy_cpus", lambda busy=busy: busy)
        info = ct.choose_cpu_threads()
        assert (info["threads"], info["source"]) == (threads, "auto")
    assert "busy elsewhere" in ct.describe_cpu_threads(info)
    assert ct.choose_cpu_threads(3) == {"threads": 3, "source": "--threads"}
    with pytest.raises(BenchError, match="threads must be a positive integer, got 0"):
        ct.choose_cpu_threads(0)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert ct.choose_cpu_threads()["source"] == "OMP_NUM_THREADS"
    before = torch.get_num_threads()
    with ct.cpu_threads("cpu", 1) as info:
        assert torch.get_num_threads() == 1 and info["threads"] == 1
    assert torch.get_num_threads() == before  # restored
    with ct.cpu_threads("cuda:0", 1) as info:
        assert info is None and torch.get_num_threads() == before


def test_busy_cpus_and_physical_cores_read_this_machine():
    from dlengine.bench.cpu_threads import busy_cpus, physical_cores

    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    assert busy_cpus(samples=2, interval_s=0.0) >= 0.0


def test_bench_records_and_prints_its_cpu_threads(tmp_path, capsys):
    res, out = run_cli(["--num-prompts", "2", "--input-len", "8", "--output-len", "2", "--max-model-len", "64",
                        "--threads", "1", "--no-progress"], tmp_path, capsys)
    assert res["cpu_threads"] == {"threads": 1, "source": "--threads"} and res["config"]["threads"] == 1
    assert "CPU threads:  1 (--threads)" in out
