"""Prefill-decode disaggregation of a Gated DeltaNet hybrid (tiny Qwen3.5-MoE) when either side is
tensor-parallel (tp=2: spawned worker processes, gloo, one DLSlime TCP endpoint per rank on
127.0.0.1): each decode rank pulls exactly its own heads of the recurrent state (conv channels
q | k | v and delta-rule heads) from whichever prefill rank(s) hold them, beside its kv heads.

Greedy tokens must equal the one-process hybrid engine's for prompts of several lengths (across
block and prefill-chunk boundaries), for prefill tp -> decode tp of 2 -> 1, 1 -> 2 and 2 -> 2;
afterwards every pool is full on both sides. One failed leg fails the request and leaves every
pool full. The byte mapping itself is checked without engines, against state slots cut the way
the model cuts its conv weights and per-head tensors, for splits the engines cannot reach."""

import contextlib
import time

import pytest
import torch

try:
    import dlslime  # noqa: F401
except ImportError as e:
    pytest.skip(f"dlslime is not importable ({e}): pip install 'dlengine[dlslime]' and apt-get install libibverbs1",
                allow_module_level=True)

from dlengine import EngineBuilder, SamplingParams
from dlengine.cache.specs import StateSpec, StateTensor
from dlengine.disagg import PDRouter
from dlengine.models.layers.gated_deltanet import GatedDeltaNetShape
from dlengine.parallel.launcher import WorkerError
from dlengine.parallel.transfer import HandshakeError, KVLayout
from dlengine.parallel.transfer.layout import state_group_layout
from dlengine.parallel.transfer.state_shards import plan_state_reads

from conftest import make_prompts

MODEL = "tiny-qwen3.5-moe"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
PROMPTS = make_prompts(5, lengths=(1, 5, 17, 40, 100))  # chunks of 32 tokens: 40 and 100 span several


# ------------------------------------------------------------------ the byte mapping, no engines
def gdn_shape(hk: int, hv: int, dk: int = 3, dv: int = 5, kernel: int = 4) -> GatedDeltaNetShape:
    """Odd head dims and a bf16 conv: the tensors of a slot do not end on the 16-byte alignment."""
    return GatedDeltaNetShape({"linear_num_key_heads": hk, "linear_num_value_heads": hv, "linear_key_head_dim": dk,
                               "linear_value_head_dim": dv, "linear_conv_kernel_dim": kernel}, "test")


def rank_slot(spec: StateSpec, full: list[dict], shape: GatedDeltaNetShape, rank: int, tp: int) -> torch.Tensor:
    """One slot's bytes as rank `rank` of `tp` keeps them, cut from the full state as the model
    cuts its weights: conv channels q | k | v each narrowed to the rank's (GatedDeltaNet._load_conv),
    delta-rule states to its value heads (_load_per_value_head)."""
    local = shape.for_rank(tp)
    storage = torch.zeros((1, spec.slot_bytes), dtype=torch.uint8)
    for layer, views in zip(full, spec.layer_views(storage, 0, 0, 1)):
        q, k, v = layer["conv"].split([shape.key_dim, shape.key_dim, shape.value_dim])
        views["conv"][0] = torch.cat([q.narrow(0, rank * local.key_dim, local.key_dim),
                                      k.narrow(0, rank * local.key_dim, local.key_dim),
                                      v.narrow(0, rank * local.value_dim, local.value_dim)])
        views["ssm"][0] = layer["ssm"].narrow(0, rank * local.num_v_heads, local.num_v_heads)
    return storage[0]


def slot_tensors(spec: StateSpec, slot: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor of a slot's bytes, as the cache views them (alignment padding left out: no
    one reads it)."""
    views = spec.layer_views(slot.view(1, -1), 0, 0, 1)
    return [layer[t.name][0] for layer in views for t in spec.tensors]


def region_layout(spec: StateSpec, slots: int) -> KVLayout:
    """A staging region of no blocks and `slots` state slots of `spec` (the paged part is empty)."""
    return KVLayout("full_attention", 1, 2, 1, 4, "float32", 16, 16, 0, True, state_groups=(state_group_layout(spec),),
                    state_offsets=(0,), num_state_slots=slots)


SPLITS = [(2, 4, 2, 1), (2, 4, 1, 2), (2, 4, 2, 2), (4, 8, 4, 2), (4, 8, 2, 4), (4, 8, 1, 4), (4, 8, 4, 1),
          (4, 4, 2, 4), (6, 12, 2, 3), (6, 6, 3, 2)]


@pytest.mark.parametrize("hk, hv, prefill_tp, decode_tp", SPLITS,
                         ids=[f"hk{k}-hv{v}-p{p}-d{d}" for k, v, p, d in SPLITS])
def test_each_decode_rank_gets_exactly_its_state_heads(hk, hv, prefill_tp, decode_tp):
    """Plain byte copies of the planned segments, from each prefill rank's staging slot (slot 2
    of 3) into a decode rank's (slot 1 of 3, the others NaN bytes), rebuild exactly the slot the
    decode rank's model would hold; each head is read once, nothing lands outside the slot."""
    shape, layers = gdn_shape(hk, hv), (0, 2, 3)
    full = [{"conv": torch.randn(shape.conv_dim, shape.conv_kernel - 1).to(torch.bfloat16),
             "ssm": torch.randn(hv, shape.head_k_dim, shape.head_v_dim)} for _ in layers]

    def spec_of(rank, tp):
        return gdn_shape(hk, hv).for_rank(tp).state_spec(layers, torch.bfloat16, rank, tp)

    prefill = []
    for r in range(prefill_tp):
        spec = spec_of(r, prefill_tp)
        buf = torch.zeros(3 * spec.slot_bytes, dtype=torch.uint8)
        buf[2 * spec.slot_bytes:] = rank_slot(spec, full, shape, r, prefill_tp)
        prefill.append((region_layout(spec, 3), buf))
    for d in range(decode_tp):
        spec = spec_of(d, decode_tp)
        local = region_layout(spec, 3)
        region = torch.full((3 * spec.slot_bytes,), 255, dtype=torch.uint8)
        written = torch.zeros(3 * spec.slot_bytes, dtype=torch.int)
        plan = plan_state_reads(local, [lay for lay, _ in prefill], d)
        for r, read in plan.items():
            remote, buf = prefill[r]
            for src, dst, n in read.segments(remote, 2, local, 1):
                region[dst:dst + n] = buf[src:src + n]
                written[dst:dst + n] += 1
        got = slot_tensors(spec, region[spec.slot_bytes:2 * spec.slot_bytes])
        want = slot_tensors(spec, rank_slot(spec, full, shape, d, decode_tp))
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want))
        assert written[:spec.slot_bytes].sum() == 0 and written[2 * spec.slot_bytes:].sum() == 0
        assert written.max() <= 1
        # exactly the prefill ranks holding some of our key heads are read
        mine = set(range(d * hk // decode_tp, (d + 1) * hk // decode_tp))
        holders = {r for r in range(prefill_tp) if mine & set(range(r * hk // prefill_tp, (r + 1) * hk // prefill_tp))}
        assert set(plan) == holders
        if prefill_tp == decode_tp:  # the same heads on both sides: the whole slot, one segment
            assert len(plan[d].segments(prefill[d][0], 2, local, 1)) == 1


def test_replicated_state_is_read_whole_from_one_rank():
    """A state group every rank keeps whole (heads=0, DeepSeek-V4's rings) comes from one
    prefill rank, spread over them by decode rank."""
    spec = StateSpec((0, 1), tensors=(StateTensor("window_kv", (3, 5), torch.bfloat16),))
    lay = region_layout(spec, 2)
    for d in range(4):
        plan = plan_state_reads(lay, [lay, lay], d)
        assert list(plan) == [d % 2]
        assert plan[d % 2].segments(lay, 1, lay, 0) == [(spec.slot_bytes, 0, spec.slot_bytes)]


def test_state_of_another_model_is_refused():
    layers = (0, 1)
    mine = region_layout(gdn_shape(2, 4).state_spec(layers, torch.float32), 1)
    other = region_layout(gdn_shape(2, 4, dv=7).for_rank(2).state_spec(layers, torch.float32, 0, 2), 1)
    with pytest.raises(HandshakeError, match="does not hold this model's state"):
        plan_state_reads(mine, [other, other])
    with pytest.raises(HandshakeError, match="state groups"):
        mine.check_compatible(other)
    half = region_layout(gdn_shape(2, 4).for_rank(2).state_spec(layers, torch.float32, 0, 2), 1)
    mine.check_state_compatible(half)  # the same model split over two ranks: fine
    with pytest.raises(HandshakeError, match="do not cover"):
        plan_state_reads(mine, [half, half])  # both claim heads [0, 1): head 1 is nowhere


@pytest.mark.parametrize("model", ["tiny-qwen3.5", "tiny-deepseek-v4"])
def test_decode_tp_of_state_models_is_accepted(model):
    """Once refused (a decode rank could not get its state); now a state split by head, or one
    every rank keeps whole, is pulled per rank."""
    EngineBuilder(model).parallel(tp=2).role("decode").transfer("dlslime", transport="tcp").config()


# ------------------------------------------------------------------ engines
def builder(tp=1, model=MODEL):
    b = (EngineBuilder(model).dtype("float32").cache(block_size=16)
         .scheduler(max_model_len=256, max_num_batched_tokens=32))
    if tp > 1:
        b.parallel(tp=tp, timeout_s=180)
    return b


def engine(role, tp, **transfer):
    return builder(tp).role(role).transfer("dlslime", transport="tcp", **transfer).build()


@pytest.fixture(scope="module")
def expected():
    hybrid = builder().build()
    try:
        return [o.token_ids for o in hybrid.generate(PROMPTS, GREEDY)]
    finally:
        hybrid.close()


@pytest.fixture(scope="module")
def prefill_tp2():
    e = engine("prefill", 2, pin_timeout_s=3.0)
    yield e
    with contextlib.suppress(WorkerError):
        e.close()


@pytest.fixture(scope="module")
def decode_tp2():
    e = engine("decode", 2, pull_timeout_s=20.0)
    yield e
    e.close()


def stats_of(e) -> list[dict]:
    """Per rank: the connector's counters, the block pool, the state slots, the staging."""
    if hasattr(e, "processes"):
        return [dict(s["connector"], free=s["num_free_blocks"], blocks=s["num_blocks"]) for s in e.stats()]
    bm = e.block_manager
    region = e.connector.region
    return [dict(e.describe()["kv_transfer"], free=bm.num_free_blocks, blocks=bm.num_blocks,
                 free_state=bm.state_slots.num_free, state_slots=bm.state_slots.num_slots,
                 free_staging=region.num_free, staging=region.layout.num_blocks,
                 free_staging_state=region.num_free_state_slots, staging_state=region.layout.num_state_slots)]


def wait_until_free(e, pinned_key=None, timeout=15.0) -> list[dict]:
    """Step `e` until every rank's pools are full (and, on a prefill engine, nothing pinned)."""
    deadline = time.monotonic() + timeout
    while True:
        e.step()
        stats = stats_of(e)
        full = all(s["free"] == s["blocks"] and s.get("free_state", 0) == s.get("state_slots", 0)
                   and s.get("free_staging", 0) == s.get("staging", 0)
                   and s.get("free_staging_state", 0) == s.get("staging_state", 0) for s in stats)
        idle = all(s.get("pinned_requests", 0) == 0 and s.get("queued", 0) == 0 and s.get("pulling", 0) == 0
                   and s.get("landed_waiting_for_ranks", 0) == 0 for s in stats)
        if full and idle:
            return stats
        assert time.monotonic() < deadline, f"pools not full after {timeout}s: {stats}"
        time.sleep(0.02)


def check_pd(prefill, decode, expected):
    pulled = [s["pulled"] for s in stats_of(decode)]
    outs = PDRouter(prefill, decode).generate(PROMPTS, GREEDY)
    for i, (out, exp) in enumerate(zip(outs, expected)):
        assert out.error is None, out.error
        assert out.token_ids == exp, f"prompt {i} ({len(PROMPTS[i])} tokens)"
    wait_until_free(decode)
    wait_until_free(prefill)
    handed_off = sum(len(e) > 1 for e in expected)  # one-token answers end on the prefill engine
    assert [s["pulled"] - n for s, n in zip(stats_of(decode), pulled)] == [handed_off] * len(pulled)


def test_prefill_tp2_to_decode_tp1(prefill_tp2, expected):
    """The tp=1 decode engine reads each prefill rank's half of the kv heads and of the state."""
    decode = engine("decode", 1, pull_timeout_s=20.0)
    try:
        decode.connector.region.tensor.fill_(255)  # NaN bytes: a state byte not pulled would show
        check_pd(prefill_tp2, decode, expected)
        assert all(m.num_shards == 2 for m in decode.connector.migrations)
    finally:
        decode.close()


def test_prefill_tp1_to_decode_tp2(decode_tp2, expected):
    """Each decode rank reads its half of the state out of the tp=1 prefill engine's slot."""
    prefill = engine("prefill", 1)
    try:
        check_pd(prefill, decode_tp2, expected)
    finally:
        prefill.close()


def test_prefill_tp2_to_decode_tp2(prefill_tp2, decode_tp2, expected):
    check_pd(prefill_tp2, decode_tp2, expected)


def test_one_failed_leg_fails_the_request_and_frees_everything(prefill_tp2, expected):
    """tp=2 -> tp=1: prefill rank 1's params edited (a nonce that rank does not pin): its leg's
    pin check fails after its KV and state landed in staging; the request fails naming rank 1,
    every block, state slot and staging slot of the decode engine is free, prefill rank 0 frees
    on the done-notification and rank 1 on its pin timeout. The engine keeps serving."""
    decode = engine("decode", 1, pull_timeout_s=20.0)
    try:
        [p] = prefill_tp2.generate([PROMPTS[3]], GREEDY)
        kv = dict(p.kv_transfer_params)
        rank1 = kv["shards"][0]["engine_id"]
        kv["shards"] = [dict(kv["shards"][0], nonce=kv["shards"][0]["nonce"] + 1)]
        rid = decode.add_request(PROMPTS[3], GREEDY, kv_transfer_params=kv)
        outs, deadline = [], time.monotonic() + 30
        while decode.has_unfinished_requests():
            assert time.monotonic() < deadline
            outs += decode.step()
        [out] = [o for o in outs if o.request_id == rid and o.finished]
        assert out.finish_reason == "error" and f"prefill engine {rank1} released" in out.error
        assert decode.connector.counts["failed"] == 1
        wait_until_free(decode)
        wait_until_free(prefill_tp2)
        check_pd(prefill_tp2, decode, expected)
    finally:
        decode.close()


def test_deepseek_v4_state_whole_on_every_rank():
    """DeepSeek-V4 keeps its whole cache (compressed KV and state rings) on every rank: each
    decode rank reads it all from one prefill rank; 2 -> 1 and 2 -> 2 give the hybrid engine's
    tokens and leave every pool full."""
    model, prompts = "tiny-deepseek-v4", PROMPTS[:4]
    hybrid = builder(model=model).build()
    expected = [o.token_ids for o in hybrid.generate(prompts, GREEDY)]
    hybrid.close()
    prefill = builder(2, model).role("prefill").transfer("dlslime", transport="tcp").build()
    decodes = [builder(tp, model).role("decode").transfer("dlslime", transport="tcp", pull_timeout_s=20.0).build()
               for tp in (1, 2)]
    try:
        for decode in decodes:
            outs = PDRouter(prefill, decode).generate(prompts, GREEDY)
            assert [o.error for o in outs] == [None] * len(prompts)
            assert [o.token_ids for o in outs] == expected
            wait_until_free(decode)
            wait_until_free(prefill)
    finally:
        prefill.close()
        for decode in decodes:
            decode.close()
