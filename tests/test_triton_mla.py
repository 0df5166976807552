"""Triton MLA kernels (absorbed split-KV decode, per-token absorbed extend rows, non-absorbed
expanded extend, latent cache write) vs the torch reference at tiny sizes, and the tiny
DeepSeek-V3 engine on the triton backend vs the torch backend / transformers.

Without CUDA everything runs under the Triton interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorations

pytest.importorskip("triton")

from dlengine import EngineBuilder, SamplingParams  # noqa: E402
from dlengine.kernels.attention import paged_attention_triton as ta  # noqa: E402
from dlengine.kernels.mla import mla_triton as tm  # noqa: E402
from dlengine.kernels.mla import mla_extend_triton as tme  # noqa: E402
from dlengine.kernels.context import AttentionMetadata  # noqa: E402
from dlengine.kernels.mla.mla_torch import MLAWeights, mla_attention_ref, write_latent_cache  # noqa: E402
from dlengine.testing import tiny_checkpoint  # noqa: E402

if DEVICE == "cpu" and not tm.interpret_mode():
    ta = importlib.reload(ta)  # imported earlier without the interpreter: rebuild the kernels
    tme = importlib.reload(tme)
    tm = importlib.reload(tm)
if DEVICE == "cpu" and not (tm.interpret_mode() and tme.interpret_mode()):
    pytest.skip("cannot switch triton to interpreter mode", allow_module_level=True)

from hf_reference import hf_greedy  # noqa: E402

# tiny MLA dims: 4 heads, latent 32 + rope 8 (rope padded to 16 in the kernel), nope 16, v 16
H, C, R, NOPE, V = 4, 32, 8, 16, 16
SCALE = (NOPE + R) ** -0.5


def make_batch(reqs, block_size, dtype=torch.float32, seed=0, c=C, r=R, h=H, nope=NOPE, v=V):
    """reqs: [(query_len, seq_len)] -> q_nope, q_pe, cache (context incl. this step's rows), meta,
    weights; block ids shuffled, one padding column in the block table."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-sl // block_size) for _, sl in reqs]
    num_blocks = sum(nblk) + 2
    perm = torch.randperm(num_blocks, generator=g)
    cache = torch.randn(num_blocks, block_size, 1, c + r, generator=g).to(dtype)
    tables = torch.zeros(len(reqs), max(nblk) + 1, dtype=torch.int32)
    slots, qsl, used = [], [0], 0
    for i, (ql, sl) in enumerate(reqs):
        blocks = perm[used:used + nblk[i]]
        used += nblk[i]
        tables[i, :nblk[i]] = blocks.to(torch.int32)
        pos = torch.arange(sl - ql, sl)
        slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        qsl.append(qsl[-1] + ql)
    t = qsl[-1]
    q_nope = torch.randn(t, h, nope, generator=g).to(dtype)
    q_pe = torch.randn(t, h, r, generator=g).to(dtype)
    kv_b = (torch.randn(h * (nope + v), c, generator=g) * c**-0.5).to(dtype)
    d = lambda x: x.to(DEVICE)  # noqa: E731
    meta = AttentionMetadata(
        query_start_loc=d(torch.tensor(qsl, dtype=torch.int32)),
        seq_lens=d(torch.tensor([sl for _, sl in reqs], dtype=torch.int32)),
        block_tables=d(tables), slot_mapping=d(torch.cat(slots).long()),
        max_query_len=max(ql for ql, _ in reqs), max_seq_len=max(sl for _, sl in reqs),
        query_lens_cpu=[ql for ql, _ in reqs], seq_lens_cpu=[sl for _, sl in reqs],
    )
    weights = MLAWeights.from_kv_b(d(kv_b), h, nope, v)
    return d(q_nope), d(q_pe), d(cache), meta, weights


def reference(q_nope, q_pe, cache, meta, w, scale=SCALE):
    return mla_attention_ref(torch.cat([q_nope, q_pe], -1).float(), cache.float(), meta, w.kv_b.float(),
                             cache.shape[-1] - q_pe.shape[-1], w.qk_nope_head_dim, w.v_head_dim, scale)


def check(reqs, block_size, *, num_splits=None, absorb_max_query_len=tm.ABSORB_MAX_QUERY_LEN, dtype=torch.float32,
          expand_max_context=tm.EXPAND_MAX_CONTEXT, config=None, **dims):
    q_nope, q_pe, cache, meta, w = make_batch(reqs, block_size, dtype, **dims)
    scale = (w.qk_nope_head_dim + q_pe.shape[-1]) ** -0.5
    got = tm.mla_attention(q_nope, q_pe, cache, meta, w, scale, num_splits=num_splits, config=config,
                           absorb_max_query_len=absorb_max_query_len, expand_max_context=expand_max_context)
    ref = reference(q_nope, q_pe, cache, meta, w, scale)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), ref, **tol)


@pytest.mark.parametrize("reqs, block_size, num_splits", [
    ([(1, 1)], 16, None),                         # a single context row
    ([(1, 37), (1, 5), (1, 16)], 16, 1),          # ctx not a multiple of the block, direct write
    ([(1, 37), (1, 5), (1, 64)], 16, 4),          # splits > 1 incl. empty splits (ctx 5)
    ([(1, 70), (1, 33)], 1, 2),                   # page size 1
    ([(1, 50), (1, 9), (1, 21), (1, 3)], 32, 8),  # more splits than key tiles for most rows
])
def test_decode_matches_reference(reqs, block_size, num_splits):
    check(reqs, block_size, num_splits=num_splits)


def test_decode_bf16_and_odd_dims():
    check([(1, 40), (1, 7)], 16, num_splits=2, dtype=torch.bfloat16)
    # Kimi-K2-like tiny dims: latent 24 (padded to 32), 2 heads, nope 24, v 20
    check([(1, 29), (1, 3)], 16, num_splits=2, c=24, h=2, nope=24, v=20)


def test_several_head_tiles():
    # 40 heads = tiles of 16, 16 and a partial 8 (interpreter BLOCK_H 16): per-tile split counters
    # and head masks, for decodes and absorbed extend rows
    check([(1, 37), (1, 70), (1, 2)], 16, num_splits=3, h=40)
    check([(5, 40), (1, 9)], 16, num_splits=2, h=40, absorb_max_query_len=8)


def test_decode_padding_rows_give_zeros_and_write_nothing():
    q_nope, q_pe, cache, meta, w = make_batch([(1, 20), (1, 9)], 16)
    meta.seq_lens[1] = 0  # a CUDA-graph padding row: context 0
    before = cache.clone()
    latent = torch.randn(2, C + R, device=DEVICE)
    tm.store_latent(latent, cache, torch.tensor([3, -1], device=DEVICE))
    assert torch.equal(cache.view(-1, C + R)[3], latent[0]) and torch.equal(cache.view(-1, C + R)[:3], before.view(-1, C + R)[:3])
    assert torch.equal(cache.view(-1, C + R)[4:], before.view(-1, C + R)[4:])
    out = tm.mla_attention(q_nope, q_pe, cache, meta, w, SCALE, num_splits=2)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("q_len", [1, 3])
def test_uniform_query_rows_match_the_host_path_and_zero_padding(q_len):
    """CUDA-graph verify steps (every request 1 + k query rows, meta.uniform_query_len): the
    absorbed rows built on the device give the reference's output for the real requests and
    zeros for padding requests (context 0), with the host lists holding placeholders."""
    reqs = [(q_len, 20), (q_len, q_len), (q_len, 41)]
    q_nope, q_pe, cache, meta, w = make_batch(reqs, 16)
    ref = reference(q_nope, q_pe, cache, meta, w)
    pad = 2
    rows = pad * q_len
    n = len(reqs) + pad
    meta_g = AttentionMetadata(
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=DEVICE) * q_len,
        seq_lens=torch.cat([meta.seq_lens, torch.zeros(pad, dtype=torch.int32, device=DEVICE)]),
        block_tables=torch.cat([meta.block_tables, torch.zeros(pad, meta.block_tables.shape[1], dtype=torch.int32,
                                                               device=DEVICE)]),
        slot_mapping=torch.cat([meta.slot_mapping, torch.full((rows,), -1, dtype=torch.int64, device=DEVICE)]),
        max_query_len=q_len, max_seq_len=128, query_lens_cpu=[q_len] * n, seq_lens_cpu=[128] * n,
        uniform_query_len=q_len,
    )
    qn = torch.cat([q_nope, torch.randn(rows, *q_nope.shape[1:], device=DEVICE)])
    qp = torch.cat([q_pe, torch.randn(rows, *q_pe.shape[1:], device=DEVICE)])
    out = tm.mla_attention(qn, qp, cache, meta_g, w, SCALE, num_splits=2)
    real = len(reqs) * q_len
    torch.testing.assert_close(out[:real].float(), ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[real:], torch.zeros_like(out[real:]))


def test_store_latent_matches_reference():
    _, _, cache, meta, _ = make_batch([(5, 20), (1, 9)], 4)
    latent = torch.randn(6, C + R, device=DEVICE)
    ref = cache.clone()
    write_latent_cache(latent, ref, meta.slot_mapping)
    tm.store_latent(latent, cache, meta.slot_mapping)
    assert torch.equal(cache, ref)


@pytest.mark.parametrize("absorb_max", [0, 64])  # 0: every extend expanded; 64: every extend absorbed
def test_extend_with_cached_prefix_and_mixed_batch(absorb_max):
    # prefill from scratch, extend over a cached prefix (chunked prefill / prefix hit), decodes
    reqs = [(12, 12), (7, 40), (1, 23), (9, 17), (1, 1)]
    check(reqs, 16, num_splits=2, absorb_max_query_len=absorb_max)


def test_extend_both_paths_in_one_batch():
    check([(40, 40), (3, 30), (1, 19)], 8, absorb_max_query_len=8)


def test_expanded_requests_run_in_bounded_groups(monkeypatch):
    # context budget 50: (12, 30) + (20, 20) form one group, (15, 45) its own, (10, 60) is over
    # the budget alone and runs absorbed
    groups = []
    real = tm._expanded

    def spy(*args):
        groups.append(list(args[6]))
        return real(*args)

    monkeypatch.setattr(tm, "_expanded", spy)
    check([(12, 30), (20, 20), (15, 45), (10, 60), (1, 7)], 16, absorb_max_query_len=4, expand_max_context=50)
    assert groups == [[0, 1], [2]]


# ------------------------------------------------------------------------------------ engine level

MAX_NEW = 6
PROMPTS = [[5, 17, 99, 3], list(range(2, 42)), [7] * 19]


def _generate(path, attention, prompts, **scheduler):
    b = EngineBuilder(path).device(DEVICE).dtype("float32").attention(attention).cache(block_size=16)
    if scheduler:
        b.scheduler(**scheduler)
    engine = b.build()
    return engine, [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))]


@pytest.mark.parametrize("kind", ["deepseek-v3", "kimi-k2"])
def test_engine_triton_matches_torch_and_transformers(kind, monkeypatch):
    path = tiny_checkpoint(kind)
    # whole prompts in one step: the 40-token prefill takes the expanded path, the others absorbed
    expanded = []
    real = tm._expanded
    monkeypatch.setattr(tm, "_expanded", lambda *a: expanded.append(a[6]) or real(*a))
    _, whole = _generate(path, "triton", PROMPTS)
    assert expanded  # one call per layer for the 40-token prefill
    _, ref = _generate(path, "torch", PROMPTS)
    assert whole == ref
    assert whole[0] == hf_greedy(path, PROMPTS[0], MAX_NEW)
    if kind != "deepseek-v3":
        return
    # chunked prefill (16-token steps: later chunks extend over a cached prefix, mixed with decodes)
    engine, chunked = _generate(path, "triton", PROMPTS, max_num_batched_tokens=16)
    assert engine.runner.backend.name == "triton"
    assert any(s.num_decodes > 0 and s.num_prefill_tokens > 0 for s in engine.stats.steps)
    assert chunked == ref
    # prefix-cache hit: the same 40-token prompt again reuses its two full blocks
    engine.stats.reset()
    again = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    assert again[0].token_ids == ref[1]
    assert engine.stats.num_cached_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# -------------------------------------------------------------------- the Hopper Gluon decode kernel
# (kernels/mla/mla_decode_gluon.py runs on sm_90 only; tests/test_gpu_mla_engine.py and scripts/gpu_check_mla.py
# check it on the H100. Here: the dispatch around it and its host-side choices.)


def test_decode_kernel_choice_is_validated_and_falls_back_to_triton():
    from dlengine.kernels.mla import mla_decode_gluon as gluon_mla

    from dlengine.kernels.mla.mla_torch import absorb_query

    q_nope, q_pe, cache, meta, w = make_batch([(1, 20), (1, 7)], 4)
    q_lat = absorb_query(q_nope, w)
    out = torch.zeros(2, H, C, device=DEVICE)
    args = (q_lat, q_pe, cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, out, SCALE)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tm.mla_decode(*args, max_seq_len=20, kernel="gluon")
    with pytest.raises(ValueError, match="unknown MLA decode kernel 'flashmla'"):
        tm.mla_decode(*args, max_seq_len=20, kernel="flashmla")
    tm.mla_decode(*args, max_seq_len=20, kernel="auto")  # not applicable here: the Triton kernel runs
    auto_out = out.clone()
    out.zero_()
    tm.mla_decode(*args, max_seq_len=20, kernel="triton")
    assert torch.equal(out, auto_out) and out.abs().sum() > 0
    # where it cannot run, it says why
    assert "CUDA" in gluon_mla.supported(torch.device("cpu"), torch.bfloat16, 512, 64)


def test_gluon_query_by_cp_async_only_where_the_copy_can_be_built():
    """The Gluon kernel loads the query by cp.async (bytes as they are, >= 4 at a time) only for a
    query in the cache's dtype whose token / head strides Triton can see are multiples of 16
    elements; anything else takes the register path (which converts dtypes and takes any stride)."""
    from dlengine.kernels.mla.mla_decode_gluon import _q_async_ok

    cache = torch.empty(4, 64, 1, 576, dtype=torch.bfloat16)
    q_lat, q_pe = torch.empty(3, 128, 512, dtype=torch.bfloat16), torch.empty(3, 128, 64, dtype=torch.bfloat16)
    assert _q_async_ok(q_lat, q_pe, cache)
    heads_major = torch.empty(128, 3, 512, dtype=torch.bfloat16).transpose(0, 1)  # the engine's layout
    assert _q_async_ok(heads_major, q_pe, cache)
    q_full = torch.empty(3, 128, 192, dtype=torch.bfloat16)  # q_pe as the rope slice of the whole query
    assert _q_async_ok(q_lat, q_full[..., 128:], cache)
    assert not _q_async_ok(q_lat.float(), q_pe, cache)  # a dtype to convert
    padded = torch.empty(3, 128, 520, dtype=torch.bfloat16)[..., :512]  # 16-byte rows, stride 520 elements
    assert not _q_async_ok(padded, q_pe, cache)
    assert not _q_async_ok(q_lat, torch.empty(3 * 128 * 64 + 1, dtype=torch.bfloat16)[1:].view(3, 128, 64), cache)


@pytest.mark.parametrize("rows, head_tiles, ctx", [(1, 2, 8192), (32, 2, 8192), (64, 2, 8192), (128, 2, 32768),
                                                   (3, 1, 100), (1, 2, 1)])
def test_gluon_split_count_fills_one_wave_of_programs(rows, head_tiles, ctx):
    from dlengine.kernels.mla.mla_decode_gluon import choose_num_splits

    n = choose_num_splits(rows, head_tiles, ctx, num_sms=132)
    assert n >= 1 and n & (n - 1) == 0  # a power of two: few recompiles of the merge
    assert rows * head_tiles * n <= max(132, rows * head_tiles)  # one program per SM: at most one wave
    assert n == 1 or ctx // n >= 128  # enough keys a split to pay for its partial (MIN_KEYS_PER_SPLIT)


def test_mla_decode_kernel_choice_at_build_time():
    from dlengine import ConfigError

    # on CPU only our Triton kernel can run: "auto" resolves to it, explicit GPU kernels say why
    engine = EngineBuilder("tiny-deepseek-v3").device("cpu").attention("triton").mla_decode("triton").build()
    assert engine.config.mla_decode == "auto" and engine.runner.backend.mla_decode == "auto"
    for kernel, words in [("gluon", "CUDA device"), ("flashinfer", "CUDA device"), ("flashmla", "unknown mla_decode")]:
        with pytest.raises(ConfigError, match=words):
            EngineBuilder("tiny-deepseek-v3").device("cpu").attention("triton").mla_decode(kernel).build()
    with pytest.raises(ConfigError, match="latent attention"):  # not an MLA model
        EngineBuilder("tiny-qwen3").device("cpu").attention("triton").mla_decode("gluon").build()


@pytest.mark.parametrize("splits", [2, 3, 4, 8, 64])
def test_gluon_split_merge_reads_only_splits_with_keys(splits):
    """The Gluon decode kernel's merge launch (plain Triton: runs here) combines the first n_active
    partials by log-sum-exp -- two at once (PAIR) or all at once as one block (3 splits: padded to
    a block of 4); the splits past a short row's tiles are never written (NaN here) and never read;
    a row without keys gets zeros."""
    from dlengine.kernels.mla import mla_decode_gluon as gluon_mla

    heads, width, block_n = 20, 32, 64
    lens = [0, 50, 100, 1000, block_n * splits * 3 - 5]
    rows = len(lens)
    n_active = []  # the kernel's split of a row: cdiv(tiles, splits) tiles a split, the last ones empty
    for n in lens:
        tiles = -(-n // block_n)
        n_active.append(0 if tiles == 0 else -(-tiles // -(-tiles // splits)))
    row_len = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    n = rows * heads * splits
    gen = torch.Generator().manual_seed(0)
    part = torch.full((rows, heads, splits, width), float("nan"))
    lse = torch.full((rows, heads, splits), float("nan"))
    for r, k in enumerate(n_active):
        part[r, :, :k] = torch.randn(heads, k, width, generator=gen)
        lse[r, :, :k] = torch.randn(heads, k, generator=gen) * 3
    ws = torch.cat([part.reshape(-1), lse.reshape(-1)]).to(DEVICE)
    out = torch.full((rows, heads, width), float("nan"), device=DEVICE)
    tok = torch.arange(rows, dtype=torch.int32, device=DEVICE)
    gluon_mla._launch_merge(ws, tok, row_len, out, splits)
    assert torch.equal(out[0].cpu(), torch.zeros(heads, width))
    assert 0 < min(n_active[1:]) and (splits == 2 or min(n_active[1:]) < splits)  # short rows are covered
    for r, k in enumerate(n_active[1:], start=1):
        w = torch.softmax(lse[r, :, :k] * math.log(2), dim=-1)  # 2^lse weights
        ref = (w[..., None] * part[r, :, :k]).sum(1)
        torch.testing.assert_close(out[r].cpu(), ref, rtol=1e-5, atol=1e-5)


def test_gluon_cache_layout_check_names_what_tma_cannot_read():
    """The Gluon kernel reads the latent cache with TMA as one [blocks * page, 576] tensor; caches it
    cannot read that way fall back to the Triton kernel, and the check says why."""
    from dlengine.kernels.mla.mla_decode_gluon import cache_layout_problem

    bf16 = torch.bfloat16
    assert cache_layout_problem(torch.zeros(8, 16, 1, 576, dtype=bf16)) is None  # the engine's layout
    assert cache_layout_problem(torch.zeros(8, 64, 576, dtype=bf16)) is None
    assert "page size" in cache_layout_problem(torch.zeros(8, 4, 1, 576, dtype=bf16))
    assert "page size" in cache_layout_problem(torch.zeros(8, 48, 1, 576, dtype=bf16))
    assert "back to back" in cache_layout_problem(torch.zeros(8, 32, 1, 576, dtype=bf16)[:, :16])
    assert "aligned" in cache_layout_problem(torch.zeros(8, 16, 1, 577, dtype=bf16)[..., :576])
    assert "one latent head" in cache_layout_problem(torch.zeros(8, 16, 2, 576, dtype=bf16))


def test_engines_take_64_token_pages_where_mla_decode_runs_on_the_gluon_kernel(monkeypatch):
    """The Gluon kernel's fastest page is 64 tokens (9 TMA copies a tile instead of 36 at 16): an
    engine whose MLA decode steps run on it takes that block size unless the user chose one;
    anything else keeps the default. (Whether the kernel applies is `gluon_mla.supported`, made to
    say yes here: this machine has no Hopper GPU.)"""
    from types import SimpleNamespace

    from dlengine.kernels.mla import mla_decode_gluon as gluon_mla
    from dlengine.kernels.mla.decode_choice import GLUON_BLOCK_SIZE, preferred_block_size

    mla = SimpleNamespace(uses_mla=True, hf_config={"kv_lora_rank": 512, "qk_rope_head_dim": 64})
    gqa = SimpleNamespace(uses_mla=False, hf_config={})
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(gluon_mla, "supported", lambda *a: None)
    assert GLUON_BLOCK_SIZE == 64
    for decode in ("auto", "gluon"):
        for attention in ("auto", "triton"):
            assert preferred_block_size(decode, mla, attention, cuda, bf16) == 64
    assert preferred_block_size("triton", mla, "auto", cuda, bf16) is None
    assert preferred_block_size("flashinfer", mla, "auto", cuda, bf16) is None
    assert preferred_block_size("auto", mla, "torch", cuda, bf16) is None
    assert preferred_block_size("auto", mla, "flashinfer", cuda, bf16) is None
    assert preferred_block_size("auto", gqa, "auto", cuda, bf16) is None
    assert preferred_block_size("auto", mla, "triton", torch.device("cpu"), bf16) is None
    monkeypatch.setattr(gluon_mla, "supported", lambda *a: "needs a Hopper GPU")
    assert preferred_block_size("auto", mla, "auto", cuda, bf16) is None


def test_cpu_mla_engine_keeps_the_default_block_size():
    from dlengine import EngineBuilder
    from dlengine.testing import tiny_checkpoint

    engine = EngineBuilder(tiny_checkpoint("deepseek-v3")).dtype("float32").build()
    assert engine.kv_cache.block_size == 16
