"""Benchmarks, usable from Python and from `dlengine bench`.

    from dlengine.bench import run_throughput, run_latency
    result = run_throughput(num_prompts=16, input_len=64, output_len=32, progress=False)
    print(result["output_tokens_per_s"])
    print(run_latency(batch_size=1, input_len=128, output_len=32)["decode_ms_per_token"])

    from dlengine.bench import run_serve_bench      # a running OpenAI-compatible server, over HTTP
    print(run_serve_bench(base_url="http://127.0.0.1:8000", request_rate=8.0)["p99_ttft_ms"])
"""

from dlengine.bench.common import BenchError, EngineArgs, build_engine
from dlengine.bench.compare import compare_transformers
from dlengine.bench.datasets import BenchRequest, load_jsonl_requests, random_requests
from dlengine.bench.latency import LatencyConfig, run_latency
from dlengine.bench.metrics import format_latency_report, format_report
from dlengine.bench.peaks import measure_peaks, resolve_peaks
from dlengine.bench.roofline import ModelCost
from dlengine.bench.serve_bench import ServeBenchConfig, run_serve_bench
from dlengine.bench.serve_metrics import format_serve_report
from dlengine.bench.throughput import ThroughputConfig, run_throughput

__all__ = [
    "BenchError",
    "BenchRequest",
    "EngineArgs",
    "LatencyConfig",
    "ModelCost",
    "ServeBenchConfig",
    "ThroughputConfig",
    "build_engine",
    "compare_transformers",
    "format_latency_report",
    "format_report",
    "format_serve_report",
    "load_jsonl_requests",
    "measure_peaks",
    "random_requests",
    "resolve_peaks",
    "run_latency",
    "run_serve_bench",
    "run_throughput",
]
