"""Processes for the router tests: `dlengine serve` subprocesses on free loopback ports, and the
router itself in a uvicorn thread (so a test can look at its backend pool)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from dlengine.router import RouterConfig, create_router_app
from serve_helpers import free_port

ENGINE_FLAGS = ["--dtype", "float32", "--device", "cpu", "--num-blocks", "96", "--max-model-len", "1024",
                "--threads", "1", "--seed", "0"]
SECRET = "test-pd-secret"


class ServeProcess:
    def __init__(self, mode: str, *extra: str) -> None:
        self.mode, self.port = mode, free_port()
        if mode != "hybrid":  # a port of our choosing: a free one picked by the server could be another's HTTP port
            extra = ("--transfer-port", str(free_port()), *extra)
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DLENGINE_PD_SECRET": SECRET,
               "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dlengine.cli", "serve", "tiny-qwen3", "--port", str(self.port), "--mode", mode,
             "--served-model-name", "tiny", "--log-level", "warning", *ENGINE_FLAGS, *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 90.0) -> "ServeProcess":
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dlengine serve --mode {self.mode} exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dlengine serve --mode {self.mode} did not come up")
            time.sleep(0.2)

    def metric(self, name: str) -> float:
        """One sample of /metrics, named with its labels as Prometheus writes them."""
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if not line.startswith("#") and line.rsplit(" ", 1)[0] == name:
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RunningRouter:
    def __init__(self, config: RouterConfig) -> None:
        import uvicorn

        self.app = create_router_app(config)
        self.pool = self.app.state.pool
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="router-test", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the router did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def urls(self, role: str | None = None, healthy: bool = True) -> set[str]:
        return {b.url for b in list(self.pool.backends.values())
                if (role is None or b.role == role) and (b.healthy or not healthy)}


def wait_for(predicate, timeout: float, what: str) -> float:
    """Seconds until predicate() holds; AssertionError after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not within {timeout}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start
