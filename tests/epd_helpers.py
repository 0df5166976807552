"""What the encode-prefill-decode tests (test_epd_disagg.py, test_epd_video.py) share: running a
request to its final output, waiting for the encoder and the prefill side to let go of their
buffers, pausing a worker process, and the free-pool checks."""

import os
import signal
import time

from dlengine import SamplingParams
from dlengine.disagg.worker import WorkerEngine

MODEL = "tiny-qwen3-vl"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
STAGING = {"staging_bytes": 1 << 20}


def encoder_worker(**transfer) -> WorkerEngine:
    """An encoder engine (role "encode") of the tiny VL model in its own process."""
    return WorkerEngine({"model": MODEL, "role": "encode", "dtype": "float32", "transfer": transfer,
                         "encoder_cache": STAGING})


def run(engine, prompt, params=GREEDY, timeout: float = 30.0, **transfer_params):
    """Add one request and step until its final output."""
    rid = engine.add_request(prompt, params, **transfer_params)
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "request did not finish in time"
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out
        time.sleep(0.001)  # a pull alone leaves nothing to compute: do not spin the shared cores
    raise AssertionError("no final output")


def worker_final(worker, rid: str, timeout: float = 30.0):
    """The final output of request `rid` of a worker process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outs = worker.results([rid])
        if outs:
            return outs[0]
        time.sleep(0.01)
    raise AssertionError(f"worker request {rid} did not finish")


def assert_pool_full(engine) -> None:
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def wait_encoder_released(worker, timeout: float = 10.0) -> dict:
    """The encoder worker's stats once it pins no embeddings and its staging buffer is free."""
    deadline = time.monotonic() + timeout
    while True:
        s = worker.stats()
        if not s["pinned_requests"] and s["staging_free_bytes"] == s["staging_bytes"]:
            return s
        assert time.monotonic() < deadline, f"encoder still pins embeddings after {timeout}s: {s}"
        time.sleep(0.05)


def assert_pulled(prefill, pulled: int) -> dict:
    """A prefill worker pulled `pulled` requests' embeddings and its receive region is free again."""
    p = prefill.stats()
    assert p["ec_pulls"]["pulled"] == pulled
    assert p["ec_pulls"]["receive_free_bytes"] == p["ec_pulls"]["receive_bytes"]
    return p


def wait_prefill_released(prefill, timeout: float = 10.0) -> dict:
    """A prefill worker's stats once it pins no request's blocks for a decode engine, with every
    block back in its pool."""
    deadline = time.monotonic() + timeout
    while (p := prefill.stats())["role"]["pinned_requests"]:
        assert time.monotonic() < deadline, p["role"]
        time.sleep(0.05)
    assert p["num_free_blocks"] == p["num_blocks"]
    return p


def stop_process(pid: int) -> None:
    """SIGSTOP `pid` and wait until the kernel reports it stopped (the signal is asynchronous:
    a read issued right after kill() may still be served)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop")
