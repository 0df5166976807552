#!/usr/bin/env python3
"""GPU time per kernel over decode steps (torch.profiler; CUDA-graph replays are traced too).

    python scripts/profile_kernels.py --model qwen3-8b --batch-size 1 --input-len 512
    # long contexts without their prefill (bench/synthetic_context.py): where a sparse-attention
    # decode step's time goes, against the dense model's at the same context
    python scripts/profile_kernels.py --model deepseek-v3.2-exp --num-layers 4 --batch-size 32 \
        --input-len 32768 --synthetic-context
"""

from __future__ import annotations

import argparse

import gpu_common  # noqa: F401 - puts the repository on sys.path
import torch
from torch.profiler import ProfilerActivity, profile

from dlengine import EngineBuilder, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-8b")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num-layers", type=int, default=None, help="load only the first N layers")
    ap.add_argument("--synthetic-context", action="store_true",
                    help="the prompts count as computed without running them (decode only, any context)")
    args = ap.parse_args()
    b = EngineBuilder(args.model).load_format("dummy").dtype("bfloat16").max_model_len(args.input_len + 256)
    if args.num_layers is not None:
        b.hf_overrides(num_hidden_layers=args.num_layers)
    if args.synthetic_context:
        from dlengine.bench.synthetic_context import SyntheticContextConnector

        b.kv_connector(SyntheticContextConnector).cache(prefix_caching=False)
    engine = b.build()
    vocab = engine.config.model.vocab_size
    g = torch.Generator().manual_seed(0)
    for _ in range(args.batch_size):
        engine.add_request(torch.randint(10, min(vocab, 100000), (args.input_len,), generator=g).tolist(),
                           SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    # warm-up: the prompts (or the synthetic admission) and a few decode steps
    for _ in range(10 if args.synthetic_context else 10 + (args.batch_size * args.input_len) // 8192):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / args.steps, e.count / args.steps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"GPU time per step: {total / 1e3:.3f} ms (sum of kernel times)")
    for t, n, name in rows[:25]:
        print(f"{t / 1e3:8.3f} ms  {n:6.1f}/step  {100 * t / total:5.1f}%  {name[:100]}")


if __name__ == "__main__":
    main()
