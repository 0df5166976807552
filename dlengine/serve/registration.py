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
import uuid

from dlengine.config import ConfigError
from dlengine.disagg.discovery import Registration

ENTITY_KIND = "dlengine"


def register_server(ctrl_address: str, *, http_url: str, role: str, model: str, engine_id: str | None = None,
                    scope: str | None = None, heartbeat_s: float = 2.0) -> Registration:
    """Register the server and heartbeat until the returned Registration is closed."""
    try:
        from dlslime.ctrl import NanoCtrlClient
    except ImportError as e:
        raise ConfigError(f"--ctrl-address needs DLSlime's control-plane client (pip install "
                          f"'dlengine[dlslime]'): {e}") from None
    entity_id = f"dlengine-{role}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    metadata = {"role": role, "model": model, "http_url": http_url, "engine_id": engine_id}
    return Registration(NanoCtrlClient(ctrl_address, scope=scope), entity_id, ENTITY_KIND, {"http_url": http_url},
                        metadata, heartbeat_s, ctrl_address)
