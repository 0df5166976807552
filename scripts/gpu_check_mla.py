#!/usr/bin/env python3
"""GPU check of the Triton MLA kernels (kernels/mla/mla_triton.py) at DeepSeek-V3 dims: 128 heads,
latent 512 + rope 64, nope 128, v 128, bf16, page 16. About 2-3 minutes on an H100.

    python scripts/gpu_check_mla.py            # everything; JSON to $OUT/mla_decode.json if $OUT is set
    python scripts/gpu_check_mla.py --quick    # smaller sweep
    python scripts/gpu_check_mla.py --configs '[{"block_h":64,"block_n":32,"num_warps":8,"num_stages":2}]'

1. Correctness vs the torch reference (mla_attention_ref, float32 over the same bf16 cache):
   the decode kernel alone (latent output, NaN-poisoned buffer; 1 split and many), decode batches
   with contexts not a multiple of the page, the whole layer attention for decodes, a fresh
   prefill, chunked prefill over a cached prefix (expanded path), a short extend (absorbed rows),
   a mixed batch, and a CUDA-graph replay with new context lengths. Freed memory is NaN-filled
   first so that rows a kernel forgets to write show up.
2. Device copy bandwidth (1 GiB device-to-device copy, bytes read + written).
3. Decode sweep batch x context: the decode kernel alone (q_lat given) and the whole absorbed
   attention (q_nope W_UK, kernel, W_UV); latent-KV GB/s = batch*ctx*576*2 / time, % of copy BW.
   Then a tile sweep (BLOCK_H, BLOCK_N, warps, stages) at batch 64 x ctx 8192.
4. FlashInfer's BatchMLAPagedAttentionWrapper on the same caches, when flashinfer imports.
5. Prefill / extend timings (non-absorbed path incl. the latent expansion), TFLOP/s of attention.

Timings: triton.testing.do_bench medians (warmed up).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import gpu_common as gc
import torch

from dlengine.kernels.mla import mla_decode_gluon as gluon_mla
from dlengine.kernels.attention import paged_attention_triton as ta
from dlengine.kernels.mla import mla_triton as tm
from dlengine.kernels.common import num_sms
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.mla.mla_torch import MLAWeights, mla_attention_ref

FI = gc.flashinfer_version()
try:
    from flashinfer.mla import BatchMLAPagedAttentionWrapper  # type: ignore
except Exception as e:  # noqa: BLE001 - any import failure means "not available"
    BatchMLAPagedAttentionWrapper = None
    FI = f"unavailable ({type(e).__name__}: {str(e)[:80]})"

DEV = "cuda"
H, C, R, NOPE, V, PAGE = 128, 512, 64, 128, 128, 16
WIDTH = C + R
SCALE = (NOPE + R) ** -0.5
DT = torch.bfloat16
_GLUON_WHY = gluon_mla.supported(torch.device(DEV), DT, C, R) if torch.cuda.is_available() else "no CUDA"
KERNELS = ["triton"] + (["gluon"] if _GLUON_WHY is None else [])
RESULTS: dict = {"env": {}, "correctness": [], "decode": [], "decode_configs": [], "flashinfer": [], "extend": []}


# ------------------------------------------------------------------------------------------ helpers


def poison() -> None:
    """Fill freed cached memory with NaN so outputs a kernel forgets to write are caught."""
    free = torch.cuda.mem_get_info()[0]
    x = torch.empty(int(min(free * 0.5, 8 << 30)) // 4, dtype=torch.float32, device=DEV)
    x.fill_(float("nan"))
    del x


class Batch:
    """reqs [(query_len, seq_len)] over a shared latent cache (shuffled blocks)."""

    def __init__(self, reqs, cache: torch.Tensor, gen: torch.Generator):
        self.reqs = reqs
        page = cache.shape[1]
        nblk = [-(-sl // page) for _, sl in reqs]
        if sum(nblk) > cache.shape[0]:
            raise ValueError("cache too small")
        perm = torch.randperm(cache.shape[0], generator=gen)[: sum(nblk)]
        tables = torch.zeros(len(reqs), max(nblk), dtype=torch.int32)
        slots, qsl, used = [], [0], 0
        for i, (ql, sl) in enumerate(reqs):
            blocks = perm[used:used + nblk[i]]
            used += nblk[i]
            tables[i, :nblk[i]] = blocks.to(torch.int32)
            pos = torch.arange(sl - ql, sl)
            slots.append(blocks[pos // page] * page + pos % page)
            qsl.append(qsl[-1] + ql)
        self.pages = [tables[i, :n].tolist() for i, n in enumerate(nblk)]
        self.meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEV),
            seq_lens=torch.tensor([s for _, s in reqs], dtype=torch.int32, device=DEV),
            block_tables=tables.to(DEV), slot_mapping=torch.cat(slots).long().to(DEV),
            max_query_len=max(q for q, _ in reqs), max_seq_len=max(s for _, s in reqs),
            query_lens_cpu=[q for q, _ in reqs], seq_lens_cpu=[s for _, s in reqs])
        t = qsl[-1]
        self.q_nope = torch.randn(t, H, NOPE, generator=gen).to(DEV, DT)
        self.q_pe = torch.randn(t, H, R, generator=gen).to(DEV, DT)
        self.cache = cache

    @property
    def kv_bytes(self) -> int:
        return sum(s for _, s in self.reqs) * WIDTH * 2


def make_cache(num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    blocks = -(-num_tokens // PAGE)
    cache = torch.empty(blocks, PAGE, 1, WIDTH, dtype=DT, device=DEV)
    cache.normal_(generator=torch.Generator(DEV).manual_seed(int(torch.randint(1 << 30, (1,), generator=gen))))
    return cache


def make_weights(gen: torch.Generator) -> MLAWeights:
    kv_b = (torch.randn(H * (NOPE + V), C, generator=gen) * C**-0.5).to(DEV, DT)
    return MLAWeights.from_kv_b(kv_b, H, NOPE, V)


def latent_reference(q_lat, q_pe, b: Batch) -> torch.Tensor:
    """softmax(q_lat c_kv + q_pe k_pe) c_kv per decode row, float32."""
    out = []
    for i, sl in enumerate(b.meta.seq_lens_cpu):
        rows = torch.tensor(b.pages[i], device=DEV)
        lat = b.cache[rows].reshape(-1, WIDTH)[:sl].float()
        s = (q_lat[i].float() @ lat[:, :C].T + q_pe[i].float() @ lat[:, C:].T) * SCALE
        out.append(torch.softmax(s, -1) @ lat[:, :C])
    return torch.stack(out)


def report(name: str, got: torch.Tensor, ref: torch.Tensor, atol=2e-2, rtol=2e-2) -> bool:
    got, ref = got.float(), ref.float()
    nan = bool(got.isnan().any())
    err = (got - ref).abs().max().item()
    ok = not nan and bool(torch.allclose(got, ref, atol=atol, rtol=rtol))
    print(f"  {'PASS' if ok else 'FAIL'} {name:<58} max|err| {err:.2e}{'  NaN!' if nan else ''}", flush=True)
    RESULTS["correctness"].append(dict(name=name, max_abs=err, nan=nan, ok=ok))
    return ok


# ------------------------------------------------------------------------------------------ checks


def correctness(w: MLAWeights, gen: torch.Generator) -> bool:
    print("\n== correctness (bf16, 128 heads, latent 512 + rope 64, page 16) ==", flush=True)
    cache = make_cache(1 << 19, gen)  # 512k tokens, 0.6 GB
    ok = True

    def ref_of(b: Batch) -> torch.Tensor:
        return mla_attention_ref(torch.cat([b.q_nope, b.q_pe], -1).float(), b.cache, b.meta, w.kv_b.float(),
                                 C, NOPE, V, SCALE)

    # the decode kernel alone: latent outputs, NaN-poisoned
    for kernel in KERNELS:
        for reqs, splits in [([(1, s) for s in (1, 15, 16, 17, 300, 1024, 2049, 4096)], None),
                             ([(1, 16000)], None), ([(1, 777), (1, 33)], 1), ([(1, 5000), (1, 1), (1, 64)], 4), ([(1, 100)], 64),
                             ([(1, 8192)] * 32, None)]:
            b = Batch(reqs, cache, gen)
            q_lat = torch.randn(len(reqs), H, C, generator=gen).to(DEV, DT)
            out = torch.full((len(reqs), H, C), float("nan"), dtype=DT, device=DEV)
            tm.mla_decode(q_lat, b.q_pe, cache, b.meta.block_tables, b.meta.query_start_loc, b.meta.seq_lens, out,
                          SCALE, max_seq_len=b.meta.max_seq_len, num_splits=splits, kernel=kernel)
            ok &= report(f"{kernel} decode kernel ctx {[s for _, s in reqs][:4]}.. splits={splits or 'auto'}", out,
                         latent_reference(q_lat, b.q_pe, b))
    # whole attention: decodes, prefill, chunked prefill over a prefix, short extend, mixed
    cases = [
        ("decode batch 64, ctx 1..3000", [(1, int(s)) for s in torch.randint(1, 3000, (64,), generator=gen)]),
        ("fresh prefill 1000 (expanded)", [(1000, 1000)]),
        ("chunked prefill 512 over prefix 1500 (expanded)", [(512, 2012)]),
        ("short extend 7 over prefix 3000 (absorbed rows)", [(7, 3007)]),
        ("mixed: 2 prefills + extend + 16 decodes", [(300, 300), (100, 900), (5, 2005)] + [(1, 100 * i + 3) for i in range(16)]),
    ]
    for name, reqs in cases:
        b = Batch(reqs, cache, gen)
        poison()
        got = tm.mla_attention(b.q_nope, b.q_pe, cache, b.meta, w, SCALE)
        ok &= report(name, got, ref_of(b))
    ok &= graph_replay(w, cache, gen)
    if BatchMLAPagedAttentionWrapper is not None:  # reported on its own line; does not fail the triton run
        RESULTS["env"]["flashinfer_backend_ok"] = flashinfer_backend_check(w, cache, gen, ref_of, cases)
    return ok


def flashinfer_backend_check(w, cache, gen, ref_of, cases) -> bool:
    """The engine's flashinfer MLA path (FlashInferAttentionBackend.attend_latent, W_UK/W_UV included)."""
    from dlengine.kernels.attention.flashinfer_backend import FlashInferAttentionBackend

    backend, ok = FlashInferAttentionBackend(), True
    for name, reqs in cases:
        b = Batch(reqs, cache, gen)
        try:
            poison()
            got = backend.attend_latent(b.q_nope, b.q_pe, cache, b.meta, w, SCALE)
            ok &= report(f"flashinfer backend: {name}", got, ref_of(b))
        except Exception as e:  # noqa: BLE001
            print(f"  FAIL flashinfer backend: {name}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            RESULTS["correctness"].append(dict(name=f"flashinfer backend: {name}", ok=False, error=str(e)[:300]))
            ok = False
    return ok


def graph_replay(w: MLAWeights, cache: torch.Tensor, gen: torch.Generator) -> bool:
    """Capture one absorbed decode for 32 rows (max context 8192), replay with new contexts."""
    n = 32
    b = Batch([(1, 8192)] * n, cache, gen)
    m = b.meta
    m.max_seq_len = 8192
    tm.mla_attention(b.q_nope, b.q_pe, cache, m, w, SCALE)  # compile + allocate split counters
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = tm.mla_attention(b.q_nope, b.q_pe, cache, m, w, SCALE)
    worst, ok = 0.0, True
    for trial in range(3):
        new = [int(x) for x in torch.randint(0, 8193, (n,), generator=gen)]
        new[0] = 0  # a padding row
        m.seq_lens.copy_(torch.tensor(new, dtype=torch.int32))
        b.q_nope.copy_(torch.randn(b.q_nope.shape, generator=gen).to(DT))
        g.replay()
        torch.cuda.synchronize()
        live = [i for i in range(n) if new[i] > 0]
        meta = AttentionMetadata(m.query_start_loc[: len(live) + 1], m.seq_lens[live], m.block_tables[live],
                                 m.slot_mapping, 1, max(new), [1] * len(live), [new[i] for i in live])
        ref = mla_attention_ref(torch.cat([b.q_nope[live], b.q_pe[live]], -1).float(), cache, meta, w.kv_b.float(),
                                C, NOPE, V, SCALE)
        got = out[live].float()
        worst = max(worst, (got - ref).abs().max().item())
        ok &= bool(torch.allclose(got, ref, atol=2e-2, rtol=2e-2)) and bool(torch.all(out[0] == 0))
        ok &= not bool(out.isnan().any())
    print(f"  {'PASS' if ok else 'FAIL'} {'CUDA-graph replay (new contexts, a padding row)':<58} max|err| {worst:.2e}")
    RESULTS["correctness"].append(dict(name="cuda graph replay", max_abs=worst, ok=ok))
    return ok


def copy_bandwidth() -> float:
    bw = gc.copy_bandwidth(DEV)
    print(f"\n== device copy bandwidth: {bw:.0f} GB/s (1 GiB copy, read + write) ==", flush=True)
    RESULTS["env"]["copy_GBps"] = bw
    return bw


def bench(fn) -> float:
    return gc.bench_s(fn, rep=40)


def decode_inputs(b: Batch, w: MLAWeights):
    q_lat = torch.bmm(b.q_nope.transpose(0, 1), w.w_uk).transpose(0, 1)
    out = torch.empty(len(b.reqs), H, C, dtype=DT, device=DEV)
    return q_lat, out


def decode_sweep(w, gen, copy_bw, batches, ctxs, cache) -> None:
    print("\n== decode sweep (bf16, page 16): kernel alone / whole absorbed attention ==", flush=True)
    print(f"  {'batch':>5} {'ctx':>6} {'splits':>6} {'kernel us':>10} {'GB/s':>7} {'%copy':>6} {'attn us':>9} "
          f"{'GB/s':>7}", flush=True)
    for bs in batches:
        for ctx in ctxs:
            if bs * ctx * WIDTH * 2 > 40e9 or bs * ctx > cache.shape[0] * PAGE:
                continue
            b = Batch([(1, ctx)] * bs, cache, gen)
            q_lat, out = decode_inputs(b, w)
            m = b.meta
            t_k = bench(lambda: tm.mla_decode(q_lat, b.q_pe, cache, m.block_tables, m.query_start_loc, m.seq_lens,
                                              out, SCALE, max_seq_len=ctx, kernel="triton"))
            t_g = {k: bench(lambda k=k: tm.mla_decode(q_lat, b.q_pe, cache, m.block_tables, m.query_start_loc,
                                                      m.seq_lens, out, SCALE, max_seq_len=ctx, kernel=k))
                   for k in KERNELS if k != "triton"}
            t_a = bench(lambda: tm.mla_attention(b.q_nope, b.q_pe, cache, m, w, SCALE))
            cfg = tm.decode_config(DT)
            head_tiles = -(-H // cfg["block_h"])
            splits = ta.choose_num_splits(bs, head_tiles, ctx, cfg["block_n"], num_sms(torch.cuda.current_device()))
            gbs, gbs_a = b.kv_bytes / t_k / 1e9, b.kv_bytes / t_a / 1e9
            row = dict(batch=bs, ctx=ctx, splits=splits, kernel_us=t_k * 1e6, kernel_GBps=gbs,
                       pct_copy=100 * gbs / copy_bw, attention_us=t_a * 1e6, attention_GBps=gbs_a)
            extra = ""
            for k, t in t_g.items():
                gbs_g = b.kv_bytes / t / 1e9
                row.update({f"{k}_us": t * 1e6, f"{k}_GBps": gbs_g, f"{k}_pct_copy": 100 * gbs_g / copy_bw})
                extra += f"  {k} {t * 1e6:8.1f} us {100 * gbs_g / copy_bw:4.0f}%"
            print(f"  {bs:>5} {ctx:>6} {splits:>6} {t_k * 1e6:>10.1f} {gbs:>7.0f} {100 * gbs / copy_bw:>5.0f}% "
                  f"{t_a * 1e6:>9.1f} {gbs_a:>7.0f}{extra}", flush=True)
            RESULTS["decode"].append(row)


def config_sweep(w, gen, copy_bw, cache, configs) -> None:
    bs, ctx = 64, 8192
    print(f"\n== decode tile sweep at batch {bs} x ctx {ctx} ==", flush=True)
    b = Batch([(1, ctx)] * bs, cache, gen)
    q_lat, out = decode_inputs(b, w)
    m = b.meta
    ref = None
    for cfg in configs:
        try:
            fn = lambda: tm.mla_decode(q_lat, b.q_pe, cache, m.block_tables, m.query_start_loc,  # noqa: E731
                                       m.seq_lens, out, SCALE, max_seq_len=ctx, config=cfg, kernel="triton")
            fn()
            torch.cuda.synchronize()
            if ref is None:
                ref = out.clone()
            same = bool(torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2))
            t = bench(fn)
            gbs = b.kv_bytes / t / 1e9
            print(f"  {json.dumps(cfg):<70} {t * 1e6:8.1f} us {gbs:6.0f} GB/s {100 * gbs / copy_bw:4.0f}%"
                  f"{'' if same else '  MISMATCH'}", flush=True)
            RESULTS["decode_configs"].append(dict(config=cfg, us=t * 1e6, GBps=gbs, pct_copy=100 * gbs / copy_bw,
                                                  matches_first=same))
        except Exception as e:  # noqa: BLE001 - a tile that does not fit (smem/registers) is reported
            print(f"  {json.dumps(cfg):<70} failed: {type(e).__name__}: {str(e)[:100]}", flush=True)


def flashinfer_sweep(w, gen, copy_bw, batches, ctxs, cache, page=PAGE) -> None:
    print(f"\n== FlashInfer BatchMLAPagedAttentionWrapper ({FI}), page {page} ==", flush=True)
    if BatchMLAPagedAttentionWrapper is None:
        print("  skipped")
        return
    cache = cache.view(-1, page, 1, WIDTH)
    ws = torch.empty(256 << 20, dtype=torch.int8, device=DEV)
    # the c_kv and k_pe halves of our cache as strided views, as the flashinfer backend passes them
    ckv, kpe = cache[:, :, 0, :C], cache[:, :, 0, C:]
    for bs in batches:
        for ctx in ctxs:
            if bs * ctx * WIDTH * 2 > 40e9 or bs * ctx > cache.shape[0] * PAGE:
                continue
            try:
                b = Batch([(1, ctx)] * bs, cache, gen)
                q_lat, out = decode_inputs(b, w)
                q_lat = q_lat.contiguous()
                wrapper = BatchMLAPagedAttentionWrapper(ws, backend="auto")
                indices = torch.tensor([p for pages in b.pages for p in pages], dtype=torch.int32, device=DEV)
                indptr = torch.tensor([0] + [len(p) for p in b.pages], dtype=torch.int32).cumsum(0).int().to(DEV)
                qo = torch.arange(bs + 1, dtype=torch.int32, device=DEV)
                wrapper.plan(qo, indptr, indices, b.meta.seq_lens, H, C, R, page, False, SCALE, DT, DT)
                fi_out = wrapper.run(q_lat, b.q_pe, ckv, kpe)
                tm.mla_decode(q_lat, b.q_pe, cache, b.meta.block_tables, b.meta.query_start_loc, b.meta.seq_lens,
                              out, SCALE, max_seq_len=ctx)
                same = bool(torch.allclose(fi_out.float(), out.float(), atol=2e-2, rtol=2e-2))
                t = bench(lambda: wrapper.run(q_lat, b.q_pe, ckv, kpe))
                gbs = b.kv_bytes / t / 1e9
                row = dict(batch=bs, ctx=ctx, page=page, us=t * 1e6, GBps=gbs, pct_copy=100 * gbs / copy_bw,
                           matches_triton=same)
                extra = ""
                for k in KERNELS[1:]:  # ours on the same page size, same run
                    t_g = bench(lambda k=k, b=b, out=out, ctx=ctx: tm.mla_decode(
                        q_lat, b.q_pe, cache, b.meta.block_tables, b.meta.query_start_loc, b.meta.seq_lens, out,
                        SCALE, max_seq_len=ctx, kernel=k))
                    gbs_g = b.kv_bytes / t_g / 1e9
                    row.update({f"{k}_us": t_g * 1e6, f"{k}_pct_copy": 100 * gbs_g / copy_bw})
                    extra += f" | {k} {t_g * 1e6:7.1f} us {100 * gbs_g / copy_bw:3.0f}% ({t_g / t:.2f}x FI)"
                print(f"  batch {bs:>4} ctx {ctx:>6}: {t * 1e6:8.1f} us {gbs:6.0f} GB/s {100 * gbs / copy_bw:4.0f}%"
                      f"{'' if same else '  (differs from triton!)'}{extra}", flush=True)
                RESULTS["flashinfer"].append(row)
            except Exception as e:  # noqa: BLE001
                print(f"  batch {bs} ctx {ctx}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                return


def extend_timings(w, gen, cache) -> None:
    print("\n== prefill / extend (non-absorbed: expand + paged extend kernel) ==", flush=True)
    for ql, sl in [(512, 512), (2048, 2048), (8192, 8192), (2048, 8192), (16, 8192)]:
        b = Batch([(ql, sl)], cache, gen)
        t = bench(lambda: tm.mla_attention(b.q_nope, b.q_pe, cache, b.meta, w, SCALE))
        prefix = sl - ql
        pairs = ql * prefix + ql * (ql + 1) / 2  # causal (query, key) pairs
        flops = 2 * H * pairs * (NOPE + R + V)
        path = "absorbed" if ql <= tm.ABSORB_MAX_QUERY_LEN else "expanded"
        print(f"  q {ql:>5} over ctx {sl:>5} ({path}): {t * 1e3:8.3f} ms  {flops / t / 1e12:6.1f} TFLOP/s "
              f"(attention FLOPs of the non-absorbed form)", flush=True)
        RESULTS["extend"].append(dict(query_len=ql, seq_len=sl, path=path, ms=t * 1e3, tflops=flops / t / 1e12))


def guarded(fn, *args) -> None:
    """Run one section; a crash is printed and recorded, the other sections still run."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        RESULTS.setdefault("errors", []).append(f"{fn.__name__}: {type(e).__name__}: {str(e)[:300]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", type=str, default=None, help="JSON list of decode tile configs to sweep")
    ap.add_argument("--pages", type=str, default=None, help="JSON list of extra page sizes for the FlashInfer "
                    "comparison at batch 32..128 x 8k, e.g. [64]")
    ap.add_argument("--skip-configs", action="store_true", help="skip the Triton tile sweep")
    args = ap.parse_args()
    if not gc.require_cuda():
        return 2
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    RESULTS["env"] = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, flashinfer=FI,
                          decode_defaults=tm.DECODE_DEFAULTS)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, flashinfer {FI}, "
          f"gluon kernel: {'yes' if _GLUON_WHY is None else _GLUON_WHY}")
    w = make_weights(gen)
    ok = True
    try:
        ok = correctness(w, gen)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        ok = False
    torch.cuda.empty_cache()
    copy_bw = copy_bandwidth()
    batches = [1, 8, 32, 64] if args.quick else [1, 8, 32, 64, 128]
    ctxs = [1024, 8192] if args.quick else [1024, 2048, 8192, 16384, 32768]
    cache = make_cache(128 * 32768 if not args.quick else 64 * 8192, gen)  # 4.8 GB: every combo fits
    guarded(decode_sweep, w, gen, copy_bw, batches, ctxs, cache)
    # register budget: acc [block_h, 512] fp32 + q_lat [block_h, 512]; smem: stages x block_n x 576 x 2 B.
    # block_h 64 is what Hopper's wgmma needs (M=64 per warpgroup); 16/32 run mma.sync
    configs = json.loads(args.configs) if args.configs else [
        dict(block_h=16, block_n=32, num_warps=4, num_stages=2),
        dict(block_h=16, block_n=64, num_warps=4, num_stages=2),
        dict(block_h=32, block_n=32, num_warps=8, num_stages=2),
        dict(block_h=32, block_n=64, num_warps=8, num_stages=2),
        dict(block_h=32, block_n=32, num_warps=4, num_stages=3),
        dict(block_h=64, block_n=32, num_warps=8, num_stages=2),
        dict(block_h=64, block_n=64, num_warps=8, num_stages=2),
        dict(block_h=64, block_n=16, num_warps=8, num_stages=3),
    ]
    if not args.skip_configs:
        guarded(config_sweep, w, gen, copy_bw, cache, configs)
    guarded(flashinfer_sweep, w, gen, copy_bw, batches, ctxs, cache)
    if args.pages:
        for page in json.loads(args.pages):
            guarded(flashinfer_sweep, w, gen, copy_bw, [32, 64, 128], [8192], cache, page)
    guarded(extend_timings, w, gen, cache)
    print(f"\ncorrectness (triton): {'PASS' if ok else 'FAIL'}")
    if "flashinfer_backend_ok" in RESULTS["env"]:
        print(f"correctness (flashinfer MLA backend): {'PASS' if RESULTS['env']['flashinfer_backend_ok'] else 'FAIL'}")
    gc.write_json(gc.out_path("mla_decode.json"), RESULTS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
