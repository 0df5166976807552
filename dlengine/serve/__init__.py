"""dlengine serve: an OpenAI-compatible HTTP server over one Engine (FastAPI + uvicorn).

No engine logic lives here: the Engine front validates, tokenises, detokenises and applies stop
strings; this package maps OpenAI's protocol onto it and drives it from one stepping thread.

    protocol.py       pydantic models of the requests and responses
    async_engine.py   the stepping thread and per-request asyncio queues
    params.py         request -> SamplingParams and token-id prompts
    completions.py    POST /v1/completions        chat.py   POST /v1/chat/completions
    streams.py        merging choices, disconnect watch, server-sent events
    logprobs.py       OpenAI's logprob shapes      tool_parsers.py   Qwen3 / DeepSeek-V3 tool calls
    errors.py         OpenAI's error shape         guards.py  API key, body size, concurrency
    metrics.py        GET /metrics (Prometheus)    registration.py   dlslime-ctrl registration
    pd.py             PD over HTTP: hand-off, /pd/free, /pd/hold   pd_auth.py   signing kv_transfer_params
    app.py            create_app                   cli.py     `dlengine serve`

Needs the `serve` extra: pip install 'dlengine[serve]'.
"""

from dlengine.serve.app import create_app
from dlengine.serve.state import ServeConfig

__all__ = ["create_app", "ServeConfig"]
