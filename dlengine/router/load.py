"""A backend's own count of the requests it holds, read from its Prometheus /metrics.

The router's in-flight count sees only the requests this router sent; a backend shared with
other routers or direct clients can be far busier. Least-load therefore uses what the backend
reports (running + waiting) when the last health round could read it, plus the requests this
router sent it since then, and falls back to the router's own count otherwise.

Names understood: ours (`dlengine_num_requests_running` / `_waiting`), vLLM's
(`vllm:num_requests_running` / `_waiting`) and SGLang's (`sglang:num_running_reqs` /
`sglang:num_queue_reqs`), summed over their label sets (one per served model or engine).
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

LOAD_METRICS = {
    "dlengine_num_requests_running", "dlengine_num_requests_waiting",
    "vllm:num_requests_running", "vllm:num_requests_waiting",
    "sglang:num_running_reqs", "sglang:num_queue_reqs",
}


def parse_load(text: str) -> int | None:
    """Running + waiting requests in a /metrics page; None when it names none of LOAD_METRICS
    (another server, or a page that does not parse)."""
    total, seen = 0.0, False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in LOAD_METRICS:
                    total += sample.value
                    seen = True
    except ValueError:  # not Prometheus text
        return None
    return round(total) if seen else None
