"""Keeping the backend pool current: health checks of every backend, and discovery of
`dlengine serve` servers registered with dlslime-ctrl (kind "dlengine", serve/registration.py).

Health: GET /health on every backend each `health_interval_s`; a failure or a non-200 drops the
backend from routing, a later success brings it back. Under the least-load policy the same
round reads each healthy backend's /metrics for the requests it holds (router/load.py); a page
that fails or names no known count leaves that backend on the router's own in-flight count. Requests that fail to connect drop a
backend at once too (proxy.py), without waiting for the next check.

Discovery: each `discovery_interval_s` the router lists the registered servers; a new one is
added (its role and HTTP address from the registration's metadata), one whose registration is
gone or whose heartbeat is older than `discovery_stale_s` is removed. A control plane that does
not answer changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from dlengine.router.backends import ROLES, BackendPool
from dlengine.router.config import RouterConfig
from dlengine.router.load import parse_load

logger = logging.getLogger("dlengine.router")
ENTITY_KIND = "dlengine"


async def read_load(backend, client: httpx.AsyncClient, timeout_s: float) -> None:
    try:
        r = await client.get(f"{backend.url}/metrics", timeout=timeout_s)
        load = parse_load(r.text) if r.status_code == 200 else None
    except httpx.HTTPError:
        load = None
    backend.report_load(load)


async def check_health(pool: BackendPool, client: httpx.AsyncClient, timeout_s: float,
                       read_loads: bool = False) -> None:
    async def probe(backend) -> None:
        try:
            r = await client.get(f"{backend.url}/health", timeout=timeout_s)
            ok, why = r.status_code == 200, f"/health answered {r.status_code}"
        except httpx.HTTPError as e:
            ok, why = False, f"/health failed: {e!r}"
        if ok:
            pool.mark_up(backend)
            if read_loads:
                await read_load(backend, client, timeout_s)
        else:
            pool.mark_down(backend, why)

    await asyncio.gather(*(probe(b) for b in list(pool.backends.values())))


async def discover(pool: BackendPool, client: httpx.AsyncClient, config: RouterConfig) -> None:
    base = config.ctrl_address if "://" in config.ctrl_address else f"http://{config.ctrl_address}"
    body = {"entity_type": "service", "kind": ENTITY_KIND}
    if config.ctrl_scope:
        body["scope"] = config.ctrl_scope
    try:
        r = await client.post(f"{base.rstrip('/')}/list_entities", json=body, timeout=config.health_timeout_s)
        data = r.json()
    except (httpx.HTTPError, ValueError) as e:
        logger.warning("control plane %s did not answer: %r", config.ctrl_address, e)
        return
    if data.get("status") != "ok":
        logger.warning("control plane %s answered %s", config.ctrl_address, data)
        return
    seen = set()
    now = time.time()
    for entity in data.get("entities", []):
        meta = entity.get("metadata") or {}
        url, role = meta.get("http_url"), meta.get("role")
        if not isinstance(url, str) or role not in ROLES:
            continue
        beat = meta.get("heartbeat_at")
        if isinstance(beat, (int, float)) and now - beat > config.discovery_stale_s:
            continue
        url = url.rstrip("/")
        seen.add(url)
        known = pool.backends.get(url)
        if known is None or known.source == "ctrl":
            pool.add(url, role, source="ctrl", model=meta.get("model"))
    for url, b in list(pool.backends.items()):
        if b.source == "ctrl" and url not in seen:
            pool.remove(url)


async def monitor(pool: BackendPool, client: httpx.AsyncClient, config: RouterConfig) -> None:
    """Runs until cancelled: discovery (with a control plane) and health checks."""
    next_health = next_discovery = 0.0
    while True:
        now = time.monotonic()
        if config.ctrl_address and now >= next_discovery:
            await discover(pool, client, config)
            next_discovery = now + config.discovery_interval_s
        if now >= next_health:
            await check_health(pool, client, config.health_timeout_s, read_loads=config.policy == "least-load")
            next_health = now + config.health_interval_s
        await asyncio.sleep(min(config.health_interval_s, config.discovery_interval_s) / 2)
