"""Prometheus metrics for GET /metrics.

Per-request numbers (latencies, token counts, prefix-cache hits, preemptions) are recorded when
a request's final output arrives, from its RequestMetrics, so they hold for every kind of core.
Load numbers (running / waiting requests, KV cache usage), the KV transfer counters of a
prefill or decode engine and the speculative-decoding counters are read from the engine at scrape time, on the stepping thread
(`engine_snapshot`); a parallel engine's come from its ranks, with per-rank series
(dlengine_rank_*{rank, tp_rank, dp_rank}) beside the engine-wide ones. Each app has its own registry, so several servers can live in one process.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dlengine.engine.engine import Engine
from dlengine.engine.request import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
# KV connector counters that only grow (the rest of describe()["kv_transfer"] is state: gauges)
_TRANSFER_COUNTERS = ("handed_off", "released_done", "released_timeout", "released_abort", "pulled", "failed",
                      "recomputed")


def engine_snapshot(engine: Engine) -> dict[str, Any]:
    """Load and transfer numbers; run it on the stepping thread. The scheduler and block pool are
    those of a local core; a parallel front asks its ranks (`parallel_snapshot`)."""
    if engine.config.parallel.world_size > 1 and hasattr(engine, "engine_stats"):
        return parallel_snapshot(engine.stats())
    snap: dict[str, Any] = {"running": engine.num_unfinished_requests, "waiting": None, "kv_usage": None}
    try:
        sched = engine.scheduler
        snap["running"] = len(sched.running)
        snap["waiting"] = len(sched.waiting) + len(getattr(sched, "waiting_for_kv", ()))
    except AttributeError:
        pass
    try:
        bm = engine.block_manager
        snap["kv_usage"] = bm.usage
        snap["kv_free_blocks"], snap["kv_blocks"] = bm.num_free_blocks, bm.num_blocks
    except AttributeError:
        pass
    snap["kv_transfer"] = engine.describe().get("kv_transfer") or {}
    stats = engine.stats  # a local core's EngineStats (a parallel front returns per-rank dicts)
    if hasattr(stats, "num_draft_tokens"):
        snap["spec"] = {"draft_tokens": stats.num_draft_tokens, "accepted_tokens": stats.num_accepted_tokens,
                        "verifications": stats.num_spec_verifications}
    return snap


def parallel_snapshot(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """A parallel engine's load from its ranks' stats (ParallelEngine.stats()). The TP ranks of a
    DP replica hold the same requests and block tables, so the engine-wide numbers add up each
    replica's output rank (tp_rank 0); every rank's own pool and lockstep counters are kept too."""
    outputs = [r for r in ranks if r["tp_rank"] == 0]
    free, blocks = sum(r["num_free_blocks"] for r in outputs), sum(r["num_blocks"] for r in outputs)
    snap: dict[str, Any] = {
        "running": sum(r["num_running"] for r in outputs), "waiting": sum(r["num_waiting"] for r in outputs),
        "kv_usage": 1.0 - free / blocks if blocks else None, "kv_free_blocks": free, "kv_blocks": blocks,
        # the output rank's connector, live (describe()["kv_transfer"] is the workers' build-time copy)
        "kv_transfer": (outputs[0].get("connector") or {}) if outputs else {},
        "spec": {"draft_tokens": sum(r["num_draft_tokens"] for r in outputs),
                 "accepted_tokens": sum(r["num_accepted_tokens"] for r in outputs),
                 "verifications": sum(r["num_spec_verifications"] for r in outputs)},
        "ranks": ranks,
    }
    return snap


# per-rank series of a parallel engine: (metric, stats key, kind, help)
_RANK_METRICS = (
    ("dlengine_rank_kv_cache_free_blocks", "num_free_blocks", "gauge", "Free KV cache blocks of a rank"),
    ("dlengine_rank_kv_cache_blocks", "num_blocks", "gauge", "KV cache blocks of a rank"),
    ("dlengine_rank_lockstep_steps", "lockstep_steps", "counter", "Lockstep steps a rank took part in"),
    ("dlengine_rank_idle_steps", "idle_steps", "counter",
     "Steps a rank joined the MoE collectives with no tokens (expert parallelism)"),
)


class _SnapshotCollector:
    """Yields the metrics of the latest snapshot (set just before each scrape)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}

    def collect(self):
        s = self.snapshot
        for name, key, doc in (("dlengine_num_requests_running", "running", "Requests being computed"),
                               ("dlengine_num_requests_waiting", "waiting", "Requests waiting to be scheduled"),
                               ("dlengine_kv_cache_usage_ratio", "kv_usage", "Fraction of KV cache blocks in use"),
                               ("dlengine_kv_cache_free_blocks", "kv_free_blocks", "Free KV cache blocks"),
                               ("dlengine_kv_cache_blocks", "kv_blocks", "KV cache blocks in all")):
            if s.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=float(s[key]))
        spec = s.get("spec")
        if spec and spec["draft_tokens"]:
            # speculative decoding: acceptance rate = accepted / draft tokens; mean accepted length
            # per step = (accepted + verifications) / verifications
            for key, doc in (("draft_tokens", "Draft tokens proposed and verified"),
                             ("accepted_tokens", "Draft tokens accepted"),
                             ("verifications", "Request-steps that verified drafts")):
                yield CounterMetricFamily(f"dlengine_spec_decode_{key}", doc, value=float(spec[key]))
        ranks = s.get("ranks") or []
        for name, key, kind, doc in _RANK_METRICS if ranks else ():
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, doc, labels=["rank", "tp_rank", "dp_rank"])
            for r in ranks:
                family.add_metric([str(r["rank"]), str(r["tp_rank"]), str(r["dp_rank"])], float(r[key]))
            yield family
        transfer = s.get("kv_transfer") or {}
        if transfer:
            counters = CounterMetricFamily("dlengine_kv_transfer_requests", "KV transfers by outcome",
                                           labels=["outcome"])
            state = GaugeMetricFamily("dlengine_kv_transfer_state", "KV transfer engine state", labels=["field"])
            for k, v in transfer.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                (counters if k in _TRANSFER_COUNTERS else state).add_metric([k], float(v))
            yield counters
            yield state


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._snapshot = _SnapshotCollector()
        r.register(self._snapshot)
        self.prompt_tokens = Counter("dlengine_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dlengine_generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter("dlengine_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.preemptions = Counter("dlengine_num_preemptions", "Preemptions of finished requests", registry=r)
        self.finished = Counter("dlengine_request_finished", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.hit_rate = Gauge("dlengine_prefix_cache_hit_rate", "Prefix-cache hit tokens / prompt tokens", registry=r)
        self.ttft = Histogram("dlengine_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("dlengine_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("dlengine_e2e_request_latency_seconds", "Arrival to final token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("dlengine_requests_rejected", "Requests answered 429 (too many at once)", registry=r)
        self._prompt_total = 0
        self._cached_total = 0
        Gauge("dlengine_model_info", "The served model", ["model_name"], registry=r).labels(model_name).set(1)

    def request_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        self.finished.labels(out.finish_reason or "unknown").inc()
        n_out = len(out.token_ids)
        self.prompt_tokens.inc(m.num_prompt_tokens)
        self.generation_tokens.inc(n_out)
        self.cached_tokens.inc(m.num_cached_tokens)
        self.preemptions.inc(m.num_preemptions)
        self._prompt_total += m.num_prompt_tokens
        self._cached_total += m.num_cached_tokens
        if self._prompt_total:
            self.hit_rate.set(self._cached_total / self._prompt_total)
        if m.ttft is not None:
            self.ttft.observe(max(m.ttft, 0.0))
        if m.e2e_latency is not None:
            self.e2e.observe(max(m.e2e_latency, 0.0))
            if m.first_token_time is not None and n_out > 1:
                self.tpot.observe(max(m.finished_time - m.first_token_time, 0.0) / (n_out - 1))

    def request_aborted(self, request_id: str) -> None:
        """A request its client abandoned (its final output is never read)."""
        self.finished.labels("abort").inc()

    def render(self, snapshot: dict[str, Any]) -> bytes:
        self._snapshot.snapshot = snapshot
        return generate_latest(self.registry)
