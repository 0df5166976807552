"""Benchmarks, usable from Python and from `dlengine bench`.

    from dlengine.bench import run_throughput
    result = run_throughput(num_prompts=16, input_len=64, output_len=32, progress=False)
    print(result["output_tokens_per_s"])
"""

from dlengine.bench.common import BenchError, EngineArgs, build_engine
from dlengine.bench.datasets import BenchRequest, load_jsonl_requests, random_requests
from dlengine.bench.metrics import format_report
from dlengine.bench.throughput import ThroughputConfig, run_throughput

__all__ = [
    "BenchError",
    "BenchRequest",
    "EngineArgs",
    "ThroughputConfig",
    "build_engine",
    "format_report",
    "load_jsonl_requests",
    "random_requests",
    "run_throughput",
]
