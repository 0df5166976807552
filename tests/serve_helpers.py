"""Running `dlengine serve`'s app for tests: uvicorn in a background thread on a free loopback port
(real sockets), and the small readers the serve tests share."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx

from dlengine import EngineBuilder
from dlengine.serve import ServeConfig, create_app

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_engine(**cache):
    """tiny-qwen3 in float32 on the CPU, a small block pool (so a leak shows), max_model_len 512."""
    opts = {"block_size": 16, "num_blocks": 256, **cache}
    return EngineBuilder("tiny-qwen3").dtype("float32").device("cpu").cache(**opts).max_model_len(512).build()


class RunningServer:
    def __init__(self, engine, config: ServeConfig) -> None:
        import uvicorn

        self.engine = engine
        self.app = create_app(engine, config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def start(self) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def metrics(self) -> dict[str, float]:
        """/metrics as {sample name with labels: value}, parsed with prometheus_client's parser."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_idle(self, timeout: float = 20.0) -> dict[str, float]:
        """Wait until no request runs or waits and every KV block is free; returns the metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m.get("dlengine_num_requests_running") == 0 and m.get("dlengine_num_requests_waiting") == 0
                    and m.get("dlengine_kv_cache_free_blocks") == m.get("dlengine_kv_cache_blocks")):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not go idle: {m}")
            time.sleep(0.05)


@contextmanager
def serving(engine, **config):
    config.setdefault("served_model_name", MODEL)
    server = RunningServer(engine, ServeConfig(**config)).start()
    try:
        yield server
    finally:
        server.stop()
