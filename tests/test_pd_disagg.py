"""Prefill-decode disaggregation over DLSlime's TCP transport, for real: engines in separate OS
processes, sockets on 127.0.0.1, a dlslime-ctrl control plane over a real redis-server.

Greedy tokens must equal a hybrid engine's; every failure (dead prefill, dead decode, stalled
transfer, decode out of blocks, aborts on either side, handshake mismatch, malformed params) must
end with a clear error and every block back in both surviving pools."""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch

try:
    import dlslime  # noqa: F401
except ImportError as e:  # CI installs it (.ci/run); say why when it is not there
    pytest.skip(f"dlslime is not importable ({e}): pip install 'dlengine[dlslime]' and apt-get install libibverbs1",
                allow_module_level=True)

from dlengine import EngineBuilder, InvalidRequestError, SamplingParams
from dlengine.disagg import PDRouter
from dlengine.disagg.discovery import ControlPlane, StaticPeers
from dlengine.disagg.worker import WorkerEngine
from dlengine.parallel.transfer import KVLayout

from conftest import make_prompts

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
PROMPTS = make_prompts(8, lengths=(1, 5, 16, 17, 31, 64, 100, 200))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


@pytest.fixture(scope="module")
def control_plane():
    """redis-server and dlslime-ctrl on random free loopback ports, torn down afterwards."""
    ctrl_bin = shutil.which("dlslime-ctrl") or os.path.join(os.path.dirname(os.sys.executable), "dlslime-ctrl")
    if not shutil.which("redis-server") or not os.path.exists(ctrl_bin):
        pytest.skip("needs redis-server (apt-get install redis-server) and dlslime-ctrl (pip install dlslime-ctrl)")
    procs = []
    try:
        rport, cport = free_port(), free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis)
        wait_port(rport, redis, "redis-server")
        ctrl = subprocess.Popen([ctrl_bin, "server", "--host", "127.0.0.1", "--port", str(cport), "--redis-url",
                                 f"redis://127.0.0.1:{rport}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(ctrl)
        wait_port(cport, ctrl, "dlslime-ctrl")
        yield f"http://127.0.0.1:{cport}"
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def spec(model, role, block_size=16, **transfer):
    return {"model": model, "role": role, "dtype": "float32", "cache": {"block_size": block_size},
            "scheduler": {"max_model_len": 512}, "transfer": transfer}


def local(model, role, block_size=16, dtype="float32", cache=None, scheduler=None, **transfer):
    b = EngineBuilder(model).dtype(dtype).cache(block_size=block_size, **(cache or {}))
    b.scheduler(max_model_len=512, **(scheduler or {}))
    if role != "hybrid":
        b.role(role).transfer("dlslime", transport="tcp", **transfer)
    return b.build()


_HYBRID: dict = {}


def hybrid_tokens(model, prompts, params=GREEDY, dtype="float32"):
    key = (model, dtype, params.max_tokens, tuple(map(tuple, prompts)))
    if key not in _HYBRID:
        engine = local(model, "hybrid", dtype=dtype)
        _HYBRID[key] = [o.token_ids for o in engine.generate(prompts, params)]
    return _HYBRID[key]


def assert_pool_full(engine):
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def wait_worker_pool_full(worker, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = worker.stats()
        if s["num_free_blocks"] == s["num_blocks"] and not (s["role"] or {}).get("pinned_requests"):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"worker pool not full after {timeout}s: {s['num_free_blocks']}/{s['num_blocks']}, "
                                 f"{s['role']}")
        time.sleep(0.05)


def step_until(engines, cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    outs = []
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        for e in engines:
            outs += e.step()
        time.sleep(0.002)
    return outs


def run_decode(decode, prompt, kv_params, params=GREEDY, others=(), timeout=20.0):
    rid = decode.add_request(prompt, params, kv_transfer_params=kv_params)
    outs = step_until([decode, *others], lambda: not decode.has_unfinished_requests(), timeout)
    return [o for o in outs if o.request_id == rid and o.finished][-1]


# ------------------------------------------------------------------ layout planning (no engines)
def test_segments_coalesce_and_cross_block_sizes():
    """Copy through the planned segments with plain tensor slicing and compare token by token."""
    def make(bs, nb):
        return KVLayout("gqa", 2, 2, 2, 4, "float32", 2 * 4 * 4, bs, nb)

    remote, mine = make(16, 10), make(4, 40)
    src = torch.randn(2 * 2 * 10 * 16 * 8)
    dst = torch.zeros(2 * 2 * 40 * 4 * 8)
    remote_blocks, local_blocks, n = [3, 7, 1], [9, 2, 5, 6, 30, 31, 32, 33, 0, 11, 12], 41
    segs = mine.segments_from(remote, remote_blocks, local_blocks, n)
    sb, db = src.view(torch.uint8), dst.view(torch.uint8)
    for r, l, length in segs:
        db[l:l + length] = sb[r:r + length]
    src_v, dst_v = src.view(4, 10 * 16, 8), dst.view(4, 40 * 4, 8)
    for t in range(n):
        s_slot = remote_blocks[t // 16] * 16 + t % 16
        d_slot = local_blocks[t // 4] * 4 + t % 4
        assert torch.equal(src_v[:, s_slot], dst_v[:, d_slot])
    # runs merge where both sides stay contiguous: [9] [2] [5 6] [30..33] [0] [11 12] per plane
    assert len(segs) == 6 * 4
    same = make(16, 10)
    assert len(same.segments_from(remote, [4, 5, 6], [1, 2, 3], 48)) == 4  # one per plane
    with pytest.raises(Exception, match="do not fit"):
        mine.segments_from(remote, [1], [1], 17)


# ------------------------------------------------------------------ two processes, control plane
@pytest.mark.parametrize("model, decode_block_size", [("tiny-qwen3", 8), ("tiny-deepseek-v3", 16)],
                         ids=["qwen3-bs16to8", "deepseek-v3-mla"])
def test_two_processes_match_hybrid(control_plane, model, decode_block_size):
    """Prefill in a child process, decode here, both registered with dlslime-ctrl; the decode
    side finds the prefill node through discovery. Two rounds: the second one hits the prefill
    engine's prefix cache. Tokens equal the hybrid engine's."""
    expected = hybrid_tokens(model, PROMPTS)
    worker = WorkerEngine({**spec(model, "prefill"), "control_plane": {"url": control_plane, "heartbeat_s": 0.5}})
    decode = None
    try:
        decode = (EngineBuilder(model).dtype("float32").cache(block_size=decode_block_size)
                  .scheduler(max_model_len=512).role("decode").transfer("dlslime", transport="tcp")
                  .control_plane(control_plane, heartbeat_s=0.5).build())
        assert "transfer=dlslime/tcp" in repr(decode)
        assert decode.describe()["kv_transfer"]["transfer_transport"] == "tcp"
        nodes = {n.engine_id: n for n in ControlPlane(control_plane).engines()}
        assert nodes[worker.engine_id].role == "prefill"
        assert nodes[worker.engine_id].endpoint["port"] == worker.endpoint["port"]
        assert nodes[decode.connector.engine_id].role == "decode"
        router = PDRouter(worker, decode)
        for round_ in range(2):
            outs = router.generate(PROMPTS, GREEDY)
            for i, (out, exp) in enumerate(zip(outs, expected)):
                assert out.error is None, out.error
                assert out.token_ids == exp, f"round {round_} prompt {i}"
                assert out.kv_transfer_params is None  # only a prefill engine's output carries them
            assert_pool_full(decode)
            stats = wait_worker_pool_full(worker)
        assert stats["num_cached_tokens"] > 0  # round 2 hit the prefill side's prefix cache
        assert stats["role"]["released_done"] == 2 * len(PROMPTS) - sum(len(e) == 1 for e in expected)
        report = router.migration_report()
        assert report["requests"] == 2 * len(PROMPTS) and report["bytes"] > 0
    finally:
        worker.close()
        if decode is not None:
            decode.close()


def test_prefill_engine_dead_and_discovery_drops_it(control_plane):
    """Kill the prefill process after it handed KV off: the pull fails with a clear reason, the
    decode pool is full, and the node vanishes from discovery once its heartbeats stop."""
    worker = WorkerEngine({**spec("tiny-qwen3", "prefill"), "control_plane": {"url": control_plane, "heartbeat_s": 0.3}})
    cp = ControlPlane(control_plane, stale_after_s=1.5)
    decode = local("tiny-qwen3", "decode", pull_timeout_s=5.0)
    try:
        assert worker.engine_id in [n.engine_id for n in cp.engines("prefill")]
        [first] = worker.generate([PROMPTS[6]], GREEDY)
        worker.kill()
        out = run_decode(decode, PROMPTS[6], first.kv_transfer_params)
        assert out.finish_reason == "error"
        assert f"cannot reach prefill engine {worker.engine_id}" in out.error
        assert_pool_full(decode)
        # the engine keeps serving
        assert decode.generate([PROMPTS[1]], GREEDY)[0].token_ids == hybrid_tokens("tiny-qwen3", [PROMPTS[1]])[0]
        deadline = time.monotonic() + 10
        while worker.engine_id in [n.engine_id for n in cp.engines("prefill")]:
            assert time.monotonic() < deadline, "a dead engine stayed in discovery"
            time.sleep(0.2)
    finally:
        worker.kill()
        decode.close()


def test_failed_pull_recomputes_locally_when_asked():
    """on_pull_failure="recompute": the prefill process dies after handing KV off; the decode
    engine computes the prompt itself and returns exactly the hybrid engine's tokens, with the
    pool full afterwards and the fallback counted."""
    worker = WorkerEngine(spec("tiny-qwen3", "prefill"))
    decode = local("tiny-qwen3", "decode", pull_timeout_s=5.0, on_pull_failure="recompute")
    try:
        firsts = worker.generate([PROMPTS[6], PROMPTS[2]], GREEDY)
        worker.kill()
        rids = [decode.add_request(p, GREEDY, kv_transfer_params=f.kv_transfer_params)
                for p, f in zip([PROMPTS[6], PROMPTS[2]], firsts)]
        outs = step_until([decode], lambda: not decode.has_unfinished_requests(), timeout=20)
        finals = {o.request_id: o for o in outs if o.finished}
        got = [finals[r] for r in rids]
        assert [o.finish_reason for o in got] != ["error", "error"] and all(o.error is None for o in got)
        assert [o.token_ids for o in got] == hybrid_tokens("tiny-qwen3", [PROMPTS[6], PROMPTS[2]])
        assert decode.describe()["kv_transfer"]["recomputed"] == 2
        assert decode.describe()["kv_transfer"]["failed"] == 0
        assert_pool_full(decode)
    finally:
        worker.kill()
        decode.close()


def test_stalled_transfer_times_out(control_plane):
    """SIGSTOP the prefill process between two migrations: the second pull times out, the request
    fails saying so, the decode pool is full; resumed, the prefill side frees on its pin timeout."""
    worker = WorkerEngine(spec("tiny-qwen3", "prefill", pin_timeout_s=2.0))
    decode = local("tiny-qwen3", "decode", pull_timeout_s=1.0)
    try:
        a, b = worker.generate([PROMPTS[5], PROMPTS[7]], GREEDY)
        ok = run_decode(decode, PROMPTS[5], a.kv_transfer_params)  # connects and handshakes
        assert ok.token_ids == hybrid_tokens("tiny-qwen3", [PROMPTS[5]])[0]
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            out = run_decode(decode, PROMPTS[7], b.kv_transfer_params)
            assert 0.9 < time.monotonic() - t0 < 10
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        assert out.finish_reason == "error" and "timed out after 1.0s" in out.error
        assert_pool_full(decode)
        # the abandoned read may still land: its staging blocks are never reused
        assert decode.describe()["kv_transfer"]["quarantined_staging_blocks"] == 13
        stats = wait_worker_pool_full(worker, timeout=10)
        assert (b.kv_transfer_params["request_id"], "timeout") in [tuple(e) for e in stats["events"]]
        # a new connection works after the timeout dropped the old one
        [c] = worker.generate([PROMPTS[4]], GREEDY)
        assert run_decode(decode, PROMPTS[4], c.kv_transfer_params).token_ids == \
            hybrid_tokens("tiny-qwen3", [PROMPTS[4]])[0]
    finally:
        worker.kill()
        decode.close()


def test_decode_engine_dead_prefill_frees_on_timeout():
    """The decode process dies right after admitting one migrated request (before or during its
    pull) and never sees the other: the prefill engine here frees every pinned block, the second
    request's on its pin timeout."""
    prefill = local("tiny-qwen3", "prefill", pin_timeout_s=1.5)
    worker = WorkerEngine(spec("tiny-qwen3", "decode"))
    try:
        a, b = prefill.generate([PROMPTS[6], PROMPTS[7]], GREEDY)
        assert prefill.connector.num_pinned_blocks > 0
        worker.add_request(PROMPTS[6], GREEDY, kv_transfer_params=a.kv_transfer_params)
        worker.kill()
        step_until([prefill], lambda: not prefill.connector.pinned, timeout=10)
        assert_pool_full(prefill)
        assert (b.request_id, "timeout") in prefill.connector.events
        assert {r for r, _ in prefill.connector.events} >= {a.request_id, b.request_id}
    finally:
        worker.kill()
        prefill.close()


# ------------------------------------------------------------------ one process, two engines
@pytest.fixture(scope="module")
def pair():
    prefill = local("tiny-qwen3", "prefill", pin_timeout_s=30.0)
    decode = local("tiny-qwen3", "decode", cache={"num_blocks": 40}, queue_timeout_s=0.5, pull_timeout_s=5.0)
    # NaN bit patterns everywhere in both staging buffers: block tails travel unwritten, and
    # must never reach the decode cache (a masked NaN key still poisons attention)
    prefill.connector.region.tensor.fill_(255)
    decode.connector.region.tensor.fill_(255)
    yield prefill, decode
    prefill.close()
    decode.close()


def test_seeded_sampling_continues_as_on_one_engine(pair):
    """temperature > 0 with per-request seeds: the prefill engine samples the first token, the
    decode engine the rest, and the tokens equal a hybrid engine's for the same seeds."""
    prefill, decode = pair
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=s, ignore_eos=True) for s in (7, 8, 9)]
    prompts = [PROMPTS[1], PROMPTS[4], PROMPTS[6]]
    firsts = prefill.generate(prompts, params)
    got = [run_decode(decode, p, f.kv_transfer_params, params=sp, others=(prefill,)).token_ids
           for p, f, sp in zip(prompts, firsts, params)]
    want = [o.token_ids for o in local("tiny-qwen3", "hybrid").generate(prompts, params)]
    assert got == want
    assert len({tuple(t) for t in got}) == 3  # really sampled, not one greedy path
    assert_pool_full(decode)


def test_static_peers_bf16_and_direct_cache_registration():
    """bf16 caches; the prefill side registers its cache directly (staging_blocks=0: plane-major,
    blocks pinned in place), the decode side stages block-major with another block size."""
    prefill = local("tiny-qwen3", "prefill", dtype="bfloat16", staging_blocks=0)
    decode = local("tiny-qwen3", "decode", dtype="bfloat16", block_size=32)
    try:
        peers = StaticPeers([prefill, decode])
        assert [n.engine_id for n in peers.engines("prefill")] == [prefill.connector.engine_id]
        rid = prefill.add_request(PROMPTS[7], GREEDY)
        step_until([prefill], lambda: not prefill.has_unfinished_requests())
        assert prefill.block_manager.num_free_blocks < prefill.block_manager.num_blocks  # pinned in place
        assert prefill.abort(rid) and prefill.block_manager.num_free_blocks == prefill.block_manager.num_blocks
        decode.connector.region.tensor.fill_(255)  # NaN bit patterns in every staging byte not pulled
        outs = PDRouter(prefill, decode).generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == hybrid_tokens("tiny-qwen3", PROMPTS, dtype="bfloat16")
        assert_pool_full(decode)
        assert_pool_full(prefill)
    finally:
        prefill.close()
        decode.close()


def test_handshake_mismatch_fails_clearly():
    prefill = local("tiny-qwen3", "prefill")
    other_model = local("tiny-qwen3-untied", "decode")
    other_cache = local("tiny-qwen3", "decode", cache={"dtype": "bfloat16"})
    try:
        [p] = prefill.generate([PROMPTS[5]], GREEDY)
        out = run_decode(other_model, PROMPTS[5], p.kv_transfer_params)
        assert out.finish_reason == "error" and "model fingerprints differ" in out.error
        out = run_decode(other_cache, PROMPTS[5], p.kv_transfer_params)
        assert out.finish_reason == "error" and "layouts differ in dtype" in out.error
        for e in (other_model, other_cache):
            assert_pool_full(e)
        step_until([prefill], lambda: not prefill.connector.pinned)  # both failures told it to free
        assert_pool_full(prefill)
    finally:
        for e in (prefill, other_model, other_cache):
            e.close()


def test_malformed_params_are_rejected_and_engine_keeps_serving(pair):
    prefill, decode = pair
    [p] = prefill.generate([PROMPTS[4]], GREEDY)
    kv = p.kv_transfer_params
    bad = [({k: v for k, v in kv.items() if k != "block_ids"}, "missing"),
           ({**kv, "block_ids": [-1]}, "block_ids"),
           ({**kv, "nonce": "x"}, "nonce"),
           ("not a dict", "must be a dict")]
    for params, match in bad:
        with pytest.raises(InvalidRequestError, match=match):
            decode.add_request(PROMPTS[4], GREEDY, kv_transfer_params=params)
    with pytest.raises(InvalidRequestError, match="another prompt"):
        decode.add_request(PROMPTS[4][:-1] + [PROMPTS[4][-1] ^ 1], GREEDY, kv_transfer_params=kv)
    with pytest.raises(InvalidRequestError, match="decode engine"):
        prefill.add_request(PROMPTS[4], GREEDY, kv_transfer_params=kv)
    out = run_decode(decode, PROMPTS[4], kv, others=[prefill])
    assert out.token_ids == hybrid_tokens("tiny-qwen3", [PROMPTS[4]])[0]
    step_until([prefill], lambda: not prefill.connector.pinned)
    assert_pool_full(prefill)
    assert_pool_full(decode)


def test_decode_out_of_blocks_queues_then_fails(pair):
    """40 decode blocks of 16: a local 560-token request leaves too few for a 200-token pull,
    which waits; past queue_timeout_s it fails saying so, and both pools end full."""
    prefill, decode = pair
    [p] = prefill.generate([PROMPTS[7]], GREEDY)  # 200 tokens: 13 blocks
    hog = decode.add_request(make_prompts(1, lengths=(500,), seed=3)[0], SamplingParams(max_tokens=10, ignore_eos=True))
    decode.step()  # the local prompt takes 32 of 40 blocks
    rid = decode.add_request(PROMPTS[7], GREEDY, kv_transfer_params=p.kv_transfer_params)
    outs = []
    t0 = time.monotonic()
    while decode.has_unfinished_requests():
        outs += decode.step()
        prefill.step()
        time.sleep(0.1)  # 10 decode steps of the hog outlast the 0.5 s queue timeout
    [fail] = [o for o in outs if o.request_id == rid]
    assert fail.finish_reason == "error" and "out of KV blocks" in fail.error, fail.error
    assert time.monotonic() - t0 >= 0.5
    assert [o.finish_reason for o in outs if o.request_id == hog and o.finished] == ["length"]
    assert_pool_full(decode)
    step_until([prefill], lambda: not prefill.connector.pinned)
    assert_pool_full(prefill)


def test_decode_waits_for_blocks_when_it_can(pair):
    prefill, decode = pair
    decode.connector.queue_timeout_s = 30.0
    try:
        [p] = prefill.generate([PROMPTS[7]], GREEDY)
        decode.add_request(make_prompts(1, lengths=(500,), seed=3)[0], SamplingParams(max_tokens=3, ignore_eos=True))
        decode.step()
        out = run_decode(decode, PROMPTS[7], p.kv_transfer_params, others=[prefill])
        assert out.token_ids == hybrid_tokens("tiny-qwen3", [PROMPTS[7]])[0]
    finally:
        decode.connector.queue_timeout_s = 0.5
    step_until([prefill], lambda: not prefill.connector.pinned)
    assert_pool_full(prefill)
    assert_pool_full(decode)


@pytest.mark.parametrize("when", ["queued", "pulling"])
def test_abort_on_decode_side_mid_transfer(pair, when):
    prefill, decode = pair
    [p] = prefill.generate([PROMPTS[7]], GREEDY)
    rid = decode.add_request(PROMPTS[7], GREEDY, kv_transfer_params=p.kv_transfer_params)
    if when == "pulling":
        decode.step()  # starts the read; the next step would see it land
        assert decode.connector.active
    assert decode.abort(rid)
    outs = step_until([decode, prefill], lambda: not decode.has_unfinished_requests() and not prefill.connector.pinned)
    assert [o.finish_reason for o in outs if o.request_id == rid] == ["abort"]
    assert (p.request_id, "done") in prefill.connector.events  # told to free, not left to time out
    assert_pool_full(decode)
    step_until([decode], lambda: not decode.connector.active)  # the aborted read ended: staging is back
    assert decode.connector.region.num_free == decode.connector.region.layout.num_blocks
    assert_pool_full(prefill)


def test_abort_on_prefill_side_mid_transfer(pair):
    prefill, decode = pair
    [p] = prefill.generate([PROMPTS[6]], GREEDY)
    rid = decode.add_request(PROMPTS[6], GREEDY, kv_transfer_params=p.kv_transfer_params)
    decode.step()  # the read is in flight ...
    assert prefill.abort(p.request_id)  # ... when the prefill side gives the blocks up
    assert (p.request_id, "abort") in prefill.connector.events
    outs = step_until([decode], lambda: not decode.has_unfinished_requests())
    [out] = [o for o in outs if o.request_id == rid]
    assert out.finish_reason == "error" and "released the KV blocks" in out.error
    assert_pool_full(decode)
    assert_pool_full(prefill)


def test_builder_requires_transfer_for_roles():
    from dlengine import ConfigError

    with pytest.raises(ConfigError, match="needs a KV transfer engine"):
        EngineBuilder("tiny-qwen3").role("prefill").build()
    with pytest.raises(ConfigError, match="unknown KV transfer backend"):
        EngineBuilder("tiny-qwen3").role("decode").transfer("mooncake").build()
    with pytest.raises(ConfigError, match="rdma"):
        EngineBuilder("tiny-qwen3").role("decode").transfer("dlslime", transport="rdma").build()


@pytest.mark.parametrize("module", ["dlengine.builder", "dlengine.disagg.router", "dlengine.parallel.transfer",
                                    "dlengine.parallel.transfer.dlslime_backend"])
def test_docstring_examples_run(module):
    """The examples in the new builder options' and modules' docstrings are real."""
    import doctest
    import importlib

    mod = importlib.import_module(module)
    names = {"dlengine.builder": ["EngineBuilder.transfer"]}.get(module)
    finder = doctest.DocTestFinder()
    tests = [t for t in finder.find(mod) if t.examples and (names is None or any(t.name.endswith(n) for n in names))]
    assert tests
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0
