"""Run one engine in its own OS process, driven over its stdin/stdout (JSON lines).

This is orchestration, not KV transport: the KV and the engines' own control messages travel
between the engines over DLSlime; the pipe only carries what a router or a test tells an engine
("generate these prompts", "admit this migrated request", "how full is your pool"). While idle
the worker keeps stepping its engine, so a prefill engine notices done-notifications and pin
timeouts. The worker exits when its stdin closes (its parent died) or on {"op": "quit"}.

    python -m dlengine.disagg.worker '{"model": "tiny-qwen3", "role": "prefill", "dtype": "float32"}'

An encoder engine (role "encode", docs/vision.md) answers "encode" (images: file paths, as JSON
carries no bytes; videos: lists of frame files, or {"frames": [...], "fps": ...}), "release",
"stats" and "quit", and polls its pins between commands.

`WorkerEngine(spec)` starts one and speaks the protocol; `generate`, `add_request`, `step`
make it usable by `PDRouter` like an in-process engine.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

from dlengine.sampling_params import SamplingParams


def build_engine(spec: dict):
    from dlengine import EngineBuilder

    b = EngineBuilder(spec["model"])
    if spec.get("device"):
        b.device(spec["device"])
    if spec.get("dtype"):
        b.dtype(spec["dtype"])
    if spec.get("load_format"):
        b.load_format(spec["load_format"])
    if spec.get("seed") is not None:
        b.seed(spec["seed"])
    if spec.get("cache"):
        b.cache(**spec["cache"])
    if spec.get("scheduler"):
        b.scheduler(**spec["scheduler"])
    b.role(spec.get("role", "hybrid"))
    if spec.get("transfer") is not None or spec.get("role", "hybrid") != "hybrid":
        b.transfer(**(spec.get("transfer") or {}))
    if spec.get("control_plane"):
        b.control_plane(**spec["control_plane"])
    if spec.get("encoder_cache"):
        b.encoder_cache(**spec["encoder_cache"])
    return b.build()


def _out_dict(o) -> dict:
    return {"request_id": o.request_id, "prompt_token_ids": o.prompt_token_ids, "token_ids": o.token_ids,
            "text": o.text, "finished": o.finished, "finish_reason": o.finish_reason, "error": o.error,
            "kv_transfer_params": o.kv_transfer_params}


def _stats(engine) -> dict:
    bm = engine.block_manager
    return {"num_free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks,
            "num_cached_tokens": engine.stats.num_cached_tokens,
            "unfinished": engine.has_unfinished_requests(),
            "role": engine.connector.describe() if engine.connector else None,
            "events": list(getattr(engine.connector, "events", [])),
            "migrations": [asdict(m) for m in getattr(engine.connector, "migrations", [])],
            "ec_pulls": engine.describe().get("ec_pulls")}


def _command_loop(engine, reply, idle, handlers: dict) -> None:
    """Read JSON-line commands from stdin until "quit" or the parent closes the pipe, calling
    `idle()` whenever none is waiting (a prefill engine steps, an encoder polls its pins) and
    answering each with `handlers[op](cmd)`. A failing command is answered with its reason; the
    engine keeps serving."""
    buf = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.005)
        if not ready:
            idle()
            continue
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break  # parent gone
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                engine.close()
                reply({"ok": True})
                return
            handler = handlers.get(op)
            try:
                reply({"ok": True, **handler(cmd)} if handler else {"ok": False, "error": f"unknown op {op!r}"})
            except Exception as e:  # the engine keeps serving; the caller gets the reason
                reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
    engine.close()


def serve_encoder(engine, reply) -> None:
    """The command loop of an encoder engine: encode, release, stats, quit; pins polled between."""

    def stats(cmd) -> dict:
        engine.poll()
        return {**engine.describe()["ec_transfer"], "events": list(engine.events)}

    _command_loop(engine, reply, engine.poll, {
        "encode": lambda cmd: {"ec_transfer_params": engine.encode(cmd.get("images") or [], cmd.get("request_id"),
                                                                   videos=cmd.get("videos") or [])},
        "release": lambda cmd: {"released": engine.release(cmd["request_id"])},
        "stats": stats,
    })


def serve(spec: dict) -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printing (libraries, C++ logs) goes to stderr, not the protocol
    engine = build_engine(spec)
    finals: dict[str, dict] = {}  # finished outputs of requests added with "add"

    def reply(obj) -> None:
        out.write(json.dumps(obj) + "\n")

    if spec.get("role") == "encode":
        reply({"ok": True, "engine_id": engine.engine_id, "pid": os.getpid(), "endpoint": engine.transfer.local_info()})
        return serve_encoder(engine, reply)
    c = engine.connector
    reply({"ok": True, "engine_id": c.engine_id if c else None, "pid": os.getpid(),
           "endpoint": c.transfer.local_info() if c else None})

    def step() -> None:
        for o in engine.step():
            if o.finished:
                finals[o.request_id] = _out_dict(o)

    def generate(cmd) -> dict:
        res = engine.generate(cmd["prompts"], SamplingParams(**cmd["params"]), raise_on_error=False)
        return {"outputs": [_out_dict(o) for o in res]}

    def add(cmd) -> dict:
        rid = engine.add_request(cmd["prompt"], SamplingParams(**cmd["params"]),
                                 kv_transfer_params=cmd.get("kv_transfer_params"),
                                 ec_transfer_params=cmd.get("ec_transfer_params"))
        return {"request_id": rid}

    _command_loop(engine, reply, step, {
        "generate": generate,
        "add": add,
        "results": lambda cmd: {"outputs": [finals.pop(r) for r in cmd["request_ids"] if r in finals]},
        "abort": lambda cmd: {"aborted": engine.abort(cmd["request_id"])},
        "stats": lambda cmd: _stats(engine),
    })


class WorkerError(RuntimeError):
    pass


class WorkerEngine:
    """An engine in a child process. Every call has a hard timeout; `kill()` ends it at once."""

    def __init__(self, spec: dict, timeout_s: float = 120.0, env: dict | None = None) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen([sys.executable, "-m", "dlengine.disagg.worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env or os.environ.copy())
        self._buf = b""
        try:
            hello = self._read(timeout_s)
        except BaseException:
            self.kill()
            raise
        self.engine_id, self.pid, self.endpoint = hello["engine_id"], hello["pid"], hello["endpoint"]

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"engine worker {self.proc.pid} did not answer within {timeout}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise WorkerError(f"engine worker {self.proc.pid} exited (code {self.proc.poll()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if not msg.get("ok"):
            raise WorkerError(msg.get("error", "worker error"))
        return msg

    def call(self, op: str, timeout: float | None = None, **kwargs) -> dict:
        self.proc.stdin.write((json.dumps({"op": op, **kwargs}) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(timeout or self.timeout_s)

    def generate(self, prompts, params: SamplingParams):
        res = self.call("generate", prompts=[p if isinstance(p, (str, dict)) else list(p) for p in prompts],
                        params=asdict(params))
        return [SimpleNamespace(**o) for o in res["outputs"]]

    def add_request(self, prompt, params: SamplingParams, kv_transfer_params: dict | None = None,
                    ec_transfer_params: dict | None = None) -> str:
        return self.call("add", prompt=prompt, params=asdict(params), kv_transfer_params=kv_transfer_params,
                         ec_transfer_params=ec_transfer_params)["request_id"]

    def encode(self, images: list[str] = (), request_id: str | None = None, videos: list = ()) -> dict:
        """An encoder worker's ec_transfer_params for images given as file paths and videos given
        as lists of frame files (or {"frames": [paths], "fps": fps})."""
        return self.call("encode", images=list(images), request_id=request_id,
                         videos=list(videos))["ec_transfer_params"]

    def results(self, request_ids) -> list:
        return [SimpleNamespace(**o) for o in self.call("results", request_ids=list(request_ids))["outputs"]]

    def stats(self) -> dict:
        return self.call("stats")

    def abort(self, request_id: str) -> bool:
        return self.call("abort", request_id=request_id)["aborted"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit", timeout=30)
            except (WorkerError, OSError):
                pass
        self.kill()


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
