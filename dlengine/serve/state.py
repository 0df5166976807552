"""What every route needs: the engine wrapper, the settings, the tokenizer, the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from dlengine.engine.engine import Engine
from dlengine.serve.async_engine import AsyncEngine
from dlengine.serve.errors import model_not_found
from dlengine.serve.logprobs import TokenText
from dlengine.serve.metrics import ServerMetrics
from dlengine.serve.tool_parsers import MarkupToolParser


@dataclass
class ServeConfig:
    """The server's own settings (the engine's come from EngineBuilder)."""

    served_model_name: str
    api_key: str | None = None  # when set, every /v1 route needs "Authorization: Bearer <key>"
    max_concurrent_requests: int = 256  # /v1 generation requests in flight; more get 429
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413
    tool_call_parser: str = "auto"  # "auto" (by architecture), "qwen3", "deepseek_v3"
    mode: str = "hybrid"  # the engine's role, as registered with the control plane
    ctrl_address: str | None = None  # dlslime-ctrl to register with (serve/registration.py)
    ctrl_scope: str | None = None
    public_url: str | None = None  # the HTTP address registered (default: http://host:port of the bind)
    pd_secret: str | None = None  # HMAC key signing / checking kv_transfer_params (serve/pd_auth.py)
    allowed_local_media_path: str | None = None  # image_url file:// URLs are read from under this folder


@dataclass
class ServerState:
    engine: Engine
    async_engine: AsyncEngine
    config: ServeConfig
    metrics: ServerMetrics
    tool_parser: type[MarkupToolParser]
    text_of: TokenText = field(init=False)
    used_pd_signatures: dict[str, float] = field(default_factory=dict)  # decode mode: signature -> expires_at

    def __post_init__(self) -> None:
        self.text_of = TokenText(self.engine.tokenizer)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.config.model.vocab_size

    def check_model(self, name: str) -> None:
        if name != self.config.served_model_name:
            raise model_not_found(name, self.config.served_model_name)
