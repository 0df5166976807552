#!/usr/bin/env python3
"""The Hopper Gluon MLA decode kernel (kernels/mla/mla_decode_gluon.py) on a GPU: correctness against a float32
reference, then speed against the device's copy bandwidth and FlashInfer's MLA kernel in the same
process. DeepSeek-V3 dims: 128 heads, latent 512 + rope 64, bf16. About 2-3 minutes on an H100.

    python scripts/bench_mla_decode.py              # checks + the full sweep
    python scripts/bench_mla_decode.py --check-only
    python scripts/bench_mla_decode.py --parts      # checks + where a split decode's time goes

1. Correctness: contexts 1..32k (tile and page boundaries, odd tile counts), pages 16..128, 16
   heads (a partial head tile), forced split counts (more splits than a row has tiles), a padding
   row (context 0), a ragged batch, the engine's heads-major q / out layout, strides that are not
   multiples of 16. Cache rows past each sequence end are NaN: the kernel must neither read them
   into the result nor leave its output unwritten (it starts NaN too); a second run must give
   the same bits.
2. Copy bandwidth: a 1 GiB device-to-device copy (bytes read + written) -- what the % refer to.
3. Sweep batch x context x page: `gluon` = eager launches (do_bench median; includes the split
   merge launch), `gluon(graph)` = the same call captured in a CUDA graph and replayed (the
   engine's decode; small batches are host-bound eagerly: ~100 us of launch work a call),
   `flashinfer` = BatchMLAPagedAttentionWrapper.run on the same cache (planned once, eager).
   % = latent KV bytes (batch * ctx * 576 * 2) / time / copy bandwidth.
"""

from __future__ import annotations

import argparse
import sys

import gpu_common as gc
import torch

from dlengine.kernels.mla import mla_decode_gluon as gluon_mla

H, C, R = 128, 512, 64
DT = torch.bfloat16
SCALE = 192 ** -0.5
DEV = "cuda"
SWEEP = [(32, 8192), (64, 8192), (128, 8192), (32, 16384), (64, 16384), (32, 32768), (128, 32768),
         (1, 1024), (1, 8192), (1, 32768), (8, 8192), (16, 8192), (32, 1024), (32, 4096), (128, 1024)]
try:
    from flashinfer.mla import BatchMLAPagedAttentionWrapper  # type: ignore
except Exception as e:  # noqa: BLE001 - any import failure means "not available"
    print(f"flashinfer not available ({type(e).__name__}): no comparison")
    BatchMLAPagedAttentionWrapper = None


def make(lens: list[int], page: int, heads: int = H, poison: bool = True, seed: int = 0):
    """A paged latent cache holding random rows for each sequence (shuffled pages; NaN elsewhere if
    poison), block tables, queries, row tokens and lengths."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    pages = [-(-n // page) for n in lens]
    nblk = sum(pages) + 3
    cache = torch.full((nblk, page, 1, C + R), float("nan") if poison else 0.0, dtype=DT, device=DEV)
    perm = torch.randperm(nblk, generator=g)
    bt = torch.full((len(lens), max(max(pages), 1) + 2), nblk - 1, dtype=torch.int32)
    k = 0
    for i, n in enumerate(lens):
        for j in range(pages[i]):
            bt[i, j] = perm[k]
            k += 1
        if poison:
            for pos in range(0, n, page):  # only the valid rows
                m = min(page, n - pos)
                cache[int(bt[i, pos // page]), :m] = torch.randn(m, 1, C + R, generator=g).to(DT).to(DEV)
    if not poison:
        cache.normal_(generator=torch.Generator(device=DEV).manual_seed(seed))
    q_lat = torch.randn(len(lens), heads, C, generator=g).to(DT).to(DEV)
    q_pe = torch.randn(len(lens), heads, R, generator=g).to(DT).to(DEV)
    tok = torch.arange(len(lens), dtype=torch.int32, device=DEV)
    return cache, bt.to(DEV), q_lat, q_pe, tok, torch.tensor(lens, dtype=torch.int32, device=DEV)


def reference(cache, bt, q_lat, q_pe, lens: list[int], page: int) -> torch.Tensor:
    out = torch.zeros(q_lat.shape, dtype=torch.float32, device=DEV)
    for i, n in enumerate(lens):
        if n:
            pos = torch.arange(n, device=DEV)
            rows = cache[bt[i, pos // page].long(), pos % page, 0].float()
            s = (q_lat[i].float() @ rows[:, :C].T + q_pe[i].float() @ rows[:, C:].T) * SCALE
            out[i] = torch.softmax(s, -1) @ rows[:, :C]
    return out


def strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in another memory layout: "heads-major" = the engine's ([T, H, C] view of an [H, T,
    C] tensor), "padded" = rows 8 elements apart from the next (strides not multiples of 16)."""
    if layout == "heads-major":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "padded":
        return torch.cat([x, torch.zeros_like(x[..., :8])], -1)[..., :x.shape[-1]]
    return x


def check(name: str, lens: list[int], page: int, heads: int = H, splits: int | None = None,
          layout: str = "contiguous") -> bool:
    """Close to the reference, nothing left NaN, and the same bits on a second run."""
    cache, bt, q_lat, q_pe, tok, ln = make(lens, page, heads)
    ref = reference(cache, bt, q_lat, q_pe, lens, page)
    q_lat, q_pe = strided(q_lat, layout), strided(q_pe, layout)
    outs = []
    for _ in range(2):
        out = strided(torch.full_like(ref, float("nan"), dtype=q_lat.dtype), layout)
        gluon_mla.mla_decode_gluon(q_lat, q_pe, cache, bt, tok, ln, out, SCALE, max_seq_len=max(lens),
                                   num_splits=splits)
        outs.append(out)
    err = (outs[0].float() - ref).abs().max().item()
    same = torch.equal(outs[0], outs[1])
    ok = bool(torch.allclose(outs[0].float(), ref, atol=2e-2, rtol=2e-2)) and not bool(outs[0].isnan().any()) and same
    print(f"  {'PASS' if ok else 'FAIL'} {name:<40} max|err| {err:.2e}{'' if same else ' (second run differs)'}",
          flush=True)
    return ok


def correctness() -> bool:
    ragged = [int(x) for x in torch.randint(1, 9000, (32,), generator=torch.Generator().manual_seed(1))]
    cases = [("1 x 1", [1], 64), ("1 x 64", [64], 64), ("1 x 65", [65], 64), ("1 x 130 (odd tiles)", [130], 64),
             ("3 rows mixed", [1, 200, 1000], 64), ("page 16", [17, 300, 4097], 16), ("page 32", [100, 2048], 32),
             ("page 128", [129, 1000], 128), ("16 heads", [300, 777], 64, 16), ("1 split", [5000], 64, H, 1),
             ("3 splits", [5000, 333], 64, H, 3), ("8 splits > a row's tiles", [100, 9000], 64, H, 8),
             ("padding row", [0, 500], 64), ("padding row, 4 splits", [0, 500, 3000], 16, H, 4),
             ("32 x 8k", [8192] * 32, 64), ("2 x 32k", [32768, 30001], 64), ("32 ragged", ragged, 64),
             ("engine layout (q, out heads-major)", [3000, 70], 16, H, None, "heads-major"),
             ("padded rows (strides % 16 != 0)", [3000, 70], 16, H, 2, "padded")]
    return all([check(*c) for c in cases])


def sweep(copy_bw: float) -> None:
    fi_ws = torch.empty(256 << 20, dtype=torch.int8, device=DEV)
    for bs, ctx in SWEEP:
        for page in ([64, 16] if ctx == 8192 and bs >= 32 else [64]):
            cache, bt, q_lat, q_pe, tok, ln = make([ctx] * bs, page, poison=False)
            out = torch.empty_like(q_lat)
            kv_bytes = bs * ctx * (C + R) * 2

            def call(cache=cache, bt=bt, q_lat=q_lat, q_pe=q_pe, tok=tok, ln=ln, out=out, ctx=ctx):
                return gluon_mla.mla_decode_gluon(q_lat, q_pe, cache, bt, tok, ln, out, SCALE, max_seq_len=ctx)

            res = {"gluon": gc.bench_s(call, rep=40)}
            graph = gc.capture_graph(call)
            res["gluon(graph)"] = gc.bench_s(graph.replay, rep=40)
            extra = f" host {gc.host_us(call, 20):.0f} us/call"
            if BatchMLAPagedAttentionWrapper is not None:
                wrapper = BatchMLAPagedAttentionWrapper(fi_ws, backend="auto")
                npg = ctx // page
                indptr = torch.arange(0, bs + 1, dtype=torch.int32, device=DEV) * npg
                qo = torch.arange(bs + 1, dtype=torch.int32, device=DEV)
                wrapper.plan(qo, indptr, bt[:, :npg].reshape(-1).contiguous(), ln, H, C, R, page, False, SCALE,
                             DT, DT)
                ckv, kpe = cache[:, :, 0, :C], cache[:, :, 0, C:]
                fi_out = wrapper.run(q_lat, q_pe, ckv, kpe)
                call()
                extra += f", |gluon - flashinfer| <= {(fi_out.float() - out.float()).abs().max().item():.1e}"
                res["flashinfer"] = gc.bench_s(lambda: wrapper.run(q_lat, q_pe, ckv, kpe), rep=40)
            line = " | ".join(f"{k} {t * 1e6:7.1f} us {100 * kv_bytes / t / 1e9 / copy_bw:4.1f}%" for k, t in res.items())
            print(f"  batch {bs:>3} x ctx {ctx:>5} page {page:>2}: {line}{extra}", flush=True)
            del cache, graph


def parts(copy_bw: float) -> None:
    """Where the time of a split decode goes: the whole call (CUDA-graph replays, three rounds: their
    spread is the noise) and the split merge launch alone on a workspace of the same size (20
    launches in one graph: an eager launch alone would time the host), both merge paths."""
    for bs, ctx in [(32, 8192), (16, 8192), (32, 16384), (64, 8192), (32, 4096)]:
        cache, bt, q_lat, q_pe, tok, ln = make([ctx] * bs, 64, poison=False)
        out = torch.empty_like(q_lat)
        kv_bytes = bs * ctx * (C + R) * 2
        graph = gc.capture_graph(lambda: gluon_mla.mla_decode_gluon(q_lat, q_pe, cache, bt, tok, ln, out, SCALE,
                                                                     max_seq_len=ctx))
        times = sorted(gc.bench_s(graph.replay, rep=60) for _ in range(3))
        splits = gluon_mla.choose_num_splits(bs, 2, ctx, torch.cuda.get_device_properties(0).multi_processor_count)
        cells = [f"{splits} splits", f"call {times[1] * 1e6:6.1f} us {100 * kv_bytes / times[1] / 1e9 / copy_bw:4.1f}% "
                 f"(rounds {', '.join(f'{t * 1e6:.1f}' for t in times)})"]
        if splits > 1:
            ws = torch.randn(bs * H * splits * (C + 1), dtype=torch.float32, device=DEV)
            for pair in ((True, False) if splits == 2 else (False,)):
                # 20 launches in one graph: an eager launch alone would time the host, not the kernel
                g = gc.capture_graph(lambda pair=pair: gluon_mla._launch_merge(ws, tok, ln, out, splits, pair=pair),
                                     launches=20)
                t = gc.bench_s(g.replay, warmup=5, rep=40) / 20
                cells.append(f"merge alone{' (pair)' if pair else ''} {t * 1e6:5.1f} us")
                del g
        print(f"  batch {bs:>3} x ctx {ctx:>5}: " + " | ".join(cells), flush=True)
        del graph


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--parts", action="store_true", help="only the time breakdown of split decodes (after the checks)")
    args = ap.parse_args()
    why = gluon_mla.supported(torch.device(DEV), DT, C, R) if torch.cuda.is_available() else "no CUDA device"
    if why:
        print(f"the Gluon MLA decode kernel cannot run here: {why}")
        return 1
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    print("== correctness vs the float32 reference ==", flush=True)
    ok = correctness()
    if not args.check_only:
        copy_bw = gc.copy_bandwidth()
        print(f"== speed (copy bandwidth {copy_bw:.0f} GB/s; % of it) ==", flush=True)
        if args.parts:
            parts(copy_bw)
        else:
            sweep(copy_bw)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
