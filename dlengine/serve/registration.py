"""Registering the HTTP server with dlslime-ctrl so a router (DLRouter) can find it.

The server registers as a service entity of kind "dlengine" whose endpoint is its HTTP address
and whose metadata carry its role (hybrid / prefill / decode), the served model name and a
heartbeat timestamp; a daemon thread re-registers it every `heartbeat_s` seconds (which refreshes
dlslime-ctrl's TTL, and brings the entity back after a control-plane restart). A prefill or
decode engine built with `EngineBuilder.control_plane(...)` registers its KV transfer endpoint
separately, as kind "prefill" / "decode" (dlengine.disagg.discovery).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

from dlengine.config import ConfigError

ENTITY_KIND = "dlengine"


class ServerRegistration:
    def __init__(self, ctrl_address: str, *, http_url: str, role: str, model: str, engine_id: str | None = None,
                 scope: str | None = None, heartbeat_s: float = 2.0) -> None:
        try:
            from dlslime.ctrl import NanoCtrlClient
        except ImportError as e:
            raise ConfigError(f"--ctrl-address needs DLSlime's control-plane client (pip install "
                              f"'dlengine[dlslime]'): {e}") from None
        self.entity_id = f"dlengine-{role}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.endpoint = {"http_url": http_url}
        self.metadata = {"role": role, "model": model, "http_url": http_url, "engine_id": engine_id}
        self._client = NanoCtrlClient(ctrl_address, scope=scope)
        if not self._register():
            raise ConfigError(f"cannot register with the control plane at {ctrl_address} "
                              "(is dlslime-ctrl running, with its Redis?)")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(heartbeat_s,), name="dlengine-serve-hb", daemon=True)
        self._thread.start()

    def _register(self) -> bool:
        return self._client.register(self.entity_id, ENTITY_KIND, endpoint=self.endpoint,
                                     metadata={**self.metadata, "heartbeat_at": time.time()})

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._register()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._client.unregister()
