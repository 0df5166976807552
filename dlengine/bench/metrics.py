"""Per-request latency metrics, percentiles and the printed report.

All times come from `RequestMetrics` (time.perf_counter() stamps set by the engine):
- TTFT  = first_token_time - arrival_time (queueing + prefill + the first sampling step)
- TPOT  = (finished_time - first_token_time) / (output tokens - 1), for requests with >= 2
          output tokens: the mean gap between output tokens after the first
- E2E   = finished_time - arrival_time
Percentiles interpolate linearly between samples (numpy's default, as vLLM's benchmarks do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dlengine.bench.cpu_threads import describe_cpu_threads
from dlengine.engine.request import RequestOutput

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation; None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), p))


def summarize(values: Sequence[float], percentiles: Iterable[float] = PERCENTILES) -> dict[str, float | None]:
    """{"mean", "p50", "p90", "p99"} of `values` (None everywhere when empty)."""
    out: dict[str, float | None] = {"mean": float(np.mean(values)) if len(values) else None}
    for p in percentiles:
        out[f"p{p:g}"] = percentile(values, p)
    return out


@dataclass
class RequestTiming:
    request_id: str
    prompt_len: int
    output_len: int
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    num_cached_tokens: int
    num_preemptions: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def request_timing(out: RequestOutput) -> RequestTiming:
    m = out.metrics
    n = len(out.token_ids)
    tpot = None
    if n >= 2 and m.first_token_time is not None and m.finished_time is not None:
        tpot = (m.finished_time - m.first_token_time) / (n - 1)
    return RequestTiming(
        request_id=out.request_id,
        prompt_len=len(out.prompt_token_ids),
        output_len=n,
        ttft_s=m.ttft,
        tpot_s=tpot,
        e2e_s=m.e2e_latency,
        num_cached_tokens=m.num_cached_tokens,
        num_preemptions=m.num_preemptions,
    )


def latency_summary(timings: Sequence[RequestTiming]) -> dict[str, float | None]:
    """Flat keys in milliseconds: mean_ttft_ms, p50_ttft_ms, ..., p99_e2el_ms."""
    out: dict[str, float | None] = {}
    for name, attr in (("ttft", "ttft_s"), ("tpot", "tpot_s"), ("e2el", "e2e_s")):
        vals = [getattr(t, attr) * 1e3 for t in timings if getattr(t, attr) is not None]
        for stat, v in summarize(vals).items():
            out[f"{stat}_{name}_ms"] = v
    return out


# ------------------------------------------------------------------ report
def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_report(result: Mapping[str, Any], title: str = "dlengine bench throughput") -> str:
    """A readable table of a `run_throughput` result."""
    width = 64
    lines = [f" {title} ".center(width, "=")]

    def row(label: str, value: Any, digits: int = 2) -> None:
        lines.append(f"{label:<34}{_fmt(value, digits):>30}")

    lines.append(f"{'Engine:':<10}{result['engine']}")
    row("Device / dtype / attention", f"{result['device']} / {result['dtype']} / {result['attention_backend']}")
    if result.get("cpu_threads"):
        lines.append(f"{'CPU threads:':<14}{describe_cpu_threads(result['cpu_threads'])}")
    _parallel_row(result, row)
    row("Dataset", result.get("dataset", "-"))
    row("Requests", result["num_requests"])
    row("Input tokens", result["total_input_tokens"])
    row("Output tokens", result["total_output_tokens"])
    row("Elapsed (s)", result["elapsed_s"], 3)
    lines.append("-" * width)
    row("Requests/s", result["requests_per_s"])
    row("Input tokens/s", result["input_tokens_per_s"], 1)
    row("Output tokens/s", result["output_tokens_per_s"], 1)
    row("Total tokens/s", result["total_tokens_per_s"], 1)
    lines.append("-" * width)
    stats = ("mean", "p50", "p90", "p99")
    lines.append(f"{'(ms)':<24}" + "".join(f"{s:>10}" for s in stats))
    for label, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("E2E latency", "e2el")):
        lines.append(f"{label:<24}" + "".join(f"{_fmt(result.get(f'{s}_{key}_ms')):>10}" for s in stats))
    lines.append("-" * width)
    row("Engine steps", result["num_steps"])
    row("Mean sequences / step", result["mean_seqs_per_step"])
    row("Mean tokens / step", result["mean_tokens_per_step"], 1)
    row("Preemptions", result["num_preemptions"])
    row("Prefix-cache hit tokens", result["prefix_cache_hit_tokens"])
    if "prefix_cache_hit_requests" in result:
        row("Prefix-cache hits (requests)", f"{result['prefix_cache_hit_requests']:,} of {result['num_requests']:,}")
    if "spec_draft_tokens" in result:
        forced = _forced(result)
        row("Draft tokens accepted" + forced, f"{result['spec_accepted_tokens']:,} of {result['spec_draft_tokens']:,} "
                                              f"({_pct(result['spec_acceptance_rate'])})")
        row("Mean accepted length" + forced, result["spec_mean_accepted_length"], 2)
    _forced_line(result, lines)
    if "mbu_est" in result:
        lines.append("-" * width)
        row("Decode MBU (estimate)", _pct(result["mbu_est"]))
        row("MFU (estimate)", _pct(result["mfu_est"]))
        row("Achieved bandwidth, compute (est.)", f"{format_gbps(result['est_achieved_gbps'])}, "
                                                  f"{format_tflops(result['est_achieved_tflops'])}")
        row("Peaks used", _peaks_line(result["peaks"]))
    if result.get("compare"):
        _compare_rows(lines, row, width, result["compare"])
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    lines.append("=" * width)
    return "\n".join(lines)


def _parallel_row(result: Mapping[str, Any], row) -> None:
    p = result.get("parallel") or {}
    if p.get("world_size", 1) > 1:
        row("Parallel (tp / attention_dp / ffn_ep)", f"{p['tp']} / {p['attention_dp']} / {p['ffn_ep']} "
                                                     f"({p['world_size']} ranks)")


def _three_digits(v: float) -> str:
    """About three significant digits, thousands separated: 2,950 / 745 / 67.1 / 1.23 / 0.0042."""
    if v == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(v))))
    return f"{v:,.{decimals}f}"


def _rate(value: float | None, scale: float, units: Sequence[tuple[float, str]]) -> str:
    """`value` * `scale` (base units per second) in the largest of `units` (factor, name) it
    reaches, else the smallest: CPU peaks are GFLOP/s, GPU peaks TFLOP/s, and neither prints as 0.0."""
    if value is None:
        return "-"
    base = value * scale
    factor, name = next(((f, n) for f, n in units if abs(base) >= f), units[0] if base == 0 else units[-1])
    return f"{_three_digits(base / factor)} {name}"


def format_gbps(gbps: float | None) -> str:
    """A bandwidth given in GB/s (1e9 bytes/s): '2,950 GB/s', '33.6 GB/s', '420 MB/s'."""
    return _rate(gbps, 1e9, ((1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s")))


def format_tflops(tflops: float | None) -> str:
    """A compute rate given in TFLOP/s: '745 TFLOP/s', '67.1 GFLOP/s', '12.0 MFLOP/s'."""
    return _rate(tflops, 1e12, ((1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1e6, "MFLOP/s")))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _peaks_line(p: Mapping[str, Any]) -> str:
    def src(key: str) -> str:
        return "" if p.get(key) == "measured" else " (given)"

    kind = " [cpu]" if p.get("kind") == "cpu" else ""
    gemm = "" if p.get("gemm_dtype", "bfloat16") == "bfloat16" else f" {p['gemm_dtype']}"
    return (f"{format_gbps(p['copy_gbps'])}{src('bandwidth_source')}, "
            f"{format_tflops(p['bf16_tflops'])}{gemm}{src('tflops_source')}{kind}")


def _compare_rows(lines: list[str], row, width: int, c: Mapping[str, Any]) -> None:
    lines.append("-" * width)
    lines.append(f"compare: {c.get('framework', '?')} {c.get('transformers_version', '')} "
                 f"({c.get('attn_implementation', '-')}, {c.get('num_requests')} requests x "
                 f"{c.get('max_new_tokens')} tokens)")
    if c.get("error"):
        err = str(c["error"])
        lines.append(f"  error: {err[:width * 3]}")
        return
    row("  their output tokens/s", c.get("output_tokens_per_s"), 1)
    row("  their output tokens/s (wall)", c.get("output_tokens_per_s_wall"), 1)
    row("  ours / theirs", None if c.get("ratio") is None else f"{c['ratio']:.2f}x")
    row("  ours / theirs (wall)", None if c.get("ratio_wall") is None else f"{c['ratio_wall']:.2f}x")


def _forced(result: Mapping[str, Any]) -> str:
    """The label suffix of acceptance rows when the bench forced the acceptance."""
    return " (forced)" if result.get("spec_forced_acceptance") is not None else ""


def _forced_line(result: Mapping[str, Any], lines: list[str]) -> None:
    p = result.get("spec_forced_acceptance")
    if p is not None:
        lines.append(f"(forced): each draft kept at random with probability {p:g},")
        lines.append("          not by matching the model; outputs are not the model's")


def format_latency_report(result: Mapping[str, Any], title: str = "dlengine bench latency") -> str:
    """A readable table of a `run_latency` result."""
    width = 64
    lines = [f" {title} ".center(width, "=")]

    def row(label: str, value: Any, digits: int = 2) -> None:
        lines.append(f"{label:<34}{_fmt(value, digits):>30}")

    lines.append(f"{'Engine:':<10}{result['engine']}")
    row("Device / dtype / attention", f"{result['device']} / {result['dtype']} / {result['attention_backend']}")
    if result.get("cpu_threads"):
        lines.append(f"{'CPU threads:':<14}{describe_cpu_threads(result['cpu_threads'])}")
    _parallel_row(result, row)
    row("Batch x input x output", f"{result['batch_size']} x {result['input_len']} x {result['output_len']}")
    row("Iterations (+ warm-up)", f"{result['num_iters']} (+{result['num_warmup_iters']})")
    if result.get("synthetic_context"):
        row("Prompt context", "synthetic (not computed)")
    lines.append("-" * width)
    row("Prefill (ms)", result["prefill_ms"])
    row("Prefill tokens/s", result["prefill_tokens_per_s"], 1)
    row("Decode ms / token (mean)", result["decode_ms_per_token"], 3)
    if result.get("spec_draft_tokens"):  # speculative: the rows below are per step, not per token
        forced = _forced(result)
        row("Decode ms / step (mean)", result["decode_ms_per_step"], 3)
        row("Tokens per request-step" + forced, result["decode_tokens_per_request_step"], 2)
        row("Draft tokens accepted" + forced, f"{result['spec_accepted_tokens']:,} of {result['spec_draft_tokens']:,} "
                                              f"({_pct(result['spec_acceptance_rate'])})")
    _forced_line(result, lines)
    if result.get("num_full_batch_decode_steps") != result.get("num_decode_steps"):
        row("Decode ms / token (full batch)", result.get("full_batch_decode_ms_per_token"), 3)
    row("Decode ms / step (p50, p90)" if result.get("spec_draft_tokens") else "Decode ms / token (p50, p90)",
        f"{_fmt(result['p50_decode_ms_per_token'], 3)}, {_fmt(result['p90_decode_ms_per_token'], 3)}")
    row("Decode tokens/s", result["decode_tokens_per_s"], 1)
    row("End-to-end (ms)", result["e2e_ms"])
    row("Output tokens/s (end-to-end)", result["output_tokens_per_s"], 1)
    if result.get("peaks") is not None:  # none for a parallel engine (see the note)
        lines.append("-" * width)
        row("Decode MBU (estimate)", _pct(result["decode_mbu"]))
        row("Decode bandwidth (estimate)", format_gbps(result["decode_achieved_gbps"]))
        row("Prefill MFU (estimate)", _pct(result["prefill_mfu"]))
        row("Prefill compute (estimate)", format_tflops(result["prefill_achieved_tflops"]))
        row("Peaks used", _peaks_line(result["peaks"]))
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    lines.append("=" * width)
    return "\n".join(lines)
