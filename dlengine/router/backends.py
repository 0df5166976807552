"""The backends a router knows: their role, where they came from, whether they answer, and how
many requests the router has in flight on each."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("dlengine.router")
ROLES = ("hybrid", "prefill", "decode", "encode")


@dataclass
class Backend:
    url: str
    role: str  # hybrid | prefill | decode | encode
    source: str = "flag"  # flag | ctrl (discovered; removed when its registration goes)
    healthy: bool = True  # a flag backend starts healthy; a failed request or health check clears it
    in_flight: int = 0  # router requests using it now (least-load)
    # what the backend's /metrics said it holds (running + waiting; router/load.py) at the last
    # health round, and this router's in_flight then; None: not read (falls back to in_flight)
    reported_load: int | None = None
    in_flight_at_report: int = 0
    model: str | None = None
    last_error: str | None = None
    changed_at: float = field(default_factory=time.monotonic)

    @property
    def load(self) -> int:
        """Requests on this backend as far as the router knows: its last reported count plus what
        this router sent it since (requests that ended since count until the next report), or
        this router's in-flight count when the backend reports none."""
        if self.reported_load is None:
            return self.in_flight
        return self.reported_load + max(0, self.in_flight - self.in_flight_at_report)

    def report_load(self, load: int | None) -> None:
        self.reported_load, self.in_flight_at_report = load, self.in_flight

    def describe(self) -> dict:
        return {"url": self.url, "role": self.role, "source": self.source, "healthy": self.healthy,
                "in_flight": self.in_flight, "reported_load": self.reported_load, "model": self.model,
                "last_error": self.last_error}


class BackendPool:
    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}  # url -> backend

    def add(self, url: str, role: str, source: str = "flag", model: str | None = None) -> Backend:
        b = self.backends.get(url)
        if b is None or b.role != role:
            b = self.backends[url] = Backend(url, role, source, model=model)
            logger.info("backend %s (%s, %s) added", url, role, source)
        return b

    def remove(self, url: str) -> None:
        if self.backends.pop(url, None) is not None:
            logger.info("backend %s removed", url)

    def usable(self, role: str) -> list[Backend]:
        """Healthy backends of a role, in a stable order (policies rely on it)."""
        return sorted((b for b in self.backends.values() if b.role == role and b.healthy), key=lambda b: b.url)

    def mark_down(self, backend: Backend, why: str) -> None:
        if backend.healthy:
            logger.warning("backend %s (%s) dropped: %s", backend.url, backend.role, why)
        backend.healthy, backend.last_error, backend.changed_at = False, why, time.monotonic()

    def mark_up(self, backend: Backend) -> None:
        if not backend.healthy:
            logger.info("backend %s (%s) is back", backend.url, backend.role)
        backend.healthy, backend.last_error, backend.changed_at = True, None, time.monotonic()
