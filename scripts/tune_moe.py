#!/usr/bin/env python3
"""Tile search for the Triton fused MoE (dlengine/kernels/moe/fused_moe_triton.py) on the current GPU.

    python scripts/tune_moe.py                        # DeepSeek-V3 dims, T = 1..4096 tokens
    python scripts/tune_moe.py --experts 128 --top-k 8 --hidden 2048 --inter 768   # Qwen3-30B-A3B
    python scripts/tune_moe.py --json out.json

For each token count T it times GEMM 1 (gate/up with fused SiLU) and GEMM 2 (down, routing
weight) separately over a grid of tiles for each BLOCK_M (the two GEMMs share BLOCK_M: they walk
the same aligned pair list), keeps the best pair, and reports it next to the shipped default
(`get_config`), with achieved TFLOP/s and GB/s of expert weights read (distinct experts hit x
3 * I * H * 2 bytes) against the device's measured copy bandwidth and bf16 GEMM peak. Routing is
uniform random top-k (a balanced load, what the shipped table is tuned for). The printed table is
what `_TUNED` in kernels/moe/fused_moe_triton.py is built from.
"""

from __future__ import annotations

import argparse
import itertools
import time

import gpu_common as gc
import torch

from dlengine.bench.peaks import measure_peaks
from dlengine.kernels.moe import fused_moe_triton as fmt


def do_bench(fn, warmup: int, rep: int) -> float:
    """Mean milliseconds of fn (triton's do_bench default, which the shipped tiles were chosen with)."""
    return gc.bench_s(fn, warmup=warmup, rep=rep, mode="mean") * 1e3

GEMM1 = [dict(n1=n, k1=k, warps1=w, stages1=s) for n, k, w, s in itertools.product((64, 128), (64, 128), (4, 8), (3, 4))]
GEMM2 = [dict(n2=n, k2=k, warps2=w, stages2=s)
         for n, k, w, s in itertools.product((64, 128, 256), (64, 128), (4, 8), (3, 4))]


def block_ms_for(avg_pairs: float) -> tuple[int, ...]:
    if avg_pairs <= 4:
        return (16, 32)
    if avg_pairs <= 32:
        return (16, 32, 64)
    return (32, 64, 128)


def timed(fn) -> float | None:
    try:
        return do_bench(fn, warmup=5, rep=25)
    except Exception as e:  # out of shared memory / registers for this tile: skip it
        if "OutOfResources" in type(e).__name__ or "out of resource" in str(e).lower():
            return None
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--tokens", default="1,8,32,128,512,1024,2048,4096")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    E, K, H, I = a.experts, a.top_k, a.hidden, a.inter
    dev = torch.device("cuda")
    peaks = measure_peaks(dev)
    print(f"peaks: copy {peaks['copy_gbps']:.0f} GB/s, bf16 GEMM {peaks['bf16_tflops']:.0f} TFLOP/s", flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, generator=g, device=dev, dtype=torch.bfloat16).mul_(H ** -0.5)
    w2 = torch.randn(E, H, I, generator=g, device=dev, dtype=torch.bfloat16).mul_(I ** -0.5)
    rows = []
    for T in [int(t) for t in a.tokens.split(",")]:
        t0 = time.time()
        x = torch.randn(T, H, generator=g, device=dev, dtype=torch.bfloat16)
        ids = torch.rand(T, E, generator=g, device=dev).topk(K, dim=-1).indices.to(torch.int32)
        topk_w = torch.full((T * K,), 1.0 / K, device=dev)
        touched = ids.unique().numel()
        bytes_w = touched * 3 * I * H * 2
        flops = 6.0 * T * K * H * I
        avg = T * K / E
        best = None
        for bm in block_ms_for(avg):
            aligned = fmt.moe_align_block_size(ids, E, bm)
            b1 = min(((t, c) for c in GEMM1 if (t := timed(lambda c=c: fmt.launch_gate_up(
                x, w13, topk_w, aligned, K, dict(block_m=bm, **c)))) is not None), key=lambda r: r[0])
            inter = fmt.launch_gate_up(x, w13, topk_w, aligned, K, dict(block_m=bm, **b1[1]))
            b2 = min(((t, c) for c in GEMM2 if (t := timed(lambda c=c: fmt.launch_down(
                inter, w2, topk_w, aligned, dict(block_m=bm, **c)))) is not None), key=lambda r: r[0])
            total = b1[0] + b2[0]
            if best is None or total < best[0]:
                best = (total, dict(block_m=bm, **b1[1], **b2[1]), b1[0], b2[0])
        default_cfg = fmt.get_config(T * K, E, torch.bfloat16)
        t_default = do_bench(lambda: fmt.fused_experts_triton(x, w13, w2, topk_w.view(T, K), ids, default_cfg),
                             warmup=5, rep=50)
        t_best = do_bench(lambda: fmt.fused_experts_triton(x, w13, w2, topk_w.view(T, K), ids, best[1]),
                          warmup=5, rep=50)
        roof_ms = max(bytes_w / (peaks["copy_gbps"] * 1e9), flops / (peaks["bf16_tflops"] * 1e12)) * 1e3
        row = dict(tokens=T, avg_pairs_per_expert=avg, experts_touched=touched, best=best[1],
                   gemm1_ms=best[2], gemm2_ms=best[3], best_ms=t_best, default_ms=t_default,
                   default_config=default_cfg, tflops=flops / t_best / 1e9, weight_gbps=bytes_w / t_best / 1e6,
                   roofline_ms=roof_ms, roofline_fraction=roof_ms / t_best, tune_s=time.time() - t0)
        rows.append(row)
        print(f"T={T:5d} avg={avg:7.2f} best {t_best:.3f} ms (default {t_default:.3f} ms) "
              f"{row['tflops']:.0f} TFLOP/s {row['weight_gbps']:.0f} GB/s roofline {100 * row['roofline_fraction']:.0f}% "
              f"cfg {best[1]} [{row['tune_s']:.0f} s]", flush=True)
    out = dict(device=torch.cuda.get_device_name(), dims=dict(E=E, K=K, H=H, I=I), peaks=peaks, rows=rows)
    gc.write_json(a.json, out, announce=False)


if __name__ == "__main__":
    main()
