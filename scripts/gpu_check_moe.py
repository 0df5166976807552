#!/usr/bin/env python3
"""GPU check of the Triton fused MoE (dlengine/kernels/moe/fused_moe_triton.py) at DeepSeek-V3 dims.

    python scripts/gpu_check_moe.py                      # full run (a few minutes on an H100)
    python scripts/gpu_check_moe.py --quick              # fewer token counts
    python scripts/gpu_check_moe.py --json out.json --config '{"block_m": 64}'

Dims: hidden 7168, 256 routed experts, top-8, moe_intermediate 2048, bf16 (w13 15 GB + w2 7.5 GB).

1. Correctness for T = 1..4096 tokens: Triton vs the torch reference `fused_experts_torch` (bf16),
   and both vs a float32 reference computed from the same bf16 inputs (T <= 512): the Triton error
   must not exceed the torch-bf16 one by much. NaN check. A float32 spot check (16 experts, same
   H/I; IEEE fp32 dots vs torch fp32 with TF32 off). moe_align_block_size invariants.
2. CUDA-graph check: the Triton path captured at T=8 and replayed on new inputs/routing == eager.
3. Timings (triton.testing.do_bench medians, L2 flushed): Triton eager and CUDA-graph replay,
   torch reference eager; achieved TFLOP/s (6 * T * K * H * I FLOPs) and GB/s of expert weights
   read (distinct experts hit * 3 * I * H * 2 bytes) vs measured peaks (dlengine.bench.peaks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import gpu_common as gc
import torch

from dlengine.bench.peaks import measure_peaks
from dlengine.kernels.moe import fused_moe_triton as fmt
from dlengine.kernels.moe.fused_moe_torch import fused_experts_torch

DEV = "cuda"
H, E, K, I = 7168, 256, 8, 2048
CONFIG: dict | None = None
RESULTS: dict = {"env": {}, "correctness": [], "graph": [], "timings": [], "errors": []}


def route(t: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    logits = torch.randn(t, e, generator=g, device=DEV)
    w, ids = torch.topk(torch.softmax(logits, -1, dtype=torch.float32), k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def make_weights(e: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w13 = torch.randn(e, 2 * I, H, generator=g, device=DEV, dtype=dtype).mul_(H ** -0.5)
    w2 = torch.randn(e, H, I, generator=g, device=DEV, dtype=dtype).mul_(I ** -0.5)
    return w13, w2


def make_x(t: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed + 7)
    return torch.randn(t, H, generator=g, device=DEV, dtype=dtype)


def triton_moe(x, w13, w2, tw, ti):
    return fmt.fused_experts_triton(x, w13, w2, tw, ti, config=CONFIG)


@torch.no_grad()
def ref_fp32(x, w13, w2, tw, ti) -> torch.Tensor:
    """float32 math on the bf16 inputs, one expert at a time (weights upcast per expert)."""
    t, k = ti.shape
    xf = x.float()
    out = torch.zeros(t, H, dtype=torch.float32, device=DEV)
    for e in torch.unique(ti).tolist():
        tok, slot = (ti == e).nonzero(as_tuple=True)
        h1 = xf[tok] @ w13[e].float().t()
        gate, up = h1.chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[e].float().t()
        out.index_add_(0, tok, y * tw[tok, slot, None].float())
    return out


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def check_align() -> None:
    ok = True
    for t, bm in ((1, 16), (5, 16), (300, 32), (4096, 64), (4096, 128)):
        _, ids = route(t, E, K, seed=t)
        s, ex, n = fmt.moe_align_block_size(ids, E, bm)
        s, ex, n = s.cpu(), ex.cpu(), int(n.item())
        counts = torch.bincount(ids.reshape(-1).cpu(), minlength=E)
        ok_t = n == int(((counts + bm - 1) // bm * bm).sum())
        valid = s[:n][s[:n] < t * K]
        ok_t &= sorted(valid.tolist()) == list(range(t * K))
        blocks = n // bm
        flat = ids.reshape(-1).cpu()
        sb = s[: blocks * bm].view(blocks, bm).long()
        owner = torch.where(sb < t * K, flat[sb.clamp(max=t * K - 1)], ex[:blocks, None].long())
        ok_t &= bool((owner == ex[:blocks, None].long()).all()) and bool((ex[blocks:] == -1).all())
        ok &= ok_t
        print(f"  align T={t:5d} block_m={bm:3d}: {'ok' if ok_t else 'FAIL'}")
    RESULTS["correctness"].append({"check": "moe_align_block_size", "ok": ok})


def check_correctness(tokens: list[int], w13, w2) -> bool:
    all_ok = True
    print(f"{'T':>6} {'blk_m':>5} {'tri-vs-bf16ref':>14} {'tri-vs-fp32':>12} {'torch-vs-fp32':>13}  ok")
    for t in tokens:
        x = make_x(t, torch.bfloat16, seed=t)
        tw, ti = route(t, E, K, seed=t)
        out = triton_moe(x, w13, w2, tw, ti)
        ref = fused_experts_torch(x, w13, w2, tw, ti)
        torch.cuda.synchronize()
        rec = {"check": "bf16", "T": t, "block_m": fmt.get_config(t * K, E, x.dtype, CONFIG)["block_m"],
               "nan": bool(torch.isnan(out).any()), "err_vs_bf16_ref": err(out, ref)}
        ok = not rec["nan"] and rec["err_vs_bf16_ref"] < 2e-2
        if t <= 512:
            r32 = ref_fp32(x, w13, w2, tw, ti)
            rec["err_vs_fp32"], rec["torch_err_vs_fp32"] = err(out, r32), err(ref, r32)
            ok &= rec["err_vs_fp32"] <= 2 * rec["torch_err_vs_fp32"] + 1e-3
        rec["ok"] = ok
        all_ok &= ok
        RESULTS["correctness"].append(rec)
        f = lambda key: f"{rec[key]:.2e}" if key in rec else "-"  # noqa: E731
        print(f"{t:6d} {rec['block_m']:5d} {f('err_vs_bf16_ref'):>14} {f('err_vs_fp32'):>12} "
              f"{f('torch_err_vs_fp32'):>13}  {'ok' if ok else 'FAIL'}")
    return all_ok


def check_fp32() -> bool:
    torch.backends.cuda.matmul.allow_tf32 = False
    e = 16
    w13, w2 = make_weights(e, torch.float32, seed=1)
    ok = True
    for t in (1, 7, 100, 1000):
        x = make_x(t, torch.float32, seed=t)
        tw, ti = route(t, e, K, seed=t)
        out = triton_moe(x, w13, w2, tw, ti)
        ref = fused_experts_torch(x, w13, w2, tw, ti)
        r = err(out, ref)
        ok_t = r < 1e-4 and not torch.isnan(out).any()
        ok &= ok_t
        RESULTS["correctness"].append({"check": "fp32", "T": t, "E": e, "err_vs_fp32_ref": r, "ok": ok_t})
        print(f"  fp32 E={e} T={t:5d}: rel err {r:.2e} {'ok' if ok_t else 'FAIL'}")
    del w13, w2
    torch.cuda.empty_cache()
    return ok


def check_graph(w13, w2) -> bool:
    t = 8
    x = make_x(t, torch.bfloat16, seed=1)
    tw, ti = route(t, E, K, seed=1)
    for _ in range(2):
        triton_moe(x, w13, w2, tw, ti)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = triton_moe(x, w13, w2, tw, ti)
    ok = True
    for seed in (2, 3, 4):
        x.copy_(make_x(t, torch.bfloat16, seed=seed))
        nw, ni = route(t, E, K, seed=seed)
        tw.copy_(nw)
        ti.copy_(ni)
        g.replay()
        eager = triton_moe(x, w13, w2, tw, ti)
        torch.cuda.synchronize()
        same = bool(torch.equal(out, eager))
        ok &= same
        RESULTS["graph"].append({"T": t, "seed": seed, "bitwise_equal_to_eager": same})
    print(f"  CUDA graph capture/replay T={t}: {'ok' if ok else 'FAIL'}")
    return ok


def graph_time(fn) -> float:
    """Median microseconds of fn replayed from a CUDA graph."""
    return gc.graph_bench_s(fn) * 1e6


def timings(tokens: list[int], w13, w2, peaks: dict, ref_max_t: int) -> None:
    bw, tf = peaks["copy_gbps"], peaks["bf16_tflops"]
    print(f"  peaks: copy {bw:.0f} GB/s, bf16 GEMM {tf:.0f} TFLOP/s")
    print(f"{'T':>6} {'blk_m':>5} {'experts':>7} {'tri_us':>9} {'graph_us':>9} {'torch_us':>9} {'speedup':>7} "
          f"{'TFLOP/s':>8} {'%peak':>6} {'GB/s':>7} {'%bw':>5}")
    for t in tokens:
        x = make_x(t, torch.bfloat16, seed=t)
        tw, ti = route(t, E, K, seed=t)
        touched = int(torch.unique(ti).numel())
        flops = 6.0 * t * K * H * I
        wbytes = touched * 3 * I * H * w13.element_size()
        us = gc.bench_s(lambda: triton_moe(x, w13, w2, tw, ti)) * 1e6
        try:
            gus = graph_time(lambda: triton_moe(x, w13, w2, tw, ti))
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"].append(f"graph T={t}: {type(e).__name__}: {e}")
            gus = float("nan")
        rus = float("nan")
        if t <= ref_max_t:
            rus = gc.bench_s(lambda: fused_experts_torch(x, w13, w2, tw, ti), warmup=3, rep=20) * 1e6
        best = min(us, gus) if not math.isnan(gus) else us
        rec = {"T": t, "block_m": fmt.get_config(t * K, E, x.dtype, CONFIG)["block_m"], "experts_hit": touched,
               "triton_us": us, "triton_graph_us": gus, "torch_us": rus, "tflops": flops / best * 1e-6,
               "weight_GBps": wbytes / best * 1e-3}
        rec["pct_peak_tflops"] = 100 * rec["tflops"] / tf
        rec["pct_copy_bw"] = 100 * rec["weight_GBps"] / bw
        RESULTS["timings"].append(rec)
        print(f"{t:6d} {rec['block_m']:5d} {touched:7d} {us:9.1f} {gus:9.1f} {rus:9.1f} {rus / best:7.2f} "
              f"{rec['tflops']:8.1f} {rec['pct_peak_tflops']:6.1f} {rec['weight_GBps']:7.0f} {rec['pct_copy_bw']:5.0f}")


def main() -> int:
    global CONFIG
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--quick", action="store_true", help="fewer token counts")
    ap.add_argument("--config", type=json.loads, help="tile overrides (keys of fused_moe_triton._default_config)")
    ap.add_argument("--ref-max-tokens", type=int, default=4096, help="time the torch reference up to this T")
    ap.add_argument("--skip-timings", action="store_true")
    args = ap.parse_args()
    CONFIG = args.config
    if not gc.require_cuda():
        return 2
    RESULTS["env"] = gc.device_env(dims={"hidden": H, "experts": E, "top_k": K, "intermediate": I}, config=CONFIG)
    print(f"{RESULTS['env']}")
    if args.quick:
        check_tokens = [1, 3, 16, 128, 1024, 4096]
        time_tokens = [1, 8, 64, 512, 4096]
    else:
        check_tokens = [1, 2, 3, 4, 8, 16, 31, 64, 128, 256, 512, 1000, 2048, 4096]
        time_tokens = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    ok = True
    t0 = time.time()
    try:
        print("== moe_align_block_size")
        check_align()
        print("== fp32 spot check")
        ok &= check_fp32()
        print("== bf16 DeepSeek-V3 dims: allocating weights")
        w13, w2 = make_weights(E, torch.bfloat16)
        ok &= check_correctness(check_tokens, w13, w2)
        print("== CUDA graph")
        ok &= check_graph(w13, w2)
        if not args.skip_timings:
            print("== timings (us: do_bench median; graph_us: CUDA-graph replay; GB/s: expert weights read)")
            peaks = measure_peaks("cuda")
            RESULTS["env"]["peaks"] = {k: v for k, v in peaks.items() if isinstance(v, (int, float, str))}
            timings(time_tokens, w13, w2, peaks, args.ref_max_tokens)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        RESULTS["errors"].append(f"{type(e).__name__}: {e}")
        ok = False
    RESULTS["ok"] = ok
    RESULTS["wall_s"] = time.time() - t0
    print(f"== {'ALL OK' if ok else 'FAILURES'} in {RESULTS['wall_s']:.0f} s")
    gc.write_json(args.json, RESULTS, announce=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
