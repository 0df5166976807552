"""Prometheus metrics for the router's GET /metrics.

Counted as requests pass: answers by route and status class, time until the answer starts (the
whole answer for non-streamed requests, the first byte for streams), retries on another backend,
and which path a PD request took. Read at scrape time from the pool: each backend's health and
the requests the router has in flight on it. Each app has its own registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from dlengine.router.backends import BackendPool

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class _PoolCollector:
    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool

    def collect(self):
        up = GaugeMetricFamily("dlengine_router_backend_up", "1 when the backend is routed to, 0 while it is down",
                               labels=["backend", "role"])
        busy = GaugeMetricFamily("dlengine_router_backend_in_flight", "Router requests in flight on the backend",
                                 labels=["backend", "role"])
        for b in list(self.pool.backends.values()):
            up.add_metric([b.url, b.role], 1.0 if b.healthy else 0.0)
            busy.add_metric([b.url, b.role], float(b.in_flight))
        yield up
        yield busy


class RouterMetrics:
    def __init__(self, pool: BackendPool) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dlengine_router_requests", "Client requests answered, by route and status class",
                                ["route", "status"], registry=r)
        self.time_to_response = Histogram(
            "dlengine_router_time_to_response_seconds",
            "Seconds until the answer starts (the whole answer when not streamed, the first byte when streamed)",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.retries = Counter("dlengine_router_retries", "Requests moved to another backend after a backend failed "
                               "before answering", registry=r)
        self.pd_paths = Counter("dlengine_router_pd_requests",
                                "PD requests by path: prefill_only (the prefill server finished it), "
                                "prefill_decode; encode: encoder legs (EPD)",
                                ["path"], registry=r)
        r.register(_PoolCollector(pool))

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, status_class(status)).inc()
        self.time_to_response.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
