"""Prefill-decode disaggregation with a tensor-parallel prefill engine (tp=2: spawned worker
processes, one DLSlime endpoint per rank) and a one-rank decode engine here, over DLSlime's TCP
transport on 127.0.0.1.

Each prefill rank hands off its own KV shard (a GQA model's heads are split over the ranks, an
MLA model's latent is whole on every rank); the decode engine pulls each shard it needs from its
rank, scatters the heads into place and tells every rank it is done. Greedy tokens must equal a
hybrid engine's, and every block must be back in both sides' pools, after failures too."""

import contextlib
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch

try:
    import dlslime  # noqa: F401
except ImportError as e:
    pytest.skip(f"dlslime is not importable ({e}): pip install 'dlengine[dlslime]' and apt-get install libibverbs1",
                allow_module_level=True)

from dlengine import EngineBuilder, InvalidRequestError, SamplingParams
from dlengine.disagg import PDRouter
from dlengine.models.layers.parallel_linear import kv_heads_per_rank
from dlengine.parallel.launcher import WorkerError
from dlengine.parallel.transfer import KVLayout
from dlengine.parallel.transfer.kv_shards import kv_head_range, plan_slices, shard_layout, stage_in_slice

from conftest import make_prompts

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
PROMPTS = make_prompts(6, lengths=(1, 5, 17, 31, 100, 200))


def prefill_tp2(model, **transfer):
    return (EngineBuilder(model).dtype("float32").cache(block_size=16).scheduler(max_model_len=512)
            .parallel(tp=2, timeout_s=180).role("prefill").transfer("dlslime", transport="tcp", **transfer).build())


def local(model, role, block_size=16, **transfer):
    b = EngineBuilder(model).dtype("float32").cache(block_size=block_size).scheduler(max_model_len=512)
    if role != "hybrid":
        b.role(role).transfer("dlslime", transport="tcp", **transfer)
    return b.build()


def assert_pool_full(engine):
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def wait_prefill(prefill, cond, timeout=10.0) -> list[dict]:
    """Step the parallel prefill engine (its ranks' connectors see done-notifications and pin
    timeouts in their step) until cond(per-rank stats) holds; returns those stats."""
    deadline = time.monotonic() + timeout
    while True:
        prefill.step()
        stats = prefill.stats()
        if cond(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"prefill ranks did not get there in {timeout}s: {stats}")
        time.sleep(0.02)


def wait_prefill_released(prefill, timeout=10.0) -> list[dict]:
    """Until no rank pins anything and every rank's pool is full."""
    return wait_prefill(prefill, lambda stats: all(
        s["connector"]["pinned_requests"] == 0 and s["num_free_blocks"] == s["num_blocks"] for s in stats), timeout)


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of `pid` is stopped (state T in /proc), so a stalled peer really is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue
        if states and all(st in ("T", "t") for st in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


def run_decode(decode, prompt, kv_params, others=(), timeout=20.0):
    rid = decode.add_request(prompt, GREEDY, kv_transfer_params=kv_params)
    deadline = time.monotonic() + timeout
    outs = []
    while decode.has_unfinished_requests():
        assert time.monotonic() < deadline, "decode did not finish in time"
        outs += decode.step()
        for e in others:
            e.step()
    return [o for o in outs if o.request_id == rid and o.finished][-1]


# ------------------------------------------------------------------ slicing, no engines
@pytest.mark.parametrize("heads, tp", [(4, 2), (4, 4), (2, 4), (1, 2)])
def test_head_ranges_follow_the_qkv_split(heads, tp):
    ranges = [kv_head_range(r, heads, tp) for r in range(tp)]
    assert all(n == kv_heads_per_rank(heads, tp) for _, n in ranges)
    assert sorted({s for s, _ in ranges}) == list(range(0, heads, ranges[0][1]))  # every head, by some rank


@pytest.mark.parametrize("kind, heads, tp", [("gqa", 4, 2), ("gqa", 2, 4), ("mla", 1, 2)])
def test_shards_land_in_their_head_ranges(kind, heads, tp):
    """Each rank's block-major staging holds its heads of a full cache; reading the planned
    segments (plain byte copies here) and stage_in_slice rebuild the full cache, tails zeroed."""
    layers, parts, hd, bs, nb = 2, (1 if kind == "mla" else 2), 4, 4, 6
    full = torch.randn(layers * parts, nb, bs, heads, hd)
    cache = SimpleNamespace(storage=torch.full((layers * parts, nb, bs, heads, hd), float("nan")),
                            num_blocks=nb, block_size=bs)
    region_layout = KVLayout(kind, layers, parts, heads, hd, "float32", heads * hd * 4, bs, nb, block_major=True)
    region = torch.full((region_layout.nbytes,), 255, dtype=torch.uint8)  # NaN bytes
    slices = plan_slices(region_layout, tp)
    assert len(slices) == (1 if kind == "mla" else min(tp, heads))
    src_blocks, cache_blocks, region_blocks, n = [5, 0, 3], [1, 4, 2], [2, 3, 5], 10
    for rank, sl in slices.items():
        # the prefill rank's staging: its heads of the source blocks, block-major
        start = sl.head_start
        remote = shard_layout(region_layout, sl.heads, head_start=start)  # as the rank reports it
        staging = full[:, :, :, start:start + sl.heads].permute(1, 0, 2, 3, 4).contiguous()
        sb = staging.view(-1).view(torch.uint8)
        for r, l, length in sl.segments(remote, src_blocks, region_blocks, n):
            region[l:l + length] = sb[r:r + length]
        stage_in_slice(region, sl, cache, region_blocks, cache_blocks, n)
    got = cache.storage
    for t in range(n):
        assert torch.equal(got[:, cache_blocks[t // bs], t % bs], full[:, src_blocks[t // bs], t % bs])
    assert torch.equal(got[:, cache_blocks[-1], n % bs:], torch.zeros_like(got[:, 0, n % bs:]))


# ------------------------------------------------------------------ tp=2 prefill -> tp=1 decode
@pytest.mark.parametrize("model, shards_read", [("tiny-qwen3", 2), ("tiny-deepseek-v3", 1)],
                         ids=["qwen3-heads-split", "deepseek-v3-mla-latent-whole"])
def test_tp2_prefill_to_one_decode_matches_hybrid(model, shards_read):
    """Two rounds (the second hits the prefill ranks' prefix caches); tokens equal the hybrid
    engine's; every rank released every hand-off on the decode side's done-notification."""
    expected = [o.token_ids for o in local(model, "hybrid").generate(PROMPTS, GREEDY)]
    prefill = prefill_tp2(model)
    decode = local(model, "decode", block_size=8 if model == "tiny-qwen3" else 16, pull_timeout_s=20.0)
    try:
        # NaN bit patterns in the decode staging: block tails travel unwritten and must never
        # reach the cache
        decode.connector.region.tensor.fill_(255)
        [probe] = prefill.generate([PROMPTS[5]], SamplingParams(max_tokens=2, temperature=0.0))
        kv = probe.kv_transfer_params
        assert kv["tp_size"] == 2 and len(kv["shards"]) == 1
        assert kv["shards"][0]["engine_id"] != kv["engine_id"]
        heads = 1 if model == "tiny-deepseek-v3" else decode.connector.region.layout.heads // 2
        assert kv["layout"]["heads"] == kv["shards"][0]["layout"]["heads"] == heads  # each rank's own heads
        assert run_decode(decode, PROMPTS[5], kv, others=(prefill,)).token_ids == expected[5]
        router = PDRouter(prefill, decode)
        for round_ in range(2):
            outs = router.generate(PROMPTS, GREEDY)
            for i, (out, exp) in enumerate(zip(outs, expected)):
                assert out.error is None, out.error
                assert out.token_ids == exp, f"round {round_} prompt {i}"
            assert_pool_full(decode)
            stats = wait_prefill_released(prefill)
        handed_off = 1 + 2 * sum(len(e) > 1 for e in expected)
        assert [s["connector"]["released_done"] for s in stats] == [handed_off, handed_off]
        assert stats[0]["connector"]["engine_id"] != stats[1]["connector"]["engine_id"]
        assert {m.num_shards for m in decode.connector.migrations} == {shards_read}
        assert decode.describe()["kv_transfer"]["pulled"] == handed_off
    finally:
        prefill.close()
        decode.close()


def test_tp2_prefill_released_early_or_gone_fails_cleanly():
    """A hand-off whose pin timed out on the prefill ranks before the pull: the copy is discarded
    with an error saying so. Then the prefill engine is closed before another pull: the request
    fails saying the prefill engine is unreachable. Both sides' pools are full afterwards and
    the decode engine keeps serving."""
    prefill = prefill_tp2("tiny-qwen3", pin_timeout_s=1.0)
    decode = local("tiny-qwen3", "decode", pull_timeout_s=5.0)
    try:
        early, late = prefill.generate([PROMPTS[4], PROMPTS[5]], GREEDY)
        time.sleep(1.2)
        stats = wait_prefill_released(prefill)  # both ranks freed the hand-offs on their pin timeout
        assert [s["connector"]["released_timeout"] for s in stats] == [2, 2]
        out = run_decode(decode, PROMPTS[4], early.kv_transfer_params)
        assert out.finish_reason == "error"
        assert "released the KV blocks" in out.error and "before the pull finished" in out.error
        assert_pool_full(decode)

        [gone] = prefill.generate([PROMPTS[3]], GREEDY)
        prefill.close()
        out = run_decode(decode, PROMPTS[3], gone.kv_transfer_params)
        assert out.finish_reason == "error"
        # connected since the first pull: the read itself finds the peer gone
        engine_id = gone.kv_transfer_params["engine_id"]
        assert f"KV pull from prefill engine {engine_id} failed" in out.error and "unreachable" in out.error
        assert_pool_full(decode)
        assert decode.describe()["kv_transfer"]["failed"] == 2
        hybrid = local("tiny-qwen3", "hybrid").generate([PROMPTS[1]], GREEDY)[0].token_ids
        assert decode.generate([PROMPTS[1]], GREEDY)[0].token_ids == hybrid
    finally:
        prefill.close()
        decode.close()


def test_one_shard_failing_frees_every_rank():
    """Failures of one rank's shard: its pin slot no longer holds our nonce (released there), its
    process stalls mid-pull (SIGSTOP: the pull times out), its process dies. Each request fails
    naming that rank, the decode pool is full after each, rank 0 frees on the done-notification
    and rank 1 on its pin timeout; a later request reconnects and decodes correctly."""
    model = "tiny-qwen3"
    prefill = prefill_tp2(model, pin_timeout_s=3.0)
    decode = local(model, "decode", pull_timeout_s=2.0)
    rank1 = prefill.processes[1]
    try:
        expected = [o.token_ids for o in local(model, "hybrid").generate(PROMPTS, GREEDY)]
        warm, released, stalled = prefill.generate([PROMPTS[2], PROMPTS[3], PROMPTS[4]], GREEDY)
        assert run_decode(decode, PROMPTS[2], warm.kv_transfer_params).token_ids == expected[2]  # connects both
        rank1_id = released.kv_transfer_params["shards"][0]["engine_id"]

        kv = dict(released.kv_transfer_params)
        kv["shards"] = [dict(kv["shards"][0], nonce=kv["shards"][0]["nonce"] + 1)]  # not what rank 1 pins
        out = run_decode(decode, PROMPTS[3], kv)
        assert out.finish_reason == "error"
        assert f"prefill engine {rank1_id} released the KV blocks" in out.error
        assert_pool_full(decode)

        os.kill(rank1.pid, signal.SIGSTOP)
        wait_stopped(rank1.pid)  # the stop lands asynchronously: no read may be served before it
        try:
            out = run_decode(decode, PROMPTS[4], stalled.kv_transfer_params)
        finally:
            os.kill(rank1.pid, signal.SIGCONT)
        assert out.finish_reason == "error"
        assert f"KV transfer from prefill engine {rank1_id} timed out" in out.error
        assert_pool_full(decode)
        assert decode.describe()["kv_transfer"]["quarantined_staging_blocks"] > 0

        stats = wait_prefill_released(prefill, timeout=15.0)
        assert [s["connector"]["released_done"] for s in stats] == [3, 1]
        assert [s["connector"]["released_timeout"] for s in stats] == [0, 2]
        outs = PDRouter(prefill, decode).generate(PROMPTS[4:], GREEDY)  # rank 1 handshakes again
        assert [o.token_ids for o in outs] == expected[4:]
        wait_prefill_released(prefill)

        [dead] = prefill.generate([PROMPTS[1]], GREEDY)
        rank1.kill()
        rank1.join(10)
        out = run_decode(decode, PROMPTS[1], dead.kv_transfer_params)
        assert out.finish_reason == "error" and rank1_id in out.error
        assert_pool_full(decode)
    finally:
        with contextlib.suppress(WorkerError):  # closing says rank 1 died, which it did
            prefill.close()
        decode.close()


def test_aborts_mid_pull_free_both_sides():
    """Aborted on the decode side while both shards' reads are in flight: the request ends with
    "abort", both ranks are told to free (event "done"), the staging comes back once the reads
    ended. Aborted on the prefill side (every rank releases) mid-pull: the pin re-reads see it
    and the request fails saying so."""
    prefill = prefill_tp2("tiny-qwen3")
    decode = local("tiny-qwen3", "decode", pull_timeout_s=5.0)
    try:
        a, b = prefill.generate([PROMPTS[5], PROMPTS[4]], GREEDY)
        rid = decode.add_request(PROMPTS[5], GREEDY, kv_transfer_params=a.kv_transfer_params)
        decode.step()  # both shards' reads start
        assert [leg.state for leg in decode.connector.active[rid].legs] == ["pulling", "pulling"]
        assert decode.abort(rid)
        outs = []
        while decode.has_unfinished_requests() or decode.connector.active:
            outs += decode.step()
        assert [o.finish_reason for o in outs if o.request_id == rid] == ["abort"]
        assert_pool_full(decode)
        assert decode.connector.region.num_free == decode.connector.region.layout.num_blocks
        # both ranks told, well before their 60 s pin timeout
        wait_prefill(prefill, lambda stats: [s["connector"]["released_done"] for s in stats] == [1, 1], timeout=5.0)

        rid = decode.add_request(PROMPTS[4], GREEDY, kv_transfer_params=b.kv_transfer_params)
        decode.step()  # the reads are in flight ...
        assert prefill.abort(b.request_id)
        prefill.step()  # ... when every prefill rank gives the blocks up
        outs = []
        while decode.has_unfinished_requests():
            outs += decode.step()
        [out] = [o for o in outs if o.request_id == rid and o.finished]
        assert out.finish_reason == "error" and "released the KV blocks" in out.error
        assert_pool_full(decode)
        stats = wait_prefill_released(prefill)
        assert [s["connector"]["released_abort"] for s in stats] == [1, 1]
    finally:
        prefill.close()
        decode.close()


def test_malformed_shards_are_rejected():
    """Sharded params are checked at admission like the rest: a missing tp_size or a shard for
    another prompt is an InvalidRequestError naming it, before anything is allocated."""
    prefill = local("tiny-qwen3", "prefill")
    decode = local("tiny-qwen3", "decode")
    try:
        [first] = prefill.generate([PROMPTS[3]], GREEDY)
        kv = first.kv_transfer_params
        with pytest.raises(InvalidRequestError, match="tp_size"):
            decode.add_request(PROMPTS[3], GREEDY, kv_transfer_params=dict(kv, shards=[dict(kv)]))
        other = dict(kv, engine_id="x", prompt_hash="0" * 32)
        with pytest.raises(InvalidRequestError, match="shard 1 has another prompt_hash"):
            decode.add_request(PROMPTS[3], GREEDY, kv_transfer_params=dict(kv, shards=[other], tp_size=2))
        assert_pool_full(decode)
    finally:
        prefill.close()
        decode.close()
