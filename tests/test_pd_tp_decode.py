"""Prefill-decode disaggregation into a tensor-parallel decode engine (tp=2: spawned worker
processes, one DLSlime endpoint per rank), from a prefill engine of tp=1 (here) or tp=2 (spawned
workers), over DLSlime's TCP transport on 127.0.0.1.

Each decode rank pulls exactly the kv heads its cache shard holds (an MLA latent whole) from the
prefill rank(s) holding them; the ranks agree on when a request is ready or failed. Greedy tokens
must equal a one-process hybrid engine's, and every block must be back in both sides' pools,
after failures too. The planning of which bytes go where is checked without engines for the
splits the tests' engines cannot reach (4 ranks, heads that do not nest)."""

import contextlib
import time

import pytest
import torch

try:
    import dlslime  # noqa: F401
except ImportError as e:
    pytest.skip(f"dlslime is not importable ({e}): pip install 'dlengine[dlslime]' and apt-get install libibverbs1",
                allow_module_level=True)

from dlengine import ConfigError, EngineBuilder, SamplingParams
from dlengine.disagg import PDRouter
from dlengine.parallel.launcher import WorkerError
from dlengine.parallel.pull_agreement import PullReport, decide
from dlengine.parallel.transfer import KVLayout
from dlengine.parallel.transfer.kv_shards import (full_layout, kv_head_range, plan_slices, region_rows, shard_layout,
                                                  stage_in_slice)

from conftest import make_prompts

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
PROMPTS = make_prompts(6, lengths=(1, 5, 17, 31, 100, 200))


def builder(model, tp=1):
    b = EngineBuilder(model).dtype("float32").cache(block_size=16).scheduler(max_model_len=512)
    if tp > 1:
        b.parallel(tp=tp, timeout_s=180)
    return b


def prefill_engine(model, tp, **transfer):
    return builder(model, tp).role("prefill").transfer("dlslime", transport="tcp", **transfer).build()


def decode_tp2(model, **transfer):
    return builder(model, 2).role("decode").transfer("dlslime", transport="tcp", **transfer).build()


def prefill_stats(prefill) -> list[dict]:
    """Per rank: the prefill connector's counters and the block pool."""
    if hasattr(prefill, "processes"):
        return [dict(s["connector"], free=s["num_free_blocks"], blocks=s["num_blocks"]) for s in prefill.stats()]
    bm = prefill.block_manager
    return [dict(prefill.describe()["kv_transfer"], free=bm.num_free_blocks, blocks=bm.num_blocks)]


def wait_prefill_released(prefill, timeout=10.0) -> list[dict]:
    """Step the prefill engine (its connectors see done-notifications and pin timeouts in their
    step) until no rank pins anything and every rank's pool is full; returns its stats."""
    deadline = time.monotonic() + timeout
    while True:
        prefill.step()
        stats = prefill_stats(prefill)
        if all(s["pinned_requests"] == 0 and s["free"] == s["blocks"] for s in stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"prefill ranks did not release in {timeout}s: {stats}")
        time.sleep(0.02)


def assert_decode_pools_full(decode, timeout: float = 10.0):
    """Every decode rank: the cache pool full, and (once the reads still in flight from a failed
    request's other legs have ended: they land in staging, never in the cache) nothing queued,
    pulling or waiting for the others."""
    deadline = time.monotonic() + timeout
    while True:
        stats = decode.stats()
        for s in stats:
            assert s["num_free_blocks"] == s["num_blocks"], s
        busy = [(c["queued"], c["pulling"], c["landed_waiting_for_ranks"], c["waiting_for_staging"])
                for c in (s["connector"] for s in stats)]
        if all(b == (0, 0, 0, 0) for b in busy):
            return
        assert time.monotonic() < deadline, busy
        decode.step()
        time.sleep(0.02)


def run_decode(decode, prompt, kv_params, timeout=30.0):
    rid = decode.add_request(prompt, GREEDY, kv_transfer_params=kv_params)
    deadline = time.monotonic() + timeout
    outs = []
    while decode.has_unfinished_requests():
        assert time.monotonic() < deadline, "decode did not finish in time"
        outs += decode.step()
    return [o for o in outs if o.request_id == rid and o.finished][-1]


# ------------------------------------------------------------------ planning, no engines
SPLITS = [("gqa", 4, 1, 2), ("gqa", 4, 2, 2), ("gqa", 4, 2, 1), ("gqa", 4, 4, 2), ("gqa", 4, 2, 4), ("gqa", 4, 1, 4),
          ("gqa", 2, 2, 4), ("gqa", 2, 4, 2), ("gqa", 2, 1, 4), ("gqa", 6, 2, 3), ("gqa", 6, 3, 2),
          ("mla", 1, 1, 2), ("mla", 1, 2, 4)]


@pytest.mark.parametrize("kind, heads, prefill_tp, decode_tp", SPLITS,
                         ids=[f"{k}{h}-p{p}-d{d}" for k, h, p, d in SPLITS])
def test_each_decode_rank_gets_exactly_its_heads(kind, heads, prefill_tp, decode_tp):
    """Every decode rank reads, from the prefill ranks its plan names, whole blocks of their
    block-major staging into rows of its own staging (plain byte copies of the planned segments
    here, into rows given out of order), and stage_in_slice rebuilds exactly its heads of the
    full cache, tails zeroed; no segment writes outside the pull's rows."""
    layers, parts, hd, bs, n = 2, (1 if kind == "mla" else 2), 4, 4, 10
    nb = 4  # blocks per side; the pull's 3 blocks sit in different blocks on each side
    full = torch.randn(layers * parts, nb, bs, heads, hd)
    whole = KVLayout(kind, layers, parts, heads, hd, "float32", heads * hd * 4, bs, nb, block_major=True,
                     num_kv_heads=heads)
    src_blocks, cache_blocks = [3, 0, 2], [1, 3, 0]
    for rank in range(decode_tp):
        c0, cn = (0, heads) if kind == "mla" else kv_head_range(rank, heads, decode_tp)
        cache_layout = whole if kind == "mla" else shard_layout(whole, cn, head_start=c0)
        assert full_layout(cache_layout) == whole
        slices = plan_slices(cache_layout, prefill_tp, rank)
        if kind == "mla":
            assert len(slices) == 1 and all(s.whole for s in slices.values())
        for q, sl in slices.items():  # the rank read really holds those heads
            assert (sl.head_start, sl.heads) == ((0, 1) if kind == "mla" else kv_head_range(q, heads, prefill_tp))
        rows = region_rows(list(slices.values()), n)
        total_rows = 3 * rows + 2
        region_rows_given = list(range(total_rows - 1, 0, -3))[:rows]  # scattered, descending
        row = cache_layout.block_bytes
        region = torch.full((total_rows * row,), 255, dtype=torch.uint8)  # NaN bytes
        allowed = torch.zeros(total_rows * row, dtype=torch.bool)
        for r in region_rows_given:
            allowed[r * row:(r + 1) * row] = True
        cache = torch.full((layers * parts, nb, bs, cn, hd), float("nan"))
        kv = type("Cache", (), {"storage": cache, "num_blocks": nb, "block_size": bs})()
        for q, sl in slices.items():
            remote = sl.layout if sl.whole else shard_layout(whole, sl.heads, head_start=sl.head_start)
            staging = full[:, :, :, sl.head_start:sl.head_start + sl.heads].permute(1, 0, 2, 3, 4).contiguous()
            sb = staging.view(-1).view(torch.uint8)
            for r, l, length in sl.segments(remote, src_blocks, region_rows_given, n):
                assert allowed[l:l + length].all(), "a segment writes outside the pull's staging rows"
                region[l:l + length] = sb[r:r + length]
            stage_in_slice(region, sl, kv, region_rows_given, cache_blocks, n)
        want = full[:, :, :, c0:c0 + cn]
        for t in range(n):
            assert torch.equal(cache[:, cache_blocks[t // bs], t % bs], want[:, src_blocks[t // bs], t % bs])
        assert torch.equal(cache[:, cache_blocks[-1], n % bs:], torch.zeros_like(cache[:, 0, n % bs:]))


def test_ranks_agree_on_ready_and_failed():
    """A request is ready once every rank's pull landed (in rank 0's order), failed as soon as one
    rank's failed, naming that rank; the rest stays undecided."""
    reports = [PullReport(["b", "a", "c"], {}), PullReport(["a", "b"], {"c": "pin lost"})]
    d = decide(reports)
    assert d.ready == ["b", "a"]
    assert d.failed == {"c": "decode rank 1: pin lost"}
    d = decide([PullReport(["a"], {}), PullReport([], {})])
    assert d.ready == [] and d.failed == {}


@pytest.mark.parametrize("model, why", [("tiny-qwen3.5", "recurrent state"), ("tiny-deepseek-v4", "DeepseekV4ForCausalLM.*recurrent state")])
def test_decode_tp_refused_where_state_is_not_sharded(model, why):
    with pytest.raises(ConfigError, match=why):
        EngineBuilder(model).parallel(tp=2).role("decode").transfer("dlslime", transport="tcp").config()


# ------------------------------------------------------------------ engines
CASES = [("tiny-qwen3", 1), ("tiny-qwen3", 2), ("tiny-deepseek-v3", 1)]


@pytest.mark.parametrize("model, prefill_tp", CASES, ids=["qwen3-tp1-to-tp2", "qwen3-tp2-to-tp2", "deepseek-v3-tp1-to-tp2"])
def test_tp2_decode_matches_hybrid(model, prefill_tp):
    """Tokens equal the hybrid engine's for prompts of 1-200 tokens; every decode rank pulled
    every request (GQA: its own kv head, from the one prefill rank holding it; MLA: the latent),
    every prefill rank released every hand-off on the decode side's done-notification, and both
    sides' pools are full."""
    expected = [o.token_ids for o in builder(model).build().generate(PROMPTS, GREEDY)]
    prefill = prefill_engine(model, prefill_tp)
    decode = decode_tp2(model, pull_timeout_s=20.0)
    try:
        outs = PDRouter(prefill, decode).generate(PROMPTS, GREEDY)
        for i, (out, exp) in enumerate(zip(outs, expected)):
            assert out.error is None, out.error
            assert out.token_ids == exp, f"prompt {i}"
        assert_decode_pools_full(decode)
        handed_off = sum(len(e) > 1 for e in expected)
        assert [s["connector"]["pulled"] for s in decode.stats()] == [handed_off, handed_off]
        stats = wait_prefill_released(prefill)
        assert [s["released_done"] for s in stats] == [handed_off] * prefill_tp
    finally:
        prefill.close()
        decode.close()


def test_one_decode_rank_failing_fails_the_request_everywhere():
    """tp=2 prefill -> tp=2 decode, decode rank r reading prefill rank r. Rank 1's shard params
    edited (a nonce prefill rank 1 does not pin): decode rank 1's pin check fails while rank 0's
    pull lands; the request fails on both ranks naming rank 1, prefill rank 0 frees on the
    done-notification, rank 1 on its pin timeout. Then prefill rank 1 is killed: decode rank 1's
    read fails, the request fails everywhere. After each, every decode rank's pool is full and
    the engine keeps serving."""
    model = "tiny-qwen3"
    expected = [o.token_ids for o in builder(model).build().generate(PROMPTS, GREEDY)]
    prefill = prefill_engine(model, 2, pin_timeout_s=2.0)
    decode = decode_tp2(model, pull_timeout_s=5.0)
    try:
        warm, edited = prefill.generate([PROMPTS[2], PROMPTS[4]], GREEDY)
        assert run_decode(decode, PROMPTS[2], warm.kv_transfer_params).token_ids == expected[2]  # connects
        rank1_id = edited.kv_transfer_params["shards"][0]["engine_id"]

        kv = dict(edited.kv_transfer_params)
        kv["shards"] = [dict(kv["shards"][0], nonce=kv["shards"][0]["nonce"] + 1)]
        out = run_decode(decode, PROMPTS[4], kv)
        assert out.finish_reason == "error"
        assert out.error.startswith("decode rank 1: ") and f"prefill engine {rank1_id} released" in out.error
        assert_decode_pools_full(decode)
        assert [s["connector"]["failed"] for s in decode.stats()] == [1, 1]
        time.sleep(2.2)
        stats = wait_prefill_released(prefill)
        assert [s["released_done"] for s in stats] == [2, 1]  # warm + edited on rank 0; warm on rank 1
        assert [s["released_timeout"] for s in stats] == [0, 1]  # rank 1 was never told about the edited one

        [fresh] = prefill.generate([PROMPTS[3]], GREEDY)
        assert run_decode(decode, PROMPTS[3], fresh.kv_transfer_params).token_ids == expected[3]
        [doomed] = prefill.generate([PROMPTS[1]], GREEDY)
        rank1 = prefill.processes[1]
        rank1.kill()
        rank1.join(10)
        out = run_decode(decode, PROMPTS[1], doomed.kv_transfer_params)
        assert out.finish_reason == "error" and rank1_id in out.error and "decode rank 1" in out.error
        assert_decode_pools_full(decode)
        # no prefill engine needed for a prompt computed here
        hybrid = builder(model).build().generate([PROMPTS[0]], GREEDY)[0].token_ids
        assert decode.generate([PROMPTS[0]], GREEDY)[0].token_ids == hybrid
    finally:
        with contextlib.suppress(WorkerError):  # closing says prefill rank 1 died, which it did
            prefill.close()
        decode.close()
