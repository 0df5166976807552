"""The router's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from dlengine.config import ConfigError

POLICIES = ("round-robin", "least-load", "prefix-affinity")


@dataclass
class RouterConfig:
    hybrid: list[str] = field(default_factory=list)  # backend base URLs by role (flags)
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    encode: list[str] = field(default_factory=list)  # encoder servers (EPD: visual embeddings for prefill/hybrid)
    policy: str = "round-robin"
    ctrl_address: str | None = None  # dlslime-ctrl to discover `dlengine serve` servers from
    ctrl_scope: str | None = None
    discovery_interval_s: float = 1.0
    discovery_stale_s: float = 10.0  # a registration whose heartbeat is older is ignored
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    connect_timeout_s: float = 5.0
    stream_timeout_s: float = 30.0  # longest silence from a backend once the answer has started
    request_timeout_s: float = 600.0  # longest wait for a whole non-streamed answer (or the first byte)
    api_key: str | None = None  # clients must send it as a Bearer token on /v1 routes
    # sent as a Bearer token on /v1 calls to backends (servers started with --api-key); None:
    # the router's own api_key, the common case of one key for a whole deployment
    backend_api_key: str | None = None
    prefix_chars: int = 256  # prefix-affinity: how much of the prompt names its group

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown routing policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        for name in ("hybrid", "prefill", "decode", "encode"):
            for url in getattr(self, name):
                if not url.startswith(("http://", "https://")):
                    raise ConfigError(f"--{name} {url!r}: give a base URL such as http://127.0.0.1:8000")
        for name in ("discovery_interval_s", "health_interval_s", "health_timeout_s", "connect_timeout_s",
                     "stream_timeout_s", "request_timeout_s", "discovery_stale_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.prefix_chars < 1:
            raise ConfigError(f"prefix_chars must be positive, got {self.prefix_chars}")
        if self.backend_api_key is None:
            self.backend_api_key = self.api_key
        self.hybrid, self.prefill, self.decode, self.encode = (
            [u.rstrip("/") for u in urls] for urls in (self.hybrid, self.prefill, self.decode, self.encode))
