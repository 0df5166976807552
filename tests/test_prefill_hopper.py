"""The Hopper prefill / extend kernel (kernels/attention/prefill_hopper_triton.py) vs the torch
reference, at tiny sizes, and its choice at build time (`EngineBuilder.prefill_attention`).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest
before the kernels load), which emulates the TMA tensor descriptors: both the TMA and the plain-load
path and the warp-specialised fresh-prompt kernel run here (warp specialisation itself is a
compiler transformation, only on sm_90: `scripts/sm90_prefill_build.py`, tests/test_gpu_prefill_hopper.py).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorations below

pytest.importorskip("triton")

from dlengine.config import ConfigError  # noqa: E402
from dlengine.kernels.attention import prefill_hopper_triton as ph  # noqa: E402
from dlengine.kernels.attention.paged_attention_torch import paged_attention_ref, write_kv_cache  # noqa: E402
from dlengine.kernels.attention.prefill_choice import resolve_prefill_attention  # noqa: E402
from dlengine.kernels.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from dlengine.kernels.context import AttentionMetadata  # noqa: E402

if DEVICE == "cpu" and not ph.interpret_mode():
    pytest.skip("the kernels were built without the Triton interpreter", allow_module_level=True)
if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] != 9:
    pytest.skip("the Hopper prefill kernel needs sm_90", allow_module_level=True)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# small tiles: tiny prompts still span several query tiles, key tiles and cached-prefix tiles
SMALL = dict(hopper_block_m=16, hopper_block_n=16, hopper_prefix_block_n=16)
PATHS = {"tma": dict(SMALL, hopper_tma=True), "plain": dict(SMALL, hopper_tma=False),
         "ws": dict(SMALL, hopper_ws=True)}


def tol(dtype):
    if dtype == F32:
        return dict(atol=2e-5, rtol=1e-4)
    if dtype == F16:
        return dict(atol=4e-3, rtol=4e-3)
    return dict(atol=3e-2, rtol=3e-2)


def make_batch(reqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, step_dtype=None):
    """reqs: [(query_len, seq_len)] (seq_len 0: a padding request). A random cache with shuffled
    blocks, this step's q / k / v (k / v in step_dtype, default dtype), and the step's K/V written
    to the cache. Returns q, k, v, k_cache, v_cache, meta on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    nblk = [max(1, -(-sl // block_size)) for _, sl in reqs]
    perm = torch.randperm(sum(nblk) + 2, generator=g)
    k_cache = torch.randn(len(perm), block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(len(perm), block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    block_tables = torch.zeros(len(reqs), max(nblk) + 1, dtype=torch.int32)
    slots, qsl, used = [], [0], 0
    for i, (ql, sl) in enumerate(reqs):
        blocks = perm[used:used + nblk[i]]
        used += nblk[i]
        block_tables[i, :nblk[i]] = blocks.to(torch.int32)
        if sl == 0:  # padding: nothing written
            slots.append(torch.full((ql,), -1))
        else:
            pos = torch.arange(sl - ql, sl)
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        qsl.append(qsl[-1] + ql)
    T = qsl[-1]
    q = torch.randn(T, num_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(T, num_kv_heads, head_dim, generator=g).to(step_dtype or dtype)
    v = torch.randn(T, num_kv_heads, head_dim, generator=g).to(step_dtype or dtype)
    d = lambda t: t.to(DEVICE)  # noqa: E731
    meta = AttentionMetadata(
        query_start_loc=d(torch.tensor(qsl, dtype=torch.int32)),
        seq_lens=d(torch.tensor([sl for _, sl in reqs], dtype=torch.int32)),
        block_tables=d(block_tables), slot_mapping=d(torch.cat(slots).long()),
        max_query_len=max(ql for ql, _ in reqs), max_seq_len=max(sl for _, sl in reqs),
        query_lens_cpu=[ql for ql, _ in reqs], seq_lens_cpu=[sl for _, sl in reqs],
    )
    q, k, v, k_cache, v_cache = d(q), d(k), d(v), d(k_cache), d(v_cache)
    keep = meta.slot_mapping >= 0
    write_kv_cache(k[keep], v[keep], k_cache, v_cache, meta.slot_mapping[keep])
    return q, k, v, k_cache, v_cache, meta


def run_and_check(reqs, *, heads=(8, 2), head_dim=16, block_size=16, dtype=F32, config=PATHS["tma"], seed=0,
                  step_dtype=None):
    H, Hkv = heads
    q, k, v, kc, vc, meta = make_batch(reqs, H, Hkv, head_dim, block_size, dtype, seed=seed, step_dtype=step_dtype)
    scale = head_dim ** -0.5
    ref = paged_attention_ref(q, kc, vc, meta, scale)
    out = torch.full_like(q, float("nan"))  # poison: rows the kernels skip stay NaN
    res = ph.prefill_attention(q, k, v, kc, vc, meta, scale, out=out, config=config)
    assert res.data_ptr() == out.data_ptr() and res.dtype == q.dtype
    assert not torch.isnan(out).any(), "unwritten output rows"
    torch.testing.assert_close(out.float(), ref.float(), **tol(dtype))
    return out, ref


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of the Hopper kernels (so a silent fallback to the portable one fails)."""
    counts = {"packed": 0, "ws": 0}
    packed, fresh = ph._prefill_kernel, ph._fresh_ws_kernel

    class Counting:
        def __init__(self, kernel, key):
            self.kernel, self.key = kernel, key

        def __getitem__(self, grid):
            counts[self.key] += 1
            return self.kernel[grid]

    monkeypatch.setattr(ph, "_prefill_kernel", Counting(packed, "packed"))
    monkeypatch.setattr(ph, "_fresh_ws_kernel", Counting(fresh, "ws"))
    return counts


# --------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("path", list(PATHS))
def test_fresh_prompts_of_different_lengths(path, launches):
    run_and_check([(2, 2), (17, 17), (40, 40), (64, 64), (5, 5)], config=PATHS[path])
    assert launches["ws" if path == "ws" else "packed"] == 1


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("block_size", [16, 32, 5])
def test_chunked_prefill_over_a_cached_prefix(path, block_size, launches):
    # prefixes that are not multiples of the page or the tile, one on a page boundary, a 2-token
    # chunk, a fresh prompt in the same batch; with a prefix the warp-specialised kernel never runs
    reqs = [(8, 40), (16, 48), (33, 70), (2, 37), (20, 21), (19, 19)]
    run_and_check(reqs, block_size=block_size, config=PATHS[path])
    assert launches["packed"] == 1 and launches["ws"] == 0


@pytest.mark.parametrize("path", list(PATHS))
def test_mixed_batch_with_decode_rows(path):
    # decode rows go to the split-KV decode kernel; the Hopper kernel skips them
    reqs = [(1, 33), (20, 50), (1, 1), (4, 4), (1, 64), (17, 17), (1, 100)]
    run_and_check(reqs, config=PATHS[path])


@pytest.mark.parametrize("heads", [(4, 4), (8, 4), (8, 2), (16, 2), (10, 2)])  # groups 1, 2, 4, 8 and 5
@pytest.mark.parametrize("path", ["tma", "ws"])
def test_gqa_groups(heads, path):
    run_and_check([(23, 23), (9, 30)], heads=heads, config=PATHS[path])
    run_and_check([(23, 23), (12, 12)], heads=heads, config=PATHS[path], seed=1)


@pytest.mark.parametrize("head_dim", [64, 128, 24])  # 24: padded to 32, TMA zero-fills the columns
def test_head_dims(head_dim):
    run_and_check([(20, 20), (9, 40)], head_dim=head_dim, heads=(4, 2))
    run_and_check([(20, 20), (9, 40)], head_dim=head_dim, heads=(4, 2), config=PATHS["plain"])


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_low_precision(dtype):
    run_and_check([(30, 30), (12, 50), (1, 7), (5, 16)], dtype=dtype)
    run_and_check([(30, 30), (12, 12)], dtype=dtype, config=PATHS["ws"])


def test_step_kv_in_another_dtype_than_the_cache():
    # float32 activations over a bf16 cache: the chunk's keys are rounded as the cache stores them
    run_and_check([(24, 40), (16, 16)], dtype=BF16, step_dtype=F32)


def test_default_tiles_and_block_size_1():
    run_and_check([(40, 40), (9, 70), (3, 3)], config=None)
    run_and_check([(7, 7), (5, 20)], block_size=1)


@pytest.mark.parametrize("path", list(PATHS))
def test_padding_requests_get_zeros(path):
    # requests of context 0 (CUDA-graph padding) get zeros, the real ones their attention
    reqs = [(6, 30), (6, 0), (6, 6), (6, 0)]
    q, k, v, kc, vc, meta = make_batch(reqs, 8, 2, 16, 16, F32, seed=4)
    real = AttentionMetadata(meta.query_start_loc[:2], meta.seq_lens[:1], meta.block_tables[:1], meta.slot_mapping[:6],
                             6, 30, [6], [30])
    out = ph.prefill_attention(q, k, v, kc, vc, meta, 0.25, out=torch.full_like(q, float("nan")), config=PATHS[path])
    torch.testing.assert_close(out[:6], paged_attention_ref(q[:6], kc, vc, real, 0.25), **tol(F32))
    assert torch.equal(out[6:12], torch.zeros_like(out[6:12])) and torch.equal(out[18:], torch.zeros_like(out[18:]))
    third = AttentionMetadata(torch.tensor([0, 6], dtype=torch.int32, device=DEVICE), meta.seq_lens[2:3],
                              meta.block_tables[2:3], meta.slot_mapping[12:18], 6, 6, [6], [6])
    torch.testing.assert_close(out[12:18], paged_attention_ref(q[12:18], kc, vc, third, 0.25), **tol(F32))


def test_strided_step_kv_views_of_a_fused_projection():
    H, Hkv, D = 8, 2, 16
    q, k, v, kc, vc, meta = make_batch([(12, 30), (20, 20)], H, Hkv, D, 16, F32, seed=5)
    qkv = torch.cat([q, k, v], dim=1)  # q, k, v as views of one [T, H + 2 Hkv, D] tensor
    qs, ks, vs = qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]
    assert not ks.is_contiguous()
    ref = paged_attention_ref(q, kc, vc, meta, 0.25)
    for config in PATHS.values():
        torch.testing.assert_close(ph.prefill_attention(qs, ks, vs, kc, vc, meta, 0.25, config=config), ref,
                                   **tol(F32))


def test_batches_it_does_not_take_run_the_portable_kernels(launches):
    # decode-only batches, CUDA-graph verify batches (uniform_query_len) and FP8 caches
    run_and_check([(1, 5), (1, 40)])
    q, k, v, kc, vc, meta = make_batch([(3, 20), (3, 3)], 8, 2, 16, 16, F32, seed=6)
    meta.uniform_query_len = 3
    ref = paged_attention_ref(q, kc, vc, meta, 0.25)
    torch.testing.assert_close(ph.prefill_attention(q, k, v, kc, vc, meta, 0.25, config=SMALL), ref, **tol(F32))
    assert not ph.applies(meta, kc)
    assert not ph.applies(AttentionMetadata(meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                            meta.slot_mapping, 3, 20, [3, 3], [20, 3]),
                          kc.to(torch.float8_e4m3fn))
    assert launches == {"packed": 0, "ws": 0}


def test_config_keys_are_checked():
    q, k, v, kc, vc, meta = make_batch([(5, 5)], 4, 2, 16, 16, F32)
    with pytest.raises(ValueError, match="hopper_blok_m"):
        ph.prefill_attention(q, k, v, kc, vc, meta, 0.25, config={"hopper_blok_m": 64})
    with pytest.raises(ValueError, match="powers of two"):
        ph.prefill_attention(q, k, v, kc, vc, meta, 0.25, config={"hopper_block_n": 48})
    # the portable kernel's keys in the same dict are left to it
    ph.prefill_attention(q, k, v, kc, vc, meta, 0.25, config={"extend_block_m": 16, **SMALL})


def test_backend_takes_the_step_kv_only_with_the_hopper_choice(launches):
    q, k, v, kc, vc, meta = make_batch([(12, 30), (20, 20), (1, 9)], 8, 2, 16, 16, F32, seed=7)
    ref = paged_attention_ref(q, kc, vc, meta, 0.25)
    portable = TritonAttentionBackend(config=SMALL)
    hopper = TritonAttentionBackend(config=SMALL, prefill_attention="hopper")
    assert not portable.reads_step_kv and hopper.reads_step_kv
    assert portable.kernel_names()["gqa_prefill"] == "triton"
    assert hopper.kernel_names()["gqa_prefill"].startswith("hopper")
    torch.testing.assert_close(portable.attend(q, kc, vc, meta, 0.25), ref, **tol(F32))
    assert launches["packed"] == 0
    torch.testing.assert_close(hopper.attend(q, kc, vc, meta, 0.25, step_kv=(k, v)), ref, **tol(F32))
    assert launches["packed"] == 1
    with pytest.raises(ConfigError, match="prefill_attention"):
        TritonAttentionBackend(prefill_attention="auto")  # resolved at build, never passed unresolved


# ------------------------------------------------------------------------------- the build choice


def test_prefill_choice_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_prefill_attention("auto", "triton", cpu, F32) == "triton"
    assert resolve_prefill_attention("triton", "torch", cpu, F32) == "triton"
    assert resolve_prefill_attention("hopper", "triton", cpu, BF16) == "hopper"  # the interpreter, for tests
    for requested, backend, dtype, words in [("flash", "triton", F32, "unknown prefill_attention"),
                                             ("hopper", "torch", F32, "triton attention backend"),
                                             ("hopper", "custom", F32, "triton attention backend"),
                                             ("hopper", "triton", torch.float8_e4m3fn, "FP8")]:
        with pytest.raises(ConfigError, match=words):
            resolve_prefill_attention(requested, backend, cpu, dtype)
    # a CUDA device that is not sm_90 is refused by name
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match="sm_80"):
        resolve_prefill_attention("hopper", "triton", torch.device("cuda"), BF16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_prefill_attention("hopper", "triton", torch.device("cuda"), BF16) == "hopper"


def test_engine_with_the_hopper_kernel_gives_the_default_engines_tokens(launches):
    """Tiny Qwen3 (GQA 4 / 2 heads), prompts chunked over several steps (a cached prefix for the
    later chunks) and a prefix-cache hit: the same greedy tokens as the default engine."""
    from dlengine import EngineBuilder, SamplingParams

    prompts = [list(range(3, 60)), [7, 8, 9, 10, 11], list(range(3, 40)) + [99, 98, 97]]  # the third shares a prefix
    params = SamplingParams(max_tokens=5, temperature=0.0)

    def tokens(kernel):
        engine = (EngineBuilder("tiny-qwen3").device("cpu").attention("triton").prefill_attention(kernel)
                  .cache(block_size=16, prefix_caching=True).scheduler(max_num_batched_tokens=32, max_num_seqs=4)
                  .build())
        assert engine.config.prefill_attention == ("triton" if kernel == "auto" else kernel)
        first = [o.token_ids for o in engine.generate(prompts[:2], params)]
        return first + [o.token_ids for o in engine.generate(prompts[2:], params)]

    expected = tokens("auto")
    assert launches["packed"] == 0
    assert tokens("hopper") == expected
    assert launches["packed"] > 0
    with pytest.raises(ConfigError, match="triton attention backend"):
        EngineBuilder("tiny-qwen3").device("cpu").attention("torch").prefill_attention("hopper").build()


def test_kernels_build_for_sm90_with_tma_and_warp_specialisation():
    """Both kernels compile for sm_90 on this (GPU-less) machine with the shipped bf16 d=128 tiles:
    no spills, inside the H100's shared memory, the chunk's K/V by TMA, and the fresh-prompt kernel
    warp-specialised (a producer and two consumer groups: 12 warps from 4). Built in a child
    process without TRITON_INTERPRET, which this module turns on."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "sm90_prefill_build.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (report,) = out["reports"]
    assert "error" not in report, report
    packed, fresh = report["packed"], report["fresh_ws"]
    for build in (packed, fresh):
        assert build["spill_stack"] == 0 and build["shared"] <= out["shared_limit"], build
    assert packed["ops"]["ttng.warp_group_dot"] == 8  # QK and PV in the prefix, chunk and diagonal loops
    assert packed["ops"]["ttng.async_tma_copy_global_to_local"] > 0
    assert fresh["warps"] == 12 and fresh["ops"]["ttg.async_copy_global_to_local"] == 0
