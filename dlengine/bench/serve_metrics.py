"""Metrics of an online benchmark, from the `RequestResult`s the streaming client measured.

Definitions (per request, over successful requests only; as vLLM's `benchmark_serving`):
- TTFT = arrival of the first chunk carrying text - the moment the request was sent
- TPOT = (E2E - TTFT) / (output tokens - 1), for requests with >= 2 output tokens
- ITL  = the gaps between consecutive text-carrying chunks, pooled over all requests (a chunk
         holding several tokens is one gap, so ITL >= TPOT when a server batches tokens)
- E2E  = end of the stream - the moment the request was sent
Throughputs divide by the benchmark's duration: first request sent -> last request ended.
Goodput counts the successful requests that meet every SLO given (TTFT, TPOT, E2E, in ms), per
second of duration; a one-token request has no TPOT and cannot miss a TPOT SLO.
Concurrency achieved: the mean number of requests in flight (the sum of request durations over
the benchmark's duration, Little's law) and the most ever in flight at once.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

from dlengine.bench.common import BenchError
from dlengine.bench.metrics import _fmt, summarize
from dlengine.bench.serve_client import RequestResult

SLO_METRICS = {"ttft": "ttft_s", "tpot": "tpot_s", "e2el": "e2e_s"}
_SLO_ALIASES = {"e2e": "e2el"}


def parse_goodput(spec: str | Mapping[str, float] | None) -> dict[str, float]:
    """'ttft:500,tpot:50' (milliseconds) -> {"ttft": 500.0, "tpot": 50.0}. Known metrics: ttft,
    tpot, e2el (or e2e). A mapping is checked the same way; None or '' gives no SLOs."""
    if not spec:
        return {}
    items = spec.items() if isinstance(spec, Mapping) else [_split_slo(part) for part in spec.split(",") if part.strip()]
    slos: dict[str, float] = {}
    for name, value in items:
        key = _SLO_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
        if key not in SLO_METRICS:
            raise BenchError(f"unknown goodput metric {name!r}; use ttft, tpot or e2el (e.g. 'ttft:500,tpot:50')")
        try:
            ms = float(value)
        except (TypeError, ValueError):
            raise BenchError(f"goodput SLO {name!r} needs a number of milliseconds, got {value!r}") from None
        if not ms > 0:
            raise BenchError(f"goodput SLO {name!r} must be > 0 ms, got {value!r}")
        slos[key] = ms
    return slos


def _split_slo(part: str) -> tuple[str, str]:
    name, sep, value = part.partition(":")
    if not sep:
        raise BenchError(f"goodput SLOs are NAME:MILLISECONDS pairs separated by commas, got {part.strip()!r}")
    return name, value.strip()


def tpot_s(r: RequestResult) -> float | None:
    """Mean time per output token after the first, or None below two tokens."""
    n = r.output_tokens
    if not r.success or n < 2 or r.ttft_s is None or r.e2e_s is None:
        return None
    return (r.e2e_s - r.ttft_s) / (n - 1)


def meets_slos(r: RequestResult, slos: Mapping[str, float]) -> bool:
    if not r.success:
        return False
    values = {"ttft_s": r.ttft_s, "tpot_s": tpot_s(r), "e2e_s": r.e2e_s}
    for key, ms in slos.items():
        v = values[SLO_METRICS[key]]
        if v is None:
            if key == "tpot":
                continue  # one output token: nothing to miss
            return False
        if v * 1e3 > ms:
            return False
    return True


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """The most requests in flight at one instant (ends before starts at equal times)."""
    events = []
    for r in results:
        end = r.end_time if r.end_time is not None else r.start_time
        events.append((r.start_time, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


def summarize_results(results: Sequence[RequestResult], duration_s: float,
                      slos: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Flat summary keys (as the offline bench's where they mean the same): num_requests (successful),
    num_failed, totals, per-second rates, {mean,p50,p90,p99}_{ttft,tpot,itl,e2el}_ms, goodput,
    concurrency, the token-count source and the failures' reasons with their counts."""
    slos = dict(slos or {})
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    dur = duration_s if duration_s > 0 else float("nan")
    inputs = [r.prompt_tokens for r in ok]
    known_inputs = [n for n in inputs if n is not None]
    total_in = sum(known_inputs) if len(known_inputs) == len(inputs) else None  # unknown without usage/tokenizer
    total_out = sum(r.output_tokens for r in ok)
    usage = sum(r.usage_reported for r in ok)
    out: dict[str, Any] = {
        "num_requests": len(ok),
        "num_failed": len(failed),
        "num_sent": len(results),
        "elapsed_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "token_counts_from": "usage" if ok and usage == len(ok) else ("chunks" if usage == 0 else "mixed"),
        "requests_per_s": _rate(len(ok), dur),
        "input_tokens_per_s": None if total_in is None else _rate(total_in, dur),
        "output_tokens_per_s": _rate(total_out, dur),
        "total_tokens_per_s": None if total_in is None else _rate(total_in + total_out, dur),
    }
    series = {
        "ttft": [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None],
        "tpot": [t * 1e3 for t in map(tpot_s, ok) if t is not None],
        "itl": [g * 1e3 for r in ok for g in r.itl_s],
        "e2el": [r.e2e_s * 1e3 for r in ok if r.e2e_s is not None],
    }
    for name, values in series.items():
        for stat, v in summarize(values).items():
            out[f"{stat}_{name}_ms"] = v
    out["goodput_slos_ms"] = slos
    out["num_good_requests"] = sum(meets_slos(r, slos) for r in ok) if slos else None
    out["goodput_requests_per_s"] = _rate(out["num_good_requests"], dur) if slos else None
    in_flight = [r.duration_s for r in results if r.duration_s is not None]
    out["mean_concurrency"] = _rate(sum(in_flight), dur) if results else None
    out["peak_concurrency"] = peak_concurrency(results)
    out["errors"] = dict(Counter(r.error or "unknown error" for r in failed).most_common())
    return out


def _rate(count: float, duration: float) -> float | None:
    v = count / duration
    return None if v != v else float(v)  # NaN (no duration) -> None


def format_serve_report(result: Mapping[str, Any], title: str = "dlengine bench serve") -> str:
    """A readable table of a `run_serve_bench` result, in the offline bench's layout."""
    width = 64
    lines = [f" {title} ".center(width, "=")]

    def row(label: str, value: Any, digits: int = 2) -> None:
        lines.append(f"{label:<34}{_fmt(value, digits):>30}")

    lines.append(f"{'Server:':<10}{result['base_url']} ({result['endpoint']})")
    row("Model", result["model"])
    row("Dataset / prompts", f"{result['dataset']} / {result['prompt_kind']}")
    rate = result["request_rate"]
    row("Request rate", "inf (all at once)" if rate in ("inf", float("inf")) else f"{rate:g}/s, Poisson")
    row("Max concurrency", result.get("max_concurrency") or "-")
    if result.get("interrupted"):
        lines.append("INTERRUPTED: the numbers cover the requests that ended before Ctrl-C")
    row("Successful requests", result["num_requests"])
    row("Failed requests", result["num_failed"])
    row("Input tokens", result["total_input_tokens"])
    row("Output tokens" + ("" if result["token_counts_from"] == "usage" else f" ({result['token_counts_from']})"),
        result["total_output_tokens"])
    row("Duration (s)", result["elapsed_s"], 3)
    lines.append("-" * width)
    row("Requests/s", result["requests_per_s"])
    row("Input tokens/s", result["input_tokens_per_s"], 1)
    row("Output tokens/s", result["output_tokens_per_s"], 1)
    row("Total tokens/s", result["total_tokens_per_s"], 1)
    if result.get("goodput_slos_ms"):
        slos = ", ".join(f"{k}<={v:g}ms" for k, v in result["goodput_slos_ms"].items())
        row(f"Goodput req/s ({slos})", result["goodput_requests_per_s"])
    row("Concurrency (mean / peak)", f"{_fmt(result['mean_concurrency'])} / {_fmt(result['peak_concurrency'])}")
    lines.append("-" * width)
    stats = ("mean", "p50", "p90", "p99")
    lines.append(f"{'(ms)':<24}" + "".join(f"{s:>10}" for s in stats))
    for label, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E latency", "e2el")):
        lines.append(f"{label:<24}" + "".join(f"{_fmt(result.get(f'{s}_{key}_ms')):>10}" for s in stats))
    if result.get("errors"):
        lines.append("-" * width)
        lines.append("Failures (count: reason):")
        for reason, count in list(result["errors"].items())[:10]:
            lines.append(f"  {count:>5}: {reason[:width * 2]}")
        if len(result["errors"]) > 10:
            lines.append(f"  ... and {len(result['errors']) - 10} other reasons (see --json)")
    lines.append("=" * width)
    return "\n".join(lines)
