"""Encode-prefill-decode disaggregation over DLSlime's TCP transport, for real: an encoder engine
(role "encode": the vision tower alone) hands image embeddings to a prefill (or hybrid) engine,
which hands the KV to a decode engine, in separate OS processes on 127.0.0.1.

Greedy tokens must equal one hybrid engine's for one-image and two-image prompts; a dead encoder,
an encoder that released the embeddings first, and a puller that never came must each end with a
clear error (or a local encode, when asked) and every buffer back: KV pools full, the encoder's
pins released, the receive region free. With encoder_cache(pull_mode="async") the engine keeps
stepping its other requests while a pull waits, and an abort mid-pull frees everything."""

import os
import re
import signal
import time

import pytest

try:
    import dlslime  # noqa: F401
except ImportError as e:  # CI installs it (.ci/run); say why when it is not there
    pytest.skip(f"dlslime is not importable ({e}): pip install 'dlengine[dlslime]' and apt-get install libibverbs1",
                allow_module_level=True)

import torch

from dlengine import EngineBuilder, InvalidRequestError, SamplingParams
from dlengine.config import ConfigError
from dlengine.disagg.encoder_client import EncoderPullError
from dlengine.disagg.worker import WorkerEngine
from dlengine.testing.vl import IMAGE_PLACEHOLDER, tiny_image

from epd_helpers import (GREEDY, MODEL, STAGING, assert_pool_full, assert_pulled, encoder_worker,  # noqa: E402
                         run, stop_process, wait_encoder_released, wait_prefill_released, worker_final)



@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three PNG files (lossless: the same pixels as the PIL images) for worker processes."""
    folder = tmp_path_factory.mktemp("epd-images")
    paths = []
    for k, img in enumerate([tiny_image(), tiny_image(40, 24, seed=1), tiny_image(seed=7)]):
        paths.append(str(folder / f"{k}.png"))
        img.save(paths[-1])
    return paths


def cases(images):
    """(prompt, the images it shows): one image, two images."""
    return [("Once upon a time " + IMAGE_PLACEHOLDER + " there was a tiny language model", [images[0]]),
            ("hello " + IMAGE_PLACEHOLDER + " and " + IMAGE_PLACEHOLDER + " world", [images[0], images[1]])]


def local(role="hybrid", **encoder_cache):
    b = EngineBuilder(MODEL).dtype("float32").cache(block_size=16).scheduler(max_model_len=256)
    b.encoder_cache(**{**STAGING, **encoder_cache})
    if role != "hybrid":
        b.role(role).transfer("dlslime", transport="tcp")
    return b.build()


_HYBRID: dict = {}


def hybrid_tokens(prompts):
    key = tuple((text, tuple(imgs)) for text, imgs in prompts)
    if key not in _HYBRID:
        engine = local()
        _HYBRID[key] = [o.token_ids for o in engine.generate([{"prompt": t, "images": i} for t, i in prompts],
                                                             GREEDY)]
        engine.close()
    return _HYBRID[key]










# ------------------------------------------------------------------ in one process
def test_encoder_embeddings_equal_the_models_and_params_are_checked():
    """The encoder role's embeddings are the hybrid model's own (bit for bit in float32), it holds
    no text weights and no KV cache, and bad or mismatched params are refused before any pull."""
    encoder = EngineBuilder(MODEL).dtype("float32").role("encode").transfer("dlslime").encoder_cache(**STAGING).build()
    hybrid = local()
    try:
        assert "role=encode" in repr(encoder)
        assert not hasattr(encoder, "kv_cache") and not hasattr(encoder.tower, "language_model")
        imgs = [tiny_image(), tiny_image(40, 24, seed=1)]
        [(_, _, a), (_, _, b)] = encoder.embed(imgs)
        req = hybrid.make_request({"prompt": "x " + IMAGE_PLACEHOLDER * 2, "images": imgs})
        tokens, deepstack = hybrid.model.model.encode_images(req.multimodal)
        expected = torch.stack([tokens, *deepstack])
        assert torch.equal(torch.cat([a, b], dim=1), expected)

        prompt = {"prompt": "hello " + IMAGE_PLACEHOLDER + " and " + IMAGE_PLACEHOLDER + " world", "images": imgs}
        ref = run(hybrid, prompt)
        out = run(hybrid, prompt, ec_transfer_params=encoder.encode(imgs))  # encode -> hybrid
        assert out.token_ids == ref.token_ids
        assert hybrid.describe()["ec_pulls"]["pulled"] == 1
        encoder.poll()
        assert encoder.num_pinned == 0 and encoder.counts["released_done"] == 1

        ec = encoder.encode([imgs[1], imgs[0]])  # the images in another order
        with pytest.raises(InvalidRequestError, match="another image"):
            hybrid.add_request(prompt, GREEDY, ec_transfer_params=ec)
        with pytest.raises(InvalidRequestError, match="describe 2 images but the request has 1"):
            hybrid.add_request({"prompt": IMAGE_PLACEHOLDER, "images": [imgs[0]]}, GREEDY, ec_transfer_params=ec)
        with pytest.raises(InvalidRequestError, match="nonce"):
            hybrid.add_request(prompt, GREEDY, ec_transfer_params={**ec, "nonce": 0})
        with pytest.raises(InvalidRequestError, match="missing"):
            hybrid.add_request(prompt, GREEDY, ec_transfer_params={"engine_id": "x"})
        assert encoder.release(ec["request_id"]) and encoder.num_pinned == 0
        assert_pool_full(hybrid)
    finally:
        encoder.close()
        hybrid.close()
    with pytest.raises(ConfigError, match="runs a vision tower"):
        EngineBuilder("tiny-qwen3").role("encode").transfer("dlslime").config()


# ------------------------------------------------------------------ three processes
def test_encode_prefill_decode_in_three_processes_match_hybrid(images):
    """Encoder and prefill engines in child processes, the decode engine here: E -> P over DLSlime
    (embeddings), P -> D over DLSlime (KV). Two rounds; the second hits the prefill engine's prefix
    cache through the images' content hashes. Every buffer is back afterwards."""
    prompts = cases(images)
    expected = hybrid_tokens(prompts)
    encoder = encoder_worker()
    prefill = WorkerEngine({"model": MODEL, "role": "prefill", "dtype": "float32", "cache": {"block_size": 16},
                            "scheduler": {"max_model_len": 256}, "transfer": {}, "encoder_cache": STAGING})
    decode = local("decode")
    try:
        for round_ in range(2):
            for (text, imgs), exp in zip(prompts, expected):
                prompt = {"prompt": text, "images": imgs}
                ec = encoder.encode(imgs)
                assert [im["num_tokens"] for im in ec["images"]] == [16, 15][:len(imgs)]
                rid = prefill.add_request(prompt, GREEDY, ec_transfer_params=ec)
                first = worker_final(prefill, rid)
                assert first.error is None, first.error
                assert first.finish_reason == "kv_transfer"
                out = run(decode, prompt, kv_transfer_params=first.kv_transfer_params)
                assert out.error is None, out.error
                assert out.token_ids == exp, f"round {round_}: {text!r}"
        stats = wait_encoder_released(encoder)
        assert stats["released_done"] == 4 and stats["released_timeout"] == 0
        assert stats["image_tokens"] == 2 * (16 + 16 + 15)
        p = assert_pulled(prefill, 4)
        assert p["num_cached_tokens"] > 0  # round 2 reused the image blocks
        wait_prefill_released(prefill)
        assert_pool_full(decode)
    finally:
        decode.close()
        prefill.close()
        encoder.close()




# ------------------------------------------------------------------ failures
def test_killed_encoder_gives_a_clear_error_and_frees_every_buffer(images):
    """The encoder dies after handing out params: the pull fails fast with an error naming it, the
    request never enters the engine, and the KV pool and the receive region are whole. With
    on_pull_failure="local" the same request is encoded here and gives the hybrid engine's tokens."""
    text, imgs = cases(images)[0]
    prompt = {"prompt": text, "images": imgs}
    [expected] = hybrid_tokens([(text, imgs)])
    encoder = encoder_worker()
    ec = encoder.encode(imgs)
    encoder.kill()
    prefill = local("prefill")
    fallback = local(on_pull_failure="local")
    try:
        with pytest.raises(EncoderPullError, match=f"encoder engine {ec['engine_id']}.*(dead|unreachable|closed)"):
            prefill.add_request(prompt, GREEDY, ec_transfer_params=ec)
        assert not prefill.has_unfinished_requests()
        assert_pool_full(prefill)
        pulls = prefill.describe()["ec_pulls"]
        assert pulls["failed"] == 1 and pulls["receive_free_bytes"] == pulls["receive_bytes"]

        out = run(fallback, prompt, ec_transfer_params=ec)
        assert out.token_ids == expected
        assert fallback.describe()["ec_pulls"]["encoded_locally"] == 1
        assert_pool_full(fallback)
    finally:
        prefill.close()
        fallback.close()


def test_released_or_expired_embeddings_are_refused_and_freed(images):
    """An encoder frees what nobody pulled within its pin timeout, and a pull of embeddings the
    encoder released first (the pin re-read after the read) is discarded with a clear error."""
    text, imgs = cases(images)[0]
    prompt = {"prompt": text, "images": imgs}
    encoder = encoder_worker(pin_timeout_s=0.5)
    hybrid = local()
    try:
        ec = encoder.encode(imgs)
        time.sleep(0.8)
        stats = wait_encoder_released(encoder)
        assert stats["released_timeout"] == 1 and stats["events"][-1] == [ec["request_id"], "timeout"]
        with pytest.raises(EncoderPullError, match="released the embeddings"):
            hybrid.add_request(prompt, GREEDY, ec_transfer_params=ec)
        ec = encoder.encode(imgs)
        assert encoder.call("release", request_id=ec["request_id"])["released"]
        with pytest.raises(EncoderPullError, match="released the embeddings"):
            hybrid.add_request(prompt, GREEDY, ec_transfer_params=ec)
        pulls = hybrid.describe()["ec_pulls"]
        assert pulls["failed"] == 2 and pulls["receive_free_bytes"] == pulls["receive_bytes"]
        assert_pool_full(hybrid)
        assert wait_encoder_released(encoder)["released_abort"] == 1
    finally:
        hybrid.close()
        encoder.close()


# ------------------------------------------------------------------ asynchronous pulls
ASYNC = {"pull_mode": "async"}
TEXT = SamplingParams(max_tokens=4, temperature=0.0)
PULL_TIMEOUT_S = 6.0


def step_until(engine, done, timeout: float, what: str, finals: dict | None = None) -> None:
    """Step `engine` until `done()`, keeping its final outputs in `finals` (by request id)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        for o in engine.step():
            if o.finished and finals is not None:
                finals[o.request_id] = o
        time.sleep(0.002)  # a pull alone leaves nothing to compute: do not spin the shared cores




def receive_region(engine) -> dict:
    return engine.describe()["ec_pulls"]


def test_async_pull_from_a_stalled_encoder_lets_other_requests_run(images):
    """encoder_cache(pull_mode="async"): add_request returns at once, a text request added after a
    pull from a SIGSTOPped encoder finishes while the pull waits, then the pull times out with the
    clear error; the KV pool is whole and the receive run quarantined (the stalled read may still
    land), the encoder frees on its pin timeout once resumed."""
    text, imgs = cases(images)[0]
    prompt = {"prompt": text, "images": imgs}
    [expected] = hybrid_tokens([(text, imgs)])
    encoder = encoder_worker(pin_timeout_s=3.0)
    # the text request must finish inside the pull timeout, also on two loaded cores
    hybrid = local(pull_timeout_s=PULL_TIMEOUT_S, **ASYNC)
    try:
        out = run(hybrid, prompt, ec_transfer_params=encoder.encode(imgs))  # connects and handshakes
        assert out.error is None and out.token_ids == expected
        assert receive_region(hybrid)["pulled"] == 1
        ec = encoder.encode(imgs)
        stop_process(encoder.pid)
        try:
            t0 = time.monotonic()
            stalled = hybrid.add_request(prompt, GREEDY, ec_transfer_params=ec)
            assert time.monotonic() - t0 < 0.5, "add_request waited for the pull"
            other = hybrid.add_request("hello world", TEXT)
            finals: dict = {}
            step_until(hybrid, lambda: other in finals, 10, "the text request finished", finals)
            assert finals[other].error is None and len(finals[other].token_ids) == 4
            assert stalled not in finals and receive_region(hybrid)["in_flight"] == 1, "the pull ended too early"
            step_until(hybrid, lambda: stalled in finals, PULL_TIMEOUT_S + 10, "the stalled pull timed out", finals)
            assert PULL_TIMEOUT_S - 0.1 < time.monotonic() - t0 < PULL_TIMEOUT_S + 10
        finally:
            os.kill(encoder.pid, signal.SIGCONT)
        failed = finals[stalled]
        assert failed.finish_reason == "error" and failed.token_ids == []
        assert f"encoder engine {ec['engine_id']}" in failed.error and f"timed out after {PULL_TIMEOUT_S}s" in failed.error
        assert not hybrid.has_unfinished_requests()
        assert_pool_full(hybrid)
        pulls = receive_region(hybrid)
        assert pulls["failed"] == 1 and pulls["in_flight"] == 0
        assert pulls["quarantined_bytes"] > 0
        assert pulls["receive_free_bytes"] + pulls["quarantined_bytes"] == pulls["receive_bytes"]
        stats = wait_encoder_released(encoder)
        assert (ec["request_id"], "timeout") in [tuple(e) for e in stats["events"]]
        # the timeout dropped the endpoint: the next pull reconnects
        out = run(hybrid, prompt, ec_transfer_params=encoder.encode(imgs))
        assert out.error is None and out.token_ids == expected
    finally:
        hybrid.close()
        encoder.close()


def test_abort_during_an_async_pull_frees_everything(images):
    """Aborting a request whose pull waits (for its handshake, or for its read from a stalled
    encoder) ends it at once; the receive run stays held until the read lands (it may still write
    there), then the run and the encoder's pin are freed."""
    text, imgs = cases(images)[0]
    prompt = {"prompt": text, "images": imgs}
    encoder = encoder_worker()
    hybrid = local(**ASYNC)
    try:
        for connected in (False, True):  # the first pull waits for the handshake, the second for its read
            ec = encoder.encode(imgs)
            stop_process(encoder.pid)
            try:
                rid = hybrid.add_request(prompt, GREEDY, ec_transfer_params=ec)
                until = time.monotonic() + 0.3
                step_until(hybrid, lambda: time.monotonic() > until, 5, "")  # the engine steps; the pull waits
                assert receive_region(hybrid)["in_flight"] >= 1
                assert hybrid.abort(rid)
                [out] = [o for o in hybrid.step() if o.request_id == rid]
                assert out.finished and out.finish_reason == "abort"
                assert hybrid.num_unfinished_requests == 0
                pulls = receive_region(hybrid)
                if connected:  # the read is in flight: its run is not handed out again yet
                    assert pulls["receive_free_bytes"] < pulls["receive_bytes"]
                else:
                    assert pulls["receive_free_bytes"] == pulls["receive_bytes"]
            finally:
                os.kill(encoder.pid, signal.SIGCONT)
            step_until(hybrid, lambda: receive_region(hybrid)["in_flight"] == receive_region(hybrid)["notifying"] == 0,
                       10, "the aborted pull drained")
            assert not hybrid.has_unfinished_requests()  # it kept stepping until the pull had drained
            pulls = receive_region(hybrid)
            assert pulls["receive_free_bytes"] == pulls["receive_bytes"] and pulls["quarantined_bytes"] == 0
            assert pulls["failed"] == 0 and pulls["pulled"] == 0
            assert_pool_full(hybrid)
            stats = wait_encoder_released(encoder)
            assert (ec["request_id"], "done") in [tuple(e) for e in stats["events"]]
    finally:
        hybrid.close()
        encoder.close()


def test_async_pull_from_a_killed_encoder_ends_the_request_or_encodes_locally(images):
    """pull_mode="async": a dead encoder ends the request with finish_reason "error" naming it (no
    exception from add_request), every buffer back; with on_pull_failure="local" it is encoded here."""
    text, imgs = cases(images)[0]
    prompt = {"prompt": text, "images": imgs}
    [expected] = hybrid_tokens([(text, imgs)])
    encoder = encoder_worker()
    ec = encoder.encode(imgs)
    encoder.kill()
    prefill = local("prefill", **ASYNC)
    fallback = local(on_pull_failure="local", **ASYNC)
    try:
        out = run(prefill, prompt, ec_transfer_params=ec)
        assert out.finish_reason == "error" and out.token_ids == []
        assert re.search(f"encoder engine {ec['engine_id']}.*(dead|unreachable|closed)", out.error), out.error
        assert not prefill.has_unfinished_requests()
        assert_pool_full(prefill)
        pulls = receive_region(prefill)
        assert pulls["failed"] == 1 and pulls["in_flight"] == 0
        assert pulls["receive_free_bytes"] == pulls["receive_bytes"]

        out = run(fallback, prompt, ec_transfer_params=ec)
        assert out.error is None and out.token_ids == expected
        assert receive_region(fallback)["encoded_locally"] == 1
        assert_pool_full(fallback)
    finally:
        prefill.close()
        fallback.close()


def test_bench_vision_runs_on_cpu(tmp_path):
    """scripts/bench_vision.py (the H100 `vision` step of gpu_suite.sh) at tiny sizes on the CPU."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "vision.json"
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, os.path.join(root, "scripts", "bench_vision.py"), "--device", "cpu", "--model",
                    MODEL, "--image-size", "32", "--batches", "1", "--iters", "1", "--json", str(out)],
                   check=True, env=env, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    row = result["encoder_throughput"][0]
    assert row["image_tokens"] == 16 and row["tower_tflop"] > 0 and 0 < row["tower_mfu"]
    ttft = result["ttft_one_image"]
    assert ttft["ttft_local_ms"] > 0 and ttft["ttft_epd_ms"] > 0 and ttft["pulled"]["pulled"] == 3
