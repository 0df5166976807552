"""Cache specs: derivation from the model, allocation, block-manager accounting per kind, the
memory plan, and KV transfer layouts over several groups (head gathering across TP sizes)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from dlengine import EngineBuilder
from dlengine.cache.block_manager import DROPPED_BLOCK, BlockManager
from dlengine.cache.kv_cache import KVCache, bytes_per_block
from dlengine.cache.specs import (
    FullAttentionSpec,
    MLALatentSpec,
    PerTokenSpec,
    SlidingWindowSpec,
    StateSpec,
    StateTensor,
    cache_specs_for,
)
from dlengine.config import ConfigError, ModelConfig
from dlengine.engine.memory import plan_kv_cache
from dlengine.parallel.transfer import HandshakeError, KVLayout, kv_layout
from dlengine.parallel.transfer.kv_region import KVRegion
from dlengine.testing import tiny_checkpoint

F32, BF16 = torch.float32, torch.bfloat16


@dataclass(eq=False)
class Req:
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0


def gdn_state(layers=(1, 3)) -> StateSpec:
    """Gated DeltaNet's per-sequence state: the causal-conv window and the delta-rule state."""
    return StateSpec(layers, tensors=(StateTensor("conv", (24, 3), BF16), StateTensor("ssm", (2, 4, 8), F32)))


# ------------------------------------------------------------------ derived from the model
@pytest.fixture(scope="module")
def qwen3() -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_checkpoint("qwen3"))


@pytest.fixture(scope="module")
def deepseek() -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_checkpoint("deepseek-v3"))


def test_default_specs_follow_tensor_parallel_split(qwen3, deepseek):
    n, layers = qwen3.num_key_value_heads, tuple(range(qwen3.num_hidden_layers))
    [whole] = cache_specs_for(qwen3, F32)
    assert whole == FullAttentionSpec(layers, num_kv_heads=n, head_dim=qwen3.head_dim, dtype=F32, total_kv_heads=n)
    assert whole.bytes_per_token == qwen3.num_hidden_layers * qwen3.kv_bytes_per_token_per_layer_elem * 4
    halves = [cache_specs_for(qwen3, F32, tp_size=2, tp_rank=r)[0] for r in range(2)]
    assert [h.kv_head_range for h in halves] == [(0, n // 2), (n // 2, n)]
    # more ranks than kv heads: each head replicated, rank r holds head r * n // tp
    reps = [cache_specs_for(qwen3, F32, tp_size=2 * n, tp_rank=r)[0] for r in range(2 * n)]
    assert [s.kv_head_range for s in reps] == [(r * n // (2 * n), r * n // (2 * n) + 1) for r in range(2 * n)]
    [latent] = cache_specs_for(deepseek, BF16, tp_size=4, tp_rank=3)  # the latent is whole on every rank
    hf = deepseek.hf_config
    assert latent == MLALatentSpec(tuple(range(deepseek.num_hidden_layers)),
                                   latent_dim=hf["kv_lora_rank"] + hf["qk_rope_head_dim"], dtype=BF16)


def test_model_class_declares_its_own_specs(qwen3):
    class Hybrid:
        @classmethod
        def cache_specs(cls, model_config, *, dtype, tp_size, tp_rank):
            return [FullAttentionSpec((0,), num_kv_heads=2, head_dim=8, dtype=dtype), gdn_state(layers=(1,))]

    specs = cache_specs_for(qwen3, F32, model_cls=Hybrid)
    assert [s.kind for s in specs] == ["full_attention", "state"]

    class Broken:
        @classmethod
        def cache_specs(cls, model_config, **_):
            return [FullAttentionSpec((0, 99), num_kv_heads=2, head_dim=8)]

    with pytest.raises(ConfigError, match="layer 99"):
        cache_specs_for(qwen3, F32, model_cls=Broken)


def test_bad_specs_are_refused():
    with pytest.raises(ConfigError, match="no layers"):
        FullAttentionSpec((), num_kv_heads=1, head_dim=4)
    with pytest.raises(ConfigError, match="outside"):
        FullAttentionSpec((0,), num_kv_heads=2, head_dim=4, total_kv_heads=4, head_start=3)
    with pytest.raises(ConfigError, match="window"):
        SlidingWindowSpec((0,), num_kv_heads=1, head_dim=4)
    with pytest.raises(ConfigError, match="two attention caches"):
        KVCache([FullAttentionSpec((0,), num_kv_heads=1, head_dim=4), MLALatentSpec((0,), latent_dim=8)], 4, 4)
    with pytest.raises(ConfigError, match="num_state_slots"):
        KVCache([FullAttentionSpec((0,), num_kv_heads=1, head_dim=4), gdn_state((1,))], 4, 4)


# ------------------------------------------------------------------ allocation
def test_today_caches_keep_their_shapes(qwen3, deepseek):
    c = KVCache(qwen3, 6, 4, F32)
    k, v = c.layers[0]
    assert k.shape == v.shape == (6, 4, qwen3.num_key_value_heads, qwen3.head_dim)
    assert c.storage.shape == (qwen3.num_hidden_layers, 2, 6, 4, qwen3.num_key_value_heads, qwen3.head_dim)
    assert c.nbytes == 6 * c.bytes_per_block == c.storage.numel() * 4
    m = KVCache(cache_specs_for(deepseek, BF16), 6, 4, BF16)
    k, v = m.layers[1]
    assert k.shape[2] == 1 and v.numel() == 0 and k.dtype == BF16
    c.storage = None  # what the engine's close does
    assert c.storage is None and c.layers == [] and c.nbytes == 0


def test_groups_share_one_buffer_and_views_alias_it():
    specs = [MLALatentSpec((0, 1, 2, 3), latent_dim=12, dtype=BF16),
             PerTokenSpec((0, 1, 2, 3), cache_name="indexer_k", token_shape=(16,), dtype=torch.float8_e4m3fn,
                          scale_shape=(1,), scale_dtype=F32),
             gdn_state(layers=(4,))]
    c = KVCache(specs, num_blocks=5, block_size=4, num_state_slots=3)
    assert c.bytes_per_block == 4 * 4 * (12 * 2 + 16 + 4)
    assert c.bytes_per_state_slot == 24 * 3 * 2 + 2 * 4 * 8 * 4
    assert all(g.offset % 256 == 0 for g in c.groups)
    assert c.nbytes >= sum(g.nbytes for g in c.groups)
    assert c.layers[4] is None  # the recurrent layer has no attention pair
    data, scale = c.caches_of_layer(2)["indexer_k"]
    assert data.shape == (5, 4, 16) and data.dtype == torch.float8_e4m3fn and scale.shape == (5, 4, 1)
    scale[3, 1, 0] = 7.5
    data[3, 1] = 1.0
    assert c.caches_of_layer(2)["indexer_k"][1][3, 1, 0] == 7.5 and scale[3, 0, 0] == 0  # data write kept the scale
    state = c.caches_of_layer(4)["state"]
    assert state["ssm"].shape == (3, 2, 4, 8) and state["conv"].shape == (3, 24, 3)
    state["ssm"][1].fill_(2.0)
    assert state["ssm"][0].abs().sum() == 0 and state["ssm"][2].abs().sum() == 0 and state["conv"].abs().sum() == 0
    assert c.buffer.abs().sum() > 0  # every write landed in the one buffer
    with pytest.raises(AttributeError, match="groups"):
        c.storage
    assert "indexer_k" in repr(c) and "state_slots=3" in repr(c)


# ------------------------------------------------------------------ block manager
def test_state_slots_are_taken_at_admission_and_given_back():
    specs = [FullAttentionSpec((0,), num_kv_heads=1, head_dim=4), gdn_state((1,))]
    bm = BlockManager(16, 4, specs=specs, num_state_slots=2)
    assert bm.bytes_per_block == bytes_per_block(specs, 4) == 4 * 2 * 4 * 4
    a, b, c = Req(list(range(10))), Req(list(range(5))), Req(list(range(3)))
    assert bm.allocate_slots(a, 10) and bm.allocate_slots(b, 5)
    assert {a.state_slot, b.state_slot} == {0, 1}
    free_before = bm.num_free_blocks
    assert not bm.can_allocate(c, 3)
    assert not bm.allocate_slots(c, 3)  # all or nothing: no slot, so no blocks either
    assert bm.num_free_blocks == free_before and getattr(c, "state_slot", None) is None
    a.num_computed_tokens = 10
    assert bm.allocate_slots(a, 1) and a.state_slot is not None  # a running request keeps its slot
    bm.free(b)  # finish (or preemption)
    assert b.state_slot is None and bm.allocate_slots(c, 3) and c.state_slot is not None
    bm.check_invariants()
    bm.free(a)
    bm.free(c)
    assert bm.num_free_blocks == 16 and bm.state_slots.num_free == 2
    bm.check_invariants()


def test_state_without_checkpoints_turns_prefix_hits_off():
    prompt = list(range(20))
    plain = BlockManager(16, 4)
    hybrid = BlockManager(16, 4, specs=[FullAttentionSpec((0,), num_kv_heads=1, head_dim=4), gdn_state((1,))],
                          num_state_slots=4)
    for bm in (plain, hybrid):
        first = Req(prompt)
        assert bm.allocate_slots(first, 20)
        first.num_computed_tokens = 20
        bm.cache_full_blocks(first)
        bm.free(first)
    assert plain.find_cached_prefix(Req(prompt))[1] == 16
    assert hybrid.find_cached_prefix(Req(prompt)) == ([], 0)
    assert "state" in hybrid.prefix_cache_blocker and not hybrid.cached_blocks


def test_sliding_window_drops_blocks_outside_every_window():
    sw = [SlidingWindowSpec((0, 1), num_kv_heads=1, head_dim=4, window=8)]
    bm = BlockManager(16, 4, specs=sw)
    r = Req(list(range(30)))
    assert bm.allocate_slots(r, 30)
    assert bm.drop_blocks_outside_window(r) == 0  # nothing computed yet
    r.num_computed_tokens = 30
    bm.cache_full_blocks(r)
    # the next query (position 30) reads keys 23..30: blocks 0-4 (tokens 0..19) are out of the window
    assert sw[0].blocks_outside_window(30, 4) == 5
    assert bm.drop_blocks_outside_window(r) == 5
    assert r.block_ids[:5] == [DROPPED_BLOCK] * 5 and DROPPED_BLOCK not in r.block_ids[5:]
    assert bm.num_free_blocks == 16 - 3
    assert bm.drop_blocks_outside_window(r) == 0  # idempotent
    bm.check_invariants()
    # a dropped block keeps its published content until evicted: the prefix still hits
    assert bm.find_cached_prefix(Req(list(range(30))))[1] == 28
    assert bm.allocate_slots(r, 4)  # growing keeps positional entries
    assert len(r.block_ids) == 9
    bm.free(r)
    assert bm.num_free_blocks == 16
    bm.check_invariants()
    # mixed with full attention the shared table must keep every block
    mixed = BlockManager(16, 4, specs=sw + [FullAttentionSpec((2,), num_kv_heads=1, head_dim=4)])
    r2 = Req(list(range(30)), num_computed_tokens=0)
    assert mixed.allocate_slots(r2, 30)
    r2.num_computed_tokens = 30
    assert mixed.drop_blocks_outside_window(r2) == 0


def test_per_token_spec_adds_to_block_bytes():
    specs = [MLALatentSpec((0, 1), latent_dim=576, dtype=BF16),
             PerTokenSpec((0, 1), cache_name="indexer_k", token_shape=(128,), dtype=torch.float8_e4m3fn,
                          scale_shape=(1,), scale_dtype=F32)]
    bm = BlockManager(8, 64, specs=specs)
    assert bm.bytes_per_block == 64 * 2 * (576 * 2 + 128 + 4)
    assert bm.prefix_caching_active and bm.state_slots is None


# ------------------------------------------------------------------ memory plan
def test_memory_plan_counts_every_spec():
    engine = EngineBuilder("tiny-qwen3").dtype("float32").scheduler(max_model_len=256).build()
    try:
        cfg = engine.config
        base = plan_kv_cache(cfg, None, None, F32)
        assert base.bytes_per_block == engine.kv_cache.bytes_per_block and base.num_state_slots == 0
        layers = cfg.model.num_hidden_layers
        extra = PerTokenSpec(tuple(range(layers)), cache_name="indexer_k", token_shape=(32,), dtype=F32)
        state = gdn_state(layers=(0,))
        specs = cache_specs_for(cfg.model, F32) + [extra, state]
        plan = plan_kv_cache(cfg, None, None, F32, specs=specs)
        assert plan.bytes_per_block == base.bytes_per_block + cfg.cache.block_size * layers * 32 * 4
        assert plan.num_state_slots == cfg.scheduler.max_num_seqs
        assert plan.bytes_per_state_slot == state.slot_bytes
        # on CPU the byte budget pays for the state slots first, then blocks (at least one max-length request)
        bs = cfg.cache.block_size
        full = -(-cfg.scheduler.max_num_seqs * cfg.max_model_len // bs)
        fit = (cfg.cache.cpu_kv_cache_bytes - plan.state_bytes) // plan.bytes_per_block
        assert plan.num_blocks == max(-(-cfg.max_model_len // bs), min(full, fit))
        assert "state slots" in plan.describe(cfg.cache.block_size)
    finally:
        engine.close()


# ------------------------------------------------------------------ transfer layouts
def fill(cache: KVCache, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cache.buffer.copy_(torch.randint(0, 256, cache.buffer.shape, generator=g, dtype=torch.uint8))


def copy(segs, src: torch.Tensor, dst: torch.Tensor) -> None:
    for r, l, n in segs:
        dst[l:l + n] = src[r:r + n]


def slots(blocks, bs, n):
    return [blocks[t // bs] * bs + t % bs for t in range(n)]


def test_layout_roundtrips_through_json_and_checks_groups():
    specs = [FullAttentionSpec((0, 1), num_kv_heads=2, head_dim=4, dtype=F32),
             PerTokenSpec((0, 1), cache_name="indexer_k", token_shape=(8,), dtype=BF16), gdn_state((2,))]
    c = KVCache(specs, 6, 4, num_state_slots=2)
    lay = kv_layout(c)
    assert KVLayout.from_dict(json.loads(json.dumps(lay.to_dict()))) == lay
    assert lay.nbytes <= c.nbytes and len(lay.groups) == 2 and lay.group_offsets[1] == c.groups[1].offset
    other = kv_layout(KVCache(specs[:2] + [FullAttentionSpec((2,), num_kv_heads=1, head_dim=4)], 6, 4))
    with pytest.raises(HandshakeError, match="paged groups"):
        lay.check_compatible(other)
    with pytest.raises(HandshakeError, match="malformed"):
        KVLayout.from_dict({**lay.to_dict(), "extra_groups": [{"kind": 1}]})


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_every_group_migrates(staged):
    """Two caches (different block sizes) of a latent + indexer-keys model with state slots: the
    planned segments move every paged group's tokens and a sequence's state."""
    specs = [MLALatentSpec((0, 1), latent_dim=12, dtype=BF16),
             PerTokenSpec((0, 1), cache_name="indexer_k", token_shape=(8,), dtype=torch.float8_e4m3fn,
                          scale_shape=(1,), scale_dtype=F32), gdn_state((2,))]
    src, dst = KVCache(specs, 10, 16, num_state_slots=3), KVCache(specs, 40, 4, num_state_slots=2)
    fill(src, 1)
    rb, lb, n = [3, 7], [9, 2, 5, 6, 30, 31, 32, 0], 29
    src_region = KVRegion(src, staging_blocks=4 if staged else 0)
    dst_region = KVRegion(dst, staging_blocks=16 if staged else 0)
    r_rows, l_rows = src_region.allocate(rb), dst_region.allocate(lb)
    src_region.stage_out(rb, r_rows)
    segs = dst_region.layout.segments_from(src_region.layout, r_rows, l_rows, n)
    copy(segs, src_region.tensor, dst_region.tensor)
    dst_region.stage_in(l_rows, lb, n)
    if staged:
        src_region.stage_state_out(2, 1)
    state_segs = dst_region.layout.state_segments_from(src_region.layout, 1 if staged else 2, 0)
    copy(state_segs, src_region.tensor, dst_region.tensor)
    if staged:
        dst_region.stage_state_in(0, 1)
    got_slot = 1 if staged else 0
    for name in ("mla_latent", "indexer_k"):
        for layer in (0, 1):
            a = src.caches_of_layer(layer)[name][0].flatten(0, 1).view(torch.uint8)
            b = dst.caches_of_layer(layer)[name][0].flatten(0, 1).view(torch.uint8)
            assert torch.equal(a[slots(rb, 16, n)], b[slots(lb, 4, n)]), (name, layer)
    sa, sb = src.caches_of_layer(2)["state"], dst.caches_of_layer(2)["state"]
    assert torch.equal(sa["ssm"][2], sb["ssm"][got_slot]) and torch.equal(sa["conv"][2], sb["conv"][got_slot])
    scale_src = src.caches_of_layer(1)["indexer_k"][1].flatten(0, 1)
    scale_dst = dst.caches_of_layer(1)["indexer_k"][1].flatten(0, 1)
    assert torch.equal(scale_src[slots(rb, 16, n)], scale_dst[slots(lb, 4, n)])


def test_tp1_gathers_kv_heads_from_tp2_ranks():
    """A tp=1 cache pulls each tp=2 rank's half of the kv heads (and the replicated indexer keys
    once) through the planned segments; every token's heads land in their slice."""
    heads, hd, layers = 4, 8, (0, 1, 2)
    extra = PerTokenSpec(layers, cache_name="indexer_k", token_shape=(6,), dtype=BF16)

    def specs(tp, rank):
        n = heads // tp
        return [FullAttentionSpec(layers, num_kv_heads=n, head_dim=hd, dtype=BF16, total_kv_heads=heads,
                                  head_start=rank * n), extra]

    ranks = [KVCache(specs(2, r), 8, 16) for r in range(2)]
    for r, c in enumerate(ranks):
        fill(c, 10 + r)
    for layer in layers:  # replicated groups hold the same values on every rank
        ranks[1].caches_of_layer(layer)["indexer_k"][0].copy_(ranks[0].caches_of_layer(layer)["indexer_k"][0])
    local = KVCache(specs(1, 0), 32, 4)
    mine = kv_layout(local)
    rb, lb, n = [5, 2], [7, 1, 30, 3, 4, 5, 20, 21], 27
    for r, c in enumerate(ranks):
        remote = kv_layout(c)
        with pytest.raises(HandshakeError, match="kv_head|heads"):
            mine.check_compatible(remote)  # a plain same-split pull refuses
        mine.check_head_gather(remote)
        copy(mine.segments_from(remote, rb, lb, n, replicated=(r == 0)), c.buffer, local.buffer)
    for layer in layers:
        k_loc, v_loc = (x.flatten(0, 1)[slots(lb, 4, n)] for x in local.layers[layer])
        for r, c in enumerate(ranks):
            k_rem, v_rem = (x.flatten(0, 1)[slots(rb, 16, n)] for x in c.layers[layer])
            h0 = r * heads // 2
            assert torch.equal(k_loc[:, h0:h0 + heads // 2].view(torch.int16), k_rem.view(torch.int16))
            assert torch.equal(v_loc[:, h0:h0 + heads // 2].view(torch.int16), v_rem.view(torch.int16))
        a = ranks[0].caches_of_layer(layer)["indexer_k"][0].flatten(0, 1)[slots(rb, 16, n)]
        b = local.caches_of_layer(layer)["indexer_k"][0].flatten(0, 1)[slots(lb, 4, n)]
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    # a remote whose heads are not inside ours is refused
    outside = kv_layout(KVCache([FullAttentionSpec(layers, num_kv_heads=2, head_dim=hd, dtype=BF16, total_kv_heads=8,
                                                   head_start=6), extra], 8, 16))
    with pytest.raises(HandshakeError):
        mine.check_head_gather(outside)
