"""The parallel engine on CPU with gloo, 2 processes, against the single-process engine: greedy
tokens identical for tensor parallelism (tiny Qwen3, tiny DeepSeek-V3: MLA heads, TP experts,
shared experts) and attention-DP x expert-parallel MoE (tiny Qwen3-MoE, tiny DeepSeek-V3),
including batches where one DP rank has no requests at all. Workers exit cleanly on close();
a worker's error reaches the caller with its traceback and stops every worker.

Each test spawns its workers once and runs several batches through them."""

import functools
import time

import pytest

from dlengine import EngineBuilder, InvalidRequestError, SamplingParams
from dlengine.config import ConfigError
from dlengine.parallel import ExpertPlacement, ParallelEngine, WorkerError, launch

import parallel_helpers as helpers
from conftest import make_prompts

MAX_NEW = 12
PROMPTS = make_prompts(8)  # lengths 1 .. 100
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


@functools.lru_cache(maxsize=None)
def reference(kind: str) -> tuple:
    engine = EngineBuilder(kind).dtype("float32").build()
    outs = tuple(tuple(o.token_ids) for o in engine.generate(PROMPTS, GREEDY))
    engine.close()
    return outs


def build(kind: str, **parallel) -> ParallelEngine:
    # a hang anywhere (build, a generate) stops the workers and fails the test within 3 minutes
    engine = EngineBuilder(kind).dtype("float32").parallel(timeout_s=180, **parallel).build()
    assert isinstance(engine, ParallelEngine)
    return engine


def assert_workers_exited(procs) -> None:
    for p in procs:
        p.join(10)
    assert [p.exitcode for p in procs] == [0] * len(procs), "workers did not exit cleanly"


def check_batches(engine, kind: str) -> None:
    ref = reference(kind)
    assert [tuple(o.token_ids) for o in engine.generate(PROMPTS, GREEDY)] == list(ref)
    # one request: with attention DP the other rank has nothing to run for the whole batch
    [one] = engine.generate([PROMPTS[6]], GREEDY)
    assert tuple(one.token_ids) == ref[6] and one.finish_reason == "length"
    # uneven work: the rank with the short prompts finishes first and then only joins collectives
    outs = engine.generate([PROMPTS[0], PROMPTS[7], PROMPTS[1]],
                           [SamplingParams(max_tokens=2, temperature=0.0), GREEDY,
                            SamplingParams(max_tokens=3, temperature=0.0)])
    assert [tuple(o.token_ids) for o in outs] == [ref[0][:2], ref[7], ref[1][:3]]


@pytest.mark.parametrize("kind", ["tiny-qwen3", "tiny-deepseek-v3"])
def test_tensor_parallel_matches_single_process(kind):
    engine = build(kind, tp=2)
    procs = engine.processes
    try:
        check_batches(engine, kind)
        text = engine.generate("hello world", GREEDY)[0]
        single = EngineBuilder(kind).dtype("float32").build().generate("hello world", GREEDY)[0]
        assert text.token_ids == single.token_ids and text.text == single.text
        # random sampling: the first TP rank's tokens are broadcast, so the ranks stay in step
        sampled = engine.generate(PROMPTS[:3], SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9))
        assert all(o.finish_reason in ("length", "stop") and o.token_ids for o in sampled)
        stats = engine.stats()
        # both TP ranks ran every step, on the same batches
        assert stats[0]["num_steps"] == stats[1]["num_steps"] > 0
        assert stats[0]["idle_steps"] == stats[1]["idle_steps"] == 0
    finally:
        engine.close()
    assert_workers_exited(procs)


def test_tensor_parallel_with_kv_heads_replicated():
    """tp=4 on 2 kv heads: each kv head lives on two ranks (4 processes, 1 kv head each)."""
    engine = build("tiny-qwen3", tp=4)
    procs = engine.processes
    try:
        ref = reference("tiny-qwen3")
        assert [tuple(o.token_ids) for o in engine.generate(PROMPTS[:5], GREEDY)] == list(ref[:5])
        # the rank's cache holds 1 of the 2 kv heads: half the bytes per block of the full model
        single = EngineBuilder("tiny-qwen3").dtype("float32").build()
        per_block = single.kv_cache.nbytes / single.kv_cache.num_blocks
        info = engine.rank_info[0]
        assert info["kv_cache_gib"] * 2**30 / info["num_kv_blocks"] == per_block / 2
    finally:
        engine.close()
    assert_workers_exited(procs)


# a hand-made placement (pickled to the workers): rank 0 holds experts 1, 2, 5, 7, rank 1 the rest
SCRAMBLED = ExpertPlacement(8, 2, rank_of=(1, 0, 0, 1, 1, 0, 1, 0), slot_of=(0, 0, 1, 1, 2, 2, 3, 3))


@pytest.mark.parametrize("kind,placement", [("tiny-qwen3-moe", "contiguous"), ("tiny-deepseek-v3", SCRAMBLED)])
def test_attention_dp_expert_parallel_matches_single_process(kind, placement):
    engine = build(kind, attention_dp=2, ffn_ep=2, expert_placement=placement)
    procs = engine.processes
    try:
        before = engine.stats()
        check_batches(engine, kind)
        stats = engine.stats()
        idle = [s["idle_steps"] - b["idle_steps"] for s, b in zip(stats, before)]
        assert max(idle) > 0, "no step ran with an idle DP rank"
        # each rank routed its own tokens: together, top_k pairs per computed token in each MoE layer
        top_k = 2
        tokens = sum(s["num_computed_tokens"] for s in stats)
        layers = stats[0]["expert_token_counts"]
        assert layers
        for name in layers:
            assert sum(sum(s["expert_token_counts"][name]) for s in stats) == top_k * tokens
        # a bad prompt is refused by the front before any rank sees it; the engine stays usable
        with pytest.raises(InvalidRequestError, match="prompt 1"):
            engine.generate([PROMPTS[0], [10**6]], GREEDY)
        ok, bad = engine.generate([PROMPTS[2], [10**6]], GREEDY, raise_on_error=False)
        assert tuple(ok.token_ids) == reference(kind)[2]
        assert bad.finish_reason == "error" and "prompt token ids" in bad.error
        assert engine.generate([], GREEDY) == []  # nothing to run: every rank agrees at once
    finally:
        engine.close()
    assert_workers_exited(procs)


def test_worker_error_stops_every_worker_and_reaches_the_caller():
    engine = build("tiny-qwen3", attention_dp=2)
    procs = engine.processes
    engine.generate([PROMPTS[0]], GREEDY)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="injected failure") as info:
        engine._inject_failure(1, "injected failure")  # rank 0 waits in a barrier meanwhile
    assert info.value.rank == 1 and "Traceback" in str(info.value)
    assert time.monotonic() - t0 < 30
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([PROMPTS[0]], GREEDY)
    engine.close()  # idempotent after a failure


def test_build_error_in_a_worker_is_raised_by_build():
    # the KV cache is sized inside each worker: one block cannot hold a max-length request
    with pytest.raises(WorkerError, match="KV cache too small"):
        EngineBuilder("tiny-qwen3").dtype("float32").cache(num_blocks=1).parallel(tp=2, timeout_s=180).build()


def test_torchrun_style_distributed_engine():
    results = launch(helpers.distributed_engine_job, 2, "tiny-qwen3-moe", dict(attention_dp=2, ffn_ep=2),
                     PROMPTS[:4], MAX_NEW, timeout=300)
    ref = [list(t) for t in reference("tiny-qwen3-moe")]
    first, second = results[0]
    assert first == ref[:4] and second == ref[:1]
    assert results[1] == [ref[:4]]  # every rank's generate() returns every output


@pytest.mark.parametrize("parallel, message", [
    (dict(tp=2, attention_dp=2), "not supported"),
    (dict(tp=2, ffn_ep=2), "ffn_ep=2 is not supported"),
    (dict(attention_dp=2, ffn_ep=3), "ffn_ep=3"),
    (dict(attention_dp=2, ffn_ep=2, dispatch_backend="deep_ep"), "DeepEP"),
])
def test_unsupported_layouts_are_config_errors(parallel, message):
    with pytest.raises((ConfigError, WorkerError), match=message):
        EngineBuilder("tiny-qwen3-moe").dtype("float32").parallel(**parallel).build()


def test_under_torchrun(tmp_path):
    """The real torchrun path (RANK/WORLD_SIZE/MASTER_ADDR from the environment) through the
    check script: tp=2 on tiny Qwen3, every rank calling generate(), rank 0 reporting."""
    import json
    import os
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(root, "scripts", "gpu_check_parallel.py"), "--device", "cpu", "--only", "tiny-qwen3",
           "--json", str(out)]
    # own session: on a timeout the whole tree (torchrun and its workers) is killed
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError("torchrun job timed out:\n" + output[-3000:])
    assert proc.returncode == 0, output[-5000:]
    summary = json.loads(out.read_text())
    assert summary["passed"] and [c["status"] for c in summary["checks"]] == ["PASS"]


@pytest.mark.parametrize("what", ["tiny-qwen3", "stuck"])
def test_workers_exit_when_the_front_is_killed(what):
    """SIGKILL of the caller's process (no cleanup runs) leaves no worker behind: idle engine
    workers see their pipe close; ranks stuck in a collective notice they were orphaned."""
    import os
    import signal
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, os.path.join(here, "parallel_helpers.py"), what],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while not line.startswith("PIDS") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the front exited early"
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 2
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 15
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = [p for p in pids if _alive(p)]
        assert not alive, f"workers {alive} outlived their front"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_chunked_prefill_and_preemption_under_dp_ep():
    """Small step budget (prompts in 32-token chunks) and a cache of 16 blocks per rank (requests
    get preempted and recomputed): still the single-process tokens, while ranks idle unevenly."""
    def configured():
        return (EngineBuilder("tiny-qwen3-moe").dtype("float32").cache(block_size=16, num_blocks=16)
                .scheduler(max_num_batched_tokens=32, max_model_len=256))

    params = SamplingParams(max_tokens=24, temperature=0.0)
    ref = configured().build().generate(PROMPTS, params)
    engine = configured().parallel(attention_dp=2, ffn_ep=2, timeout_s=180).build()
    procs = engine.processes
    try:
        outs = engine.generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
        assert sum(o.metrics.num_preemptions for o in outs) > 0
    finally:
        engine.close()
    assert_workers_exited(procs)
