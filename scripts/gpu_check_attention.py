#!/usr/bin/env python3
"""GPU check of the Triton paged-attention kernels: correctness at real sizes, then timings.

    python scripts/gpu_check_attention.py                 # full run (a few minutes on an H100)
    python scripts/gpu_check_attention.py --quick         # smaller sweep
    python scripts/gpu_check_attention.py --json out.json --tune-splits
    python scripts/gpu_check_attention.py --sections prefill --hopper-configs --json out.json

1. Correctness vs the torch reference (and vs FlashInfer when it imports): 32 q heads / 8 kv heads,
   d=128, bf16, page 16 -- decode batch 64 with contexts 1..4096 (incl. 1024, block-aligned and
   not), long single-request decodes (split-KV), fresh prefills, chunked prefill over a cached
   prefix, a mixed batch; plus fp16/fp32 and d=64/256 spot checks, and the KV-cache write (exact).
2. Device copy bandwidth (large tensor copy, bytes read + written).
3. Decode sweep batch 1..256 x context 512..32k: Triton vs FlashInfer's
   BatchDecodeWithPagedKVCacheWrapper (NHD, page 16), with achieved KV-read GB/s and % of copy BW.
4. Prefill / extend sweep: Triton vs BatchPrefillWithPagedKVCacheWrapper, TFLOP/s (causal), with
   the Hopper prefill kernel (kernels/attention/prefill_hopper_triton.py) as a third column on
   sm_90; --hopper-configs also times alternative tiles of it per case and prints the best (the
   candidate for its shipped default). Its correctness cases run in section 1 (sm_90 only).
5. Mixed batch and KV-write timings.

Timings are triton.testing.do_bench medians (L2 flushed before each call). Never crashes when
FlashInfer is missing; a failing FlashInfer call is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import gpu_common as gc
import torch

from dlengine.kernels.attention import paged_attention_triton as ta
from dlengine.kernels.attention import prefill_hopper_triton as ph
from dlengine.kernels.common import num_sms
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.attention.paged_attention_torch import paged_attention_ref, write_kv_cache

FI_VERSION = gc.flashinfer_version()
try:
    import flashinfer  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flashinfer = None

DEV = "cuda"
CONFIG: dict | None = None  # --config: tile/warp overrides passed to every Triton call
RESULTS: dict = {"correctness": [], "decode": [], "prefill": [], "mixed": [], "write_kv": [], "env": {}}
JSON_PATH: str | None = None  # --json: also rewritten after each prefill case (a crash keeps what ran)
# alternatives of the Hopper prefill kernel's tiles (--hopper-configs); {} = its shipped default.
# Warp-specialised ("ws") entries run the fresh-prompt kernel on batches without a cached prefix;
# with 128-key tiles it needs 2 stages to fit shared memory (scripts/sm90_prefill_build.py)
HOPPER_CANDIDATES = [
    {},
    {"hopper_stages": 2},
    {"hopper_stages": 4},
    {"hopper_block_n": 128, "hopper_stages": 2},
    {"hopper_block_n": 128, "hopper_stages": 3},
    {"hopper_prefix_block_n": 32},
    {"hopper_block_n": 128, "hopper_prefix_block_n": 128, "hopper_stages": 2},
    {"hopper_block_m": 64, "hopper_warps": 4},
    {"hopper_tma": False},
    {"hopper_ws": True},
    {"hopper_ws": True, "hopper_stages": 3},
    {"hopper_ws": True, "hopper_block_n": 128, "hopper_stages": 2},
]


def is_hopper() -> bool:
    return torch.cuda.get_device_capability()[0] == 9


def hopper_config(extra: dict | None = None) -> dict:
    """--config's overrides (the portable kernel's keys are ignored by the Hopper kernel) + extra."""
    return {**(CONFIG or {}), **(extra or {})}


# ------------------------------------------------------------------------------------------ helpers


class Batch:
    """A paged batch over a (shared) KV cache: reqs = [(query_len, seq_len)]."""

    def __init__(self, reqs, H, Hkv, D, page, dtype, k_cache=None, v_cache=None, seed=0, init_scale=1.0):
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.reqs, self.H, self.Hkv, self.D, self.page, self.dtype = reqs, H, Hkv, D, page, dtype
        nblk = [-(-sl // page) for _, sl in reqs]
        need = sum(nblk)
        if k_cache is None:
            k_cache = torch.randn(need + 8, page, Hkv, D, device=DEV, dtype=dtype, generator=g) * init_scale
            v_cache = torch.randn(need + 8, page, Hkv, D, device=DEV, dtype=dtype, generator=g) * init_scale
        assert k_cache.shape[0] >= need, "cache too small"
        self.k_cache, self.v_cache = k_cache, v_cache
        perm = torch.randperm(k_cache.shape[0], device=DEV, generator=g)[:need].to(torch.int32)
        offs = [0]
        for n in nblk:
            offs.append(offs[-1] + n)
        max_blocks = max(nblk)
        # block tables: request i gets perm[offs[i]:offs[i+1]] (scattered pages)
        idx = torch.arange(max_blocks, device=DEV)[None, :] + torch.tensor(offs[:-1], device=DEV)[:, None]
        valid = torch.arange(max_blocks, device=DEV)[None, :] < torch.tensor(nblk, device=DEV)[:, None]
        self.block_tables = torch.where(valid, perm[idx.clamp(max=need - 1)], 0).to(torch.int32).contiguous()
        self.kv_indices = perm  # flattened page list in request order (FlashInfer's layout)
        self.kv_indptr = torch.tensor(offs, dtype=torch.int32, device=DEV)
        self.last_page_len = torch.tensor([(sl - 1) % page + 1 for _, sl in reqs], dtype=torch.int32, device=DEV)
        qls = [ql for ql, _ in reqs]
        sls = [sl for _, sl in reqs]
        qsl = [0]
        for ql in qls:
            qsl.append(qsl[-1] + ql)
        self.T = qsl[-1]
        self.qo_indptr = torch.tensor(qsl, dtype=torch.int32, device=DEV)
        # slots of this step's tokens (last query_len positions of each context)
        req_of_tok = torch.repeat_interleave(torch.arange(len(reqs), device=DEV),
                                             torch.tensor(qls, device=DEV))
        pos = (torch.arange(self.T, device=DEV) - self.qo_indptr[:-1].long()[req_of_tok]
               + torch.tensor([sl - ql for ql, sl in reqs], device=DEV)[req_of_tok])
        blk = self.block_tables.long()[req_of_tok, pos // page]
        slot_mapping = blk * page + pos % page
        self.meta = AttentionMetadata(
            query_start_loc=self.qo_indptr, seq_lens=torch.tensor(sls, dtype=torch.int32, device=DEV),
            block_tables=self.block_tables, slot_mapping=slot_mapping,
            max_query_len=max(qls), max_seq_len=max(sls), query_lens_cpu=qls, seq_lens_cpu=sls)
        self.q = torch.randn(self.T, H, D, device=DEV, dtype=dtype, generator=g)
        self.k = torch.randn(self.T, Hkv, D, device=DEV, dtype=dtype, generator=g)
        self.v = torch.randn(self.T, Hkv, D, device=DEV, dtype=dtype, generator=g)
        self.scale = D ** -0.5

    @property
    def kv_tokens(self) -> int:
        return sum(sl for _, sl in self.reqs)

    def kv_bytes(self) -> int:
        return self.kv_tokens * self.Hkv * self.D * 2 * self.k_cache.element_size()

    def causal_flops(self) -> float:
        f = 0.0
        for ql, sl in self.reqs:
            prefix = sl - ql
            f += ql * prefix + ql * (ql + 1) / 2
        return 4.0 * f * self.H * self.D


def fi_workspace():
    if not hasattr(fi_workspace, "buf"):
        fi_workspace.buf = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device=DEV)
    return fi_workspace.buf


def fi_decode(batch: Batch, tensor_cores: bool):
    """A callable running FlashInfer's batch decode on `batch` (planned once), or None."""
    if flashinfer is None:
        return None
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(fi_workspace(), "NHD", use_tensor_cores=tensor_cores)
    w.plan(batch.kv_indptr, batch.kv_indices, batch.last_page_len, batch.H, batch.Hkv, batch.D, batch.page,
           q_data_type=batch.dtype, kv_data_type=batch.dtype, sm_scale=batch.scale)
    q = batch.q
    kv = (batch.k_cache, batch.v_cache)
    return lambda: w.run(q, kv)


def fi_prefill(batch: Batch):
    if flashinfer is None:
        return None
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(fi_workspace(), "NHD")
    w.plan(batch.qo_indptr, batch.kv_indptr, batch.kv_indices, batch.last_page_len, batch.H, batch.Hkv, batch.D,
           batch.page, causal=True, q_data_type=batch.dtype, kv_data_type=batch.dtype, sm_scale=batch.scale)
    q = batch.q
    kv = (batch.k_cache, batch.v_cache)
    return lambda: w.run(q, kv)


def safe_fi(make, *args):
    try:
        fn = make(*args)
        if fn is not None:
            fn()
            torch.cuda.synchronize()
        return fn, None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {str(e)[:160]}"


def bench(fn) -> float:
    """Median microseconds of fn as called eagerly (host launch cost shows when it exceeds the
    GPU time plus do_bench's L2 flush)."""
    return gc.bench_s(fn) * 1e6


def graph_bench(fn) -> float:
    """Median microseconds of GPU time: fn captured once in a CUDA graph, replays timed by do_bench
    (L2 flushed before each). NaN when fn cannot be captured."""
    if fn is None:
        return float("nan")
    try:
        return gc.graph_bench_s(fn, side_stream_warmup=True) * 1e6
    except Exception:  # noqa: BLE001
        torch.cuda.synchronize()
        return float("nan")


def host_us(fn, n=200) -> float:
    """Host microseconds per call (enqueue only; the GPU queue absorbs the launches)."""
    return float("nan") if fn is None else gc.host_us(fn, n)


def errs(out, ref):
    d = (out.float() - ref.float()).abs()
    return d.max().item(), (d.norm() / ref.float().norm().clamp_min(1e-12)).item()


def fmt(x, spec=".1f", width=8):
    return f"{x:{width}{spec}}" if isinstance(x, (int, float)) and x == x else f"{'-':>{width}}"


# -------------------------------------------------------------------------------------- correctness


def check_case(name, reqs, H=32, Hkv=8, D=128, page=16, dtype=torch.bfloat16, num_splits=None, seed=0,
               hopper: dict | None = None):
    """One batch through our kernels vs the reference; with `hopper` (a config, {} for the
    default) through the Hopper prefill kernel, which also reads the step's k / v."""
    b = Batch(reqs, H, Hkv, D, page, dtype, seed=seed)
    kc_ref, vc_ref = b.k_cache.clone(), b.v_cache.clone()
    write_kv_cache(b.k, b.v, kc_ref, vc_ref, b.meta.slot_mapping)
    ta.store_kvcache(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping)
    write_ok = torch.equal(b.k_cache, kc_ref) and torch.equal(b.v_cache, vc_ref)
    out = torch.full_like(b.q, float("nan"))
    if hopper is None:
        ta.paged_attention(b.q, b.k_cache, b.v_cache, b.meta, b.scale, out=out, num_splits=num_splits,
                           config=CONFIG)
    else:
        name = f"[hopper{' ' + json.dumps(hopper) if hopper else ''}] {name}"
        ph.prefill_attention(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, b.scale, out=out, num_splits=num_splits,
                             config=hopper_config(hopper))
    ref = paged_attention_ref(b.q, kc_ref, vc_ref, b.meta, b.scale)
    torch.cuda.synchronize()
    nan = bool(torch.isnan(out).any())
    max_abs, rel = errs(out, ref)
    atol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    ok = write_ok and not nan and bool(torch.allclose(out.float(), ref.float(), atol=atol, rtol=2e-2))
    rec = dict(name=name, dtype=str(dtype).split(".")[-1], D=D, H=H, Hkv=Hkv, max_abs=max_abs, rel=rel,
               write_ok=write_ok, nan=nan, ok=ok)
    if hopper is not None:
        rec["kernel"] = "hopper"
    # FlashInfer on the same inputs (decode-only or prefill-only batches)
    if flashinfer is not None and dtype != torch.float32 and hopper is None:
        decode_only = b.meta.max_query_len == 1
        fn, err = safe_fi(fi_decode if decode_only else fi_prefill, *((b, True) if decode_only else (b,)))
        if fn is not None:
            fo = fn()
            rec["fi_max_abs_vs_ref"], rec["fi_rel_vs_ref"] = errs(fo.reshape(out.shape), ref)
        elif err:
            rec["fi_error"] = err
    RESULTS["correctness"].append(rec)
    extra = f"  FI err {rec['fi_max_abs_vs_ref']:.2e}" if "fi_max_abs_vs_ref" in rec else ""
    print(f"  {'PASS' if ok else 'FAIL'} {name:<44} {rec['dtype']:>8} D={D:<3} max|err| {max_abs:.2e} "
          f"rel {rel:.2e} write {'ok' if write_ok else 'MISMATCH'}{' NaN!' if nan else ''}{extra}", flush=True)
    del b, kc_ref, vc_ref, out, ref
    torch.cuda.empty_cache()
    return ok


def check_cuda_graph_replay() -> bool:
    """Capture a split-KV decode once, then replay it with new context lengths and queries written
    into the same buffers (as a CUDA-graph runner does); compare each replay with the reference."""
    lens = [4096, 3000, 17, 1, 2048, 4000, 512, 1024]
    b = Batch([(1, L) for L in lens], 32, 8, 128, 16, torch.bfloat16, seed=11)
    n = len(lens)
    m = b.meta
    meta_cap = AttentionMetadata(m.query_start_loc, m.seq_lens, m.block_tables, m.slot_mapping, 1, max(lens),
                                 [1] * n, [max(lens)] * n)
    out = torch.empty_like(b.q)
    fn = lambda: ta.paged_attention(b.q, b.k_cache, b.v_cache, meta_cap, b.scale, out=out, config=CONFIG)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    gen = torch.Generator().manual_seed(3)
    worst, ok = 0.0, True
    for _ in range(4):
        new = [int(torch.randint(1, L + 1, (1,), generator=gen)) for L in lens]
        m.seq_lens.copy_(torch.tensor(new, dtype=torch.int32))
        b.q.copy_(torch.randn(b.q.shape, generator=gen).to(b.q.dtype))
        out.fill_(float("nan"))
        g.replay()
        meta_ref = AttentionMetadata(m.query_start_loc, m.seq_lens.clone(), m.block_tables, m.slot_mapping, 1,
                                     max(new), [1] * n, new)
        ref = paged_attention_ref(b.q, b.k_cache, b.v_cache, meta_ref, b.scale)
        torch.cuda.synchronize()
        err, _ = errs(out, ref)
        worst = max(worst, err)
        ok &= bool(torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2)) and not bool(out.isnan().any())
    splits = ta.choose_num_splits(n, 8, max(lens), 64, num_sms(torch.cuda.current_device()))
    print(f"  {'PASS' if ok else 'FAIL'} {'CUDA-graph replay, new lens each time':<44} bfloat16 D=128 "
          f"max|err| {worst:.2e} (captured splits={splits})", flush=True)
    RESULTS["correctness"].append(dict(name="cuda graph replay", max_abs=worst, ok=ok))
    return ok


def correctness(quick: bool) -> bool:
    print("\n== correctness vs torch reference (32q/8kv heads, page 16) ==", flush=True)
    g = torch.Generator().manual_seed(0)
    lens64 = torch.randint(1, 4097, (64,), generator=g).tolist()
    lens64[:6] = [1, 16, 1024, 1025, 4096, 17]
    ok = True
    ok &= check_case("decode b64 ctx 1..4096", [(1, L) for L in lens64])
    ok &= check_case("decode b64 ctx 1024", [(1, 1024)] * 64)
    ok &= check_case("decode b1 ctx 32768 (auto splits)", [(1, 32768)])
    ok &= check_case("decode b4 ctx 8191..8193 splits=7", [(1, 8191), (1, 8192), (1, 8193), (1, 100)], num_splits=7)
    ok &= check_case("prefill 4 prompts 1024..2048", [(1024, 1024), (2048, 2048), (1500, 1500), (17, 17)])
    ok &= check_case("chunk 512 over prefix 3000 + chunk 2048/2048",
                     [(512, 3512), (2048, 4096), (33, 1057), (2, 2050)])
    ok &= check_case("mixed 32 decodes + 2 chunks + prompt",
                     [(1, L) for L in lens64[:32]] + [(700, 2748), (256, 256), (1, 5000)])
    ok &= check_cuda_graph_replay()
    if not quick:
        ok &= check_case("decode b64 fp16", [(1, L) for L in lens64], dtype=torch.float16)
        ok &= check_case("mixed fp16", [(1, 300), (300, 900), (1, 2000)], dtype=torch.float16)
        ok &= check_case("decode fp32", [(1, L) for L in lens64[:16]], dtype=torch.float32)
        ok &= check_case("prefill+decode fp32", [(257, 300), (1, 999), (64, 64)], dtype=torch.float32)
        ok &= check_case("decode+chunk d=64 GQA 8", [(1, 777), (130, 900), (1, 1)], H=64, Hkv=8, D=64)
        ok &= check_case("decode+chunk d=256 MHA", [(1, 777), (130, 900), (1, 64)], H=8, Hkv=8, D=256)
        ok &= check_case("decode+chunk d=128 GQA 16 page 32", [(1, 500), (100, 600)], H=32, Hkv=2, page=32)
    if is_hopper():
        ok &= hopper_correctness(quick)
    print(f"  correctness: {'ALL PASS' if ok else 'FAILURES'}", flush=True)
    return ok


def hopper_correctness(quick: bool = False) -> bool:
    """The Hopper prefill kernel at real sizes vs the torch reference (sm_90): Qwen3's GQA shapes
    (32/8, 16/8, 64/8, 40/8 heads), fresh prompts, chunks over cached prefixes that are not
    multiples of the page or tile, mixed batches with decode rows, d = 64 / 256, page 32, fp16,
    the warp-specialised fresh-prompt kernel and the plain-load path."""
    print("  -- Hopper prefill kernel (prefill_hopper_triton.py) --", flush=True)
    ok = True
    prompts = [(1024, 1024), (2048, 2048), (1500, 1500), (17, 17)]
    chunks = [(512, 3512), (2048, 4096), (33, 1057), (2, 2050), (700, 700)]
    ok &= check_case("prefill 4 prompts 1024..2048", prompts, hopper={})
    ok &= check_case("chunk 512 over prefix 3000 + chunk 2048/2048", chunks, hopper={})
    ok &= check_case("mixed 32 decodes + 2 chunks + prompt",
                     [(1, 100 + 97 * i) for i in range(32)] + [(700, 2748), (256, 256), (1, 5000)], hopper={})
    ok &= check_case("prefill 4 prompts, warp-specialised", prompts, hopper={"hopper_ws": True})
    ok &= check_case("chunks, plain loads (no TMA)", chunks, hopper={"hopper_tma": False})
    for H in (16, 64, 40):
        ok &= check_case(f"chunks + prompts GQA {H}/8", [(300, 1300), (777, 777), (1, 900)], H=H, hopper={})
    if not quick:
        ok &= check_case("chunks fp16", chunks, dtype=torch.float16, hopper={})
        ok &= check_case("prompt + chunk d=64 GQA 8", [(900, 900), (130, 1000), (1, 7)], H=64, Hkv=8, D=64,
                         hopper={})
        ok &= check_case("prompt + chunk d=256 GQA 2", [(600, 600), (130, 900)], H=16, Hkv=8, D=256, hopper={})
        ok &= check_case("prompt d=256, warp-specialised", [(600, 600), (64, 64)], H=16, Hkv=8, D=256,
                         hopper={"hopper_ws": True})
        ok &= check_case("chunks page 32", [(100, 600), (333, 333)], page=32, hopper={})
        ok &= check_case("chunk page 1", [(100, 230)], page=1, hopper={})
        ok &= check_case("prefill+chunk fp32", [(257, 300), (64, 64)], dtype=torch.float32, hopper={})
    return ok


# ------------------------------------------------------------------------------------------ timings


def copy_bandwidth() -> float:
    bw = gc.copy_bandwidth(DEV)
    print(f"\n== device copy bandwidth: {bw:.0f} GB/s (1 GiB copy, read + write) ==", flush=True)
    RESULTS["env"]["copy_GBps"] = bw
    return bw


def decode_sweep(copy_bw, batches, ctxs, max_kv_gb, tune_splits, fi_tc):
    H, Hkv, D, page, dtype = 32, 8, 128, 16, torch.bfloat16
    per_tok = Hkv * D * 2 * 2
    fits = [(b, c) for b in batches for c in ctxs if b * c * per_tok <= max_kv_gb * 1e9]
    max_tokens = max(b * c for b, c in fits)
    nblocks = max_tokens // page + 64
    print(f"\n== decode: H={H} Hkv={Hkv} D={D} bf16 page {page}; KV cache {nblocks * page * per_tok / 1e9:.1f} GB ==")
    kc = torch.randn(nblocks, page, Hkv, D, device=DEV, dtype=dtype)
    vc = torch.randn(nblocks, page, Hkv, D, device=DEV, dtype=dtype)
    print("  *_us: eager do_bench median; *_gr: same call replayed from a CUDA graph (GPU time); host: enqueue us/call;"
          "\n  GB/s from the graph time (eager if no graph), %cp = % of copy bandwidth")
    hdr = (f"  {'batch':>5} {'ctx':>6} {'splits':>6} {'tri_us':>8} {'tri_gr':>8} {'host':>6} {'fi_us':>8} {'fi_gr':>8} "
           f"{'tri_GB/s':>8} {'fi_GB/s':>8} {'tri_%cp':>7} {'fi_%cp':>7} {'tri/fi':>6}")
    print(hdr)
    for bsz, ctx in fits:
        b = Batch([(1, ctx)] * bsz, H, Hkv, D, page, dtype, k_cache=kc, v_cache=vc, seed=bsz * 7 + ctx)
        out = torch.empty_like(b.q)
        splits = ta.choose_num_splits(bsz, Hkv, ctx, ta._default_config(D, 2, False)["decode_block_n"],
                                      num_sms(torch.cuda.current_device()))
        tri = lambda: ta.paged_attention(b.q, kc, vc, b.meta, b.scale, out=out, config=CONFIG)  # noqa: E731
        t_tri, g_tri, h_tri = bench(tri), graph_bench(tri), host_us(tri)
        fn, err = safe_fi(fi_decode, b, fi_tc)
        t_fi = bench(fn) if fn is not None else float("nan")
        g_fi = graph_bench(fn)
        gb = b.kv_bytes() / 1e9
        best_tri = g_tri if g_tri == g_tri else t_tri
        best_fi = g_fi if g_fi == g_fi else t_fi
        rec = dict(batch=bsz, ctx=ctx, splits=splits, triton_us=t_tri, triton_graph_us=g_tri, triton_host_us=h_tri,
                   fi_us=t_fi, fi_graph_us=g_fi, triton_GBps=gb / (best_tri * 1e-6), fi_GBps=gb / (best_fi * 1e-6),
                   kv_GB=gb)
        if err:
            rec["fi_error"] = err
        if tune_splits:
            best = {}
            for s in (1, 2, 4, 8, 16, 32, 64):
                if s > max(1, ctx // 64):
                    break
                best[s] = graph_bench(lambda s=s: ta.paged_attention(b.q, kc, vc, b.meta, b.scale, out=out,
                                                                     config=CONFIG, num_splits=s))
            rec["split_us"] = best
            sbest = min(best, key=best.get)
        RESULTS["decode"].append(rec)
        tune = f"  best splits {sbest} ({best[sbest]:.1f}us)" if tune_splits else ""
        print(f"  {bsz:>5} {ctx:>6} {splits:>6} {fmt(t_tri)} {fmt(g_tri)} {fmt(h_tri, '.0f', 6)} {fmt(t_fi)} "
              f"{fmt(g_fi)} {fmt(rec['triton_GBps'], '.0f')} {fmt(rec['fi_GBps'], '.0f')} "
              f"{fmt(100 * rec['triton_GBps'] / copy_bw, '.0f', 7)} {fmt(100 * rec['fi_GBps'] / copy_bw, '.0f', 7)} "
              f"{fmt(best_tri / best_fi, '.2f', 6)}{tune}", flush=True)
        if err and bsz == fits[0][0] and ctx == fits[0][1]:
            print(f"    (FlashInfer decode failed: {err})")
    kc = vc = b = out = None  # noqa: F841 - free the big cache before the next section
    torch.cuda.empty_cache()


def prefill_sweep(cases, hopper_configs: bool = False):
    H, Hkv, D, page, dtype = 32, 8, 128, 16, torch.bfloat16
    hop = is_hopper()
    print(f"\n== prefill / extend: H={H} Hkv={Hkv} D={D} bf16 page {page} (causal) ==")
    if hop:
        print("  hop_*: the Hopper prefill kernel (prefill_hopper_triton.py, shipped tiles), same inputs")
    print(f"  {'case':<34} {'tokens':>6} {'triton_us':>10} {'fi_us':>10} {'tri_TF/s':>8} {'fi_TF/s':>8} {'tri/fi':>6}"
          + (f" {'hop_us':>10} {'hop_TF/s':>8} {'hop/fi':>6}" if hop else ""))
    tuned: dict[str, dict] = {}
    for name, reqs in cases:
        b = Batch(reqs, H, Hkv, D, page, dtype, seed=len(reqs))
        out = torch.empty_like(b.q)
        t_tri = bench(lambda: ta.paged_attention(b.q, b.k_cache, b.v_cache, b.meta, b.scale, out=out, config=CONFIG))
        fn, err = safe_fi(fi_prefill, b)
        t_fi = bench(fn) if fn is not None else float("nan")
        fl = b.causal_flops()
        rec = dict(case=name, reqs=reqs, tokens=b.T, triton_us=t_tri, fi_us=t_fi,
                   triton_TFLOPs=fl / (t_tri * 1e-6) / 1e12, fi_TFLOPs=fl / (t_fi * 1e-6) / 1e12)
        if err:
            rec["fi_error"] = err
        line = (f"  {name:<34} {b.T:>6} {fmt(t_tri, width=10)} {fmt(t_fi, width=10)} {fmt(rec['triton_TFLOPs'])} "
                f"{fmt(rec['fi_TFLOPs'])} {fmt(t_tri / t_fi, '.2f', 6)}")
        if hop:
            t_hop = hopper_time(b, out, {})
            rec.update(hopper_us=t_hop, hopper_TFLOPs=fl / (t_hop * 1e-6) / 1e12)
            line += f" {fmt(t_hop, width=10)} {fmt(rec['hopper_TFLOPs'])} {fmt(t_hop / t_fi, '.2f', 6)}"
        RESULTS["prefill"].append(rec)
        print(line, flush=True)
        if err and name == cases[0][0]:
            print(f"    (FlashInfer prefill failed: {err})")
        if hop and hopper_configs:
            times = {json.dumps(c, sort_keys=True): hopper_time(b, out, c) for c in HOPPER_CANDIDATES}
            rec["hopper_config_us"] = times
            tuned[name] = times
            best = min(times, key=lambda c: times[c] if times[c] == times[c] else float("inf"))
            print(f"    best Hopper config {best}: {times[best]:.1f} us ({fmt(times[best] / t_fi, '.2f', 0)}x FlashInfer, "
                  f"{times[best] / times['{}']:.2f}x the shipped tiles); all: "
                  + ", ".join(f"{c} {fmt(t, width=0)}" for c, t in times.items()), flush=True)
        gc.write_json(JSON_PATH, RESULTS, announce=False)
        torch.cuda.empty_cache()
    if tuned:
        summarize_hopper_configs(tuned)
        gc.write_json(JSON_PATH, RESULTS, announce=False)


def hopper_time(b: Batch, out: torch.Tensor, extra: dict) -> float:
    """Median us of the Hopper prefill kernel on `b` with these tiles (NaN when they fail)."""
    cfg = hopper_config(extra)
    try:
        return bench(lambda: ph.prefill_attention(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, b.scale, out=out,
                                                  config=cfg))
    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report it, time the rest
        print(f"    (Hopper config {extra} failed: {type(e).__name__}: {str(e)[:160]})", flush=True)
        torch.cuda.synchronize()
        return float("nan")


def summarize_hopper_configs(tuned: dict[str, dict]) -> None:
    """Each candidate's geometric-mean time over the cases, relative to the shipped tiles: the
    best is the candidate for prefill_hopper_triton.default_config (bf16, head_dim <= 128)."""
    import math

    print("\n  Hopper prefill configs, geometric mean of time / shipped tiles over the cases:")
    scores = {}
    for c in HOPPER_CANDIDATES:
        key = json.dumps(c, sort_keys=True)
        ratios = [t[key] / t["{}"] for t in tuned.values() if t[key] == t[key] and t["{}"] == t["{}"]]
        if len(ratios) == len(tuned):
            scores[key] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(f"    {key:<80} {fmt(scores.get(key, float('nan')), '.3f')}"
              + ("" if key in scores else "  (failed on some case)"))
    if scores:
        best = min(scores, key=scores.get)
        print(f"  suggested default: {best} ({scores[best]:.3f}x the shipped tiles' time)", flush=True)
        RESULTS["hopper_configs"] = dict(scores=scores, best=json.loads(best))


def mixed_and_write():
    H, Hkv, D, page, dtype = 32, 8, 128, 16, torch.bfloat16
    print("\n== mixed batch (decode rows via split-KV kernel, chunk rows via extend kernel) ==")
    for name, reqs in [("64 dec@2048 + chunk 2048/6144", [(1, 2048)] * 64 + [(2048, 6144)]),
                       ("256 dec@1024 + chunk 512/512", [(1, 1024)] * 256 + [(512, 512)]),
                       ("8 dec@16384 + chunk 1024/2048", [(1, 16384)] * 8 + [(1024, 2048)])]:
        b = Batch(reqs, H, Hkv, D, page, dtype, seed=5)
        out = torch.empty_like(b.q)
        t_mix = bench(lambda: ta.paged_attention(b.q, b.k_cache, b.v_cache, b.meta, b.scale, out=out, config=CONFIG))
        t_ext = bench(lambda: ta.paged_extend(b.q, b.k_cache, b.v_cache, b.meta, b.scale, out, config=CONFIG))
        RESULTS["mixed"].append(dict(case=name, triton_us=t_mix, extend_only_us=t_ext))
        print(f"  {name:<34} split dispatch {t_mix:9.1f} us   extend kernel for all rows {t_ext:9.1f} us", flush=True)
        torch.cuda.empty_cache()
    print("\n== KV-cache write (triton store vs torch index_copy_) ==")
    for T in (64, 256, 8192):
        b = Batch([(T, T + 100)], H, Hkv, D, page, dtype, seed=T)
        m = b.meta
        t_tri = bench(lambda: ta.store_kvcache(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping))
        t_ref = bench(lambda: write_kv_cache(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping))
        RESULTS["write_kv"].append(dict(tokens=T, triton_us=t_tri, torch_us=t_ref))
        print(f"  T={T:<6} triton {t_tri:7.1f} us   torch {t_ref:7.1f} us", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write results as JSON to this path")
    ap.add_argument("--quick", action="store_true", help="fewer correctness cases and a smaller sweep")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--tune-splits", action="store_true", help="also time fixed split counts per decode config")
    ap.add_argument("--max-kv-gb", type=float, default=36.0, help="skip decode configs with more KV than this")
    ap.add_argument("--sections", default="decode,prefill,mixed",
                    help="comma list of benchmark sections: decode, prefill, mixed")
    ap.add_argument("--config", help='JSON kernel config overrides, e.g. \'{"extend_block_n": 128}\'')
    ap.add_argument("--fi-no-tensor-cores", action="store_true", help="FlashInfer decode without tensor cores")
    ap.add_argument("--hopper-configs", action="store_true",
                    help="prefill section: also time alternative tiles of the Hopper prefill kernel per case (sm_90)")
    args = ap.parse_args()
    global CONFIG, JSON_PATH
    CONFIG = json.loads(args.config) if args.config else None
    JSON_PATH = args.json
    sections = set(args.sections.split(","))

    if not gc.require_cuda("no CUDA device: this script is for the GPU (CPU tests: pytest tests/test_triton_attention.py)"):
        return 2
    env = gc.device_env(flashinfer=FI_VERSION, interpret=ta.interpret_mode(), config=CONFIG)
    RESULTS["env"].update(env)
    print("  ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    t0 = time.time()
    ok = True
    if not args.skip_correctness:
        ok = correctness(args.quick)
    if not args.skip_bench:
        copy_bw = copy_bandwidth()
        if args.quick:
            batches, ctxs = [1, 16, 64, 256], [512, 4096, 32768]
        else:
            batches, ctxs = [1, 4, 16, 64, 256], [512, 2048, 8192, 32768]
        try:
            if "decode" in sections:
                decode_sweep(copy_bw, batches, ctxs, args.max_kv_gb, args.tune_splits, not args.fi_no_tensor_cores)
        except Exception:  # noqa: BLE001 - keep going to the other sections
            traceback.print_exc()
        pcases = [("1 x 4096 prompt", [(4096, 4096)]),
                  ("4 x 2048 prompts", [(2048, 2048)] * 4),
                  ("16 x 512 prompts", [(512, 512)] * 16),
                  ("chunk 2048 over prefix 8192", [(2048, 10240)]),
                  ("8 x chunk 1024 over prefix 3072", [(1024, 4096)] * 8)]
        if not args.quick:
            pcases += [("1 x 16384 prompt", [(16384, 16384)]),
                       ("64 x 128 prompts", [(128, 128)] * 64)]
        try:
            if "prefill" in sections:
                prefill_sweep(pcases, args.hopper_configs)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        try:
            if "mixed" in sections:
                mixed_and_write()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    RESULTS["env"]["seconds"] = time.time() - t0
    RESULTS["env"]["correct"] = ok
    gc.write_json(args.json, RESULTS)
    print(f"\ndone in {time.time() - t0:.0f} s; correctness {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
