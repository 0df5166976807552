#!/usr/bin/env python3
"""Why one prompt's prefill takes different times from one iteration to the next (W2: 512 tokens
of Qwen3-8B dims measured 29.6 / 20.5 / 28.9 ms in one run). Per iteration, from adding the request
to its first token: the wall time, the device time of every kernel in that window (torch.profiler)
and the number of kernels. Wall >> kernels: the time is on the host (launches, a sync, a compile);
kernels vary: the device ran different or slower kernels (the top kernels of the slowest and the
fastest iteration are printed side by side).

    python scripts/profile_prefill.py                               # CUDA: qwen3-8b, dummy weights
    python scripts/profile_prefill.py --model tiny-qwen3 --iters 2  # CPU: exercises the script
"""

from __future__ import annotations

import argparse
import time

import gpu_common  # noqa: F401 - puts the repository on sys.path
import torch
from torch.profiler import ProfilerActivity, profile

from dlengine import EngineBuilder, SamplingParams


def kernel_times(prof, cuda: bool) -> dict[str, float]:
    """Microseconds per kernel name in the profile (device time on CUDA, CPU time of the ops on CPU)."""
    out = {}
    for e in prof.key_averages():
        t = (getattr(e, "device_time_total", 0) or 0) if cuda else e.self_cpu_time_total
        if t > 0:
            out[e.key] = t
    return out


def one_prefill(engine, prompt: list[int], cuda: bool) -> dict:
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        rid = engine.add_request(prompt, params)
        first = None
        while first is None:
            for out in engine.step():
                if out.request_id == rid and out.new_token_ids:
                    first = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
    while engine.has_unfinished_requests():  # off the clock: the second token and the drain
        engine.step()
    kernels = kernel_times(prof, cuda)
    return {"wall_ms": (first - t0) * 1e3, "kernel_ms": sum(kernels.values()) / 1e3,
            "num_kernel_names": len(kernels), "kernels_us": kernels}


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-8b" if cuda else "tiny-qwen3")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=64,
                    help="decode steps of another request between iterations, as in bench latency")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    b = EngineBuilder(args.model).max_model_len(args.input_len + args.decode_steps + 8)
    if cuda:
        b.load_format("dummy").dtype("bfloat16")
    engine = b.build()
    vocab = engine.config.model.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for it in range(args.iters + 1):  # the first one warms up
        prompt = torch.randint(10, min(vocab, 100000), (args.input_len,), generator=g).tolist()
        r = one_prefill(engine, prompt, cuda)
        # a decode phase between prefills, as between bench latency's iterations
        engine.generate([torch.randint(10, min(vocab, 100000), (16,), generator=g).tolist()],
                        SamplingParams(max_tokens=args.decode_steps, temperature=0.0, ignore_eos=True))
        if it:
            rows.append(r)
            print(f"iteration {it}: wall {r['wall_ms']:8.2f} ms, kernels {r['kernel_ms']:8.2f} ms "
                  f"({r['num_kernel_names']} kernel names)")
    slow, fast = max(rows, key=lambda r: r["wall_ms"]), min(rows, key=lambda r: r["wall_ms"])
    print(f"\nslowest vs fastest iteration ({slow['wall_ms']:.2f} vs {fast['wall_ms']:.2f} ms wall), top kernels (us):")
    for name, t in sorted(slow["kernels_us"].items(), key=lambda kv: -kv[1])[:15]:
        print(f"{t:10.1f} {fast['kernels_us'].get(name, 0.0):10.1f}  {name[:90]}")
    gpu_common.write_json(gpu_common.out_path("profile_prefill.json", args.json),
                          {"model": args.model, "input_len": args.input_len, "iterations": rows})


if __name__ == "__main__":
    main()
