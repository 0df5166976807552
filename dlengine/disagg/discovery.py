"""Node discovery: which prefill and decode engines exist, and where.

`ControlPlane(url)` talks to a dlslime-ctrl server (PyPI `dlslime-ctrl`; it keeps its registry in
Redis) through DLSlime's own client, `dlslime.ctrl.NanoCtrlClient`. An engine registers as a
service entity of kind "prefill" or "decode" with its transfer address in `endpoint` and its
engine id, model fingerprint and a heartbeat timestamp in `metadata`. A daemon thread
re-registers it every `heartbeat_s` seconds: that refreshes the server's TTL (dlslime-ctrl drops
an entity about 60 s after its last heartbeat) and the timestamp, so `engines()` can also hide
nodes silent for longer than `stale_after_s`, well before the server forgets them.

`StaticPeers` answers the same `engines()` query from a fixed list, for engines in one script
or a fixed deployment without a control plane.

    cp = ControlPlane("http://127.0.0.1:4479")
    [prefill_node] = cp.engines("prefill")
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from dlengine.config import ConfigError


@dataclass(frozen=True)
class EngineNode:
    engine_id: str
    role: str
    endpoint: dict  # the transfer engine's local_info()
    fingerprint: str
    heartbeat_at: float  # wall clock (time.time()) of the last heartbeat


class Registration:
    """A live entry in dlslime-ctrl: registered at once, re-registered every `heartbeat_s` seconds
    with a fresh `heartbeat_at` in its metadata, unregistered by `close()`. Engines (kind "prefill"
    / "decode", ControlPlane.register) and HTTP servers (kind "dlengine", dlengine.serve) use it."""

    def __init__(self, client, entity_id: str, kind: str, endpoint: dict, metadata: dict, heartbeat_s: float,
                 url: str = "") -> None:
        self._client = client
        self.entity_id, self.kind, self.endpoint, self.metadata = entity_id, kind, endpoint, dict(metadata)
        if not self._register():
            raise ConfigError(f"cannot register {entity_id} with the control plane at {url} "
                              "(is dlslime-ctrl running, with its Redis?)")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(heartbeat_s,), name="dlengine-ctrl-hb", daemon=True)
        self._thread.start()

    def _register(self) -> bool:
        return self._client.register(self.entity_id, self.kind, endpoint=self.endpoint,
                                     metadata={**self.metadata, "heartbeat_at": time.time()})

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._register()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._client.unregister()


class ControlPlane:
    def __init__(self, url: str, scope: str | None = None, stale_after_s: float = 10.0) -> None:
        try:
            from dlslime.ctrl import NanoCtrlClient
        except ImportError as e:
            raise ConfigError(f"the control plane needs DLSlime (pip install 'dlengine[dlslime]'): {e}") from None
        self.url, self.scope, self.stale_after_s = url, scope, stale_after_s
        self._client_cls = NanoCtrlClient

    def register(self, connector, heartbeat_s: float = 2.0) -> Registration:
        """Register a prefill/decode engine (its KV connector) and keep it alive. Raises
        ConfigError when the control plane is unreachable."""
        c = connector
        return Registration(self._client_cls(self.url, scope=self.scope), c.engine_id, c.name, c.transfer.local_info(),
                            {"fingerprint": c.fingerprint, "engine_id": c.engine_id}, heartbeat_s, self.url)

    def engines(self, role: str | None = None) -> list[EngineNode]:
        """Live engines (of `role`), freshest first; nodes whose heartbeat is older than
        `stale_after_s` are left out."""
        client = self._client_cls(self.url, scope=self.scope)
        now = time.time()
        nodes = []
        for e in client.list_entities(kind=role):
            meta = e.get("metadata") or {}
            if e.get("kind") not in ("prefill", "decode") or not isinstance(e.get("endpoint"), dict):
                continue
            hb = float(meta.get("heartbeat_at", 0.0))
            if now - hb > self.stale_after_s:
                continue
            nodes.append(EngineNode(e.get("entity_id"), e.get("kind"), e["endpoint"], meta.get("fingerprint", ""), hb))
        return sorted(nodes, key=lambda n: -n.heartbeat_at)


class StaticPeers:
    """A fixed list of engines (no control plane): `StaticPeers([prefill, decode]).engines("prefill")`."""

    def __init__(self, engines: list) -> None:
        self._nodes = [EngineNode(e.connector.engine_id, e.connector.name, e.connector.transfer.local_info(),
                                  e.connector.fingerprint, time.time()) for e in engines]

    def engines(self, role: str | None = None) -> list[EngineNode]:
        return [n for n in self._nodes if role is None or n.role == role]
