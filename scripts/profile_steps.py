#!/usr/bin/env python3
"""Where a step's time goes: host scheduling, input preparation + launch, and the wait for the
GPU, per phase of a throughput run (W1 by default). For finding overhead, not for reporting.

    python scripts/profile_steps.py --model qwen3-0.6b --num-prompts 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import gpu_common  # noqa: F401 - puts the repository on sys.path
import torch

from dlengine import EngineBuilder, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--cprofile", metavar="PATH", help="also profile the host side of the run with cProfile: "
                    "dump the stats to PATH and print the 30 functions with the most own time")
    args = ap.parse_args()

    t0 = time.perf_counter()
    b = EngineBuilder(args.model).load_format("dummy").dtype("bfloat16").max_model_len(args.max_model_len)
    if args.no_graphs:
        b.cuda_graphs(False)
    engine = b.build()
    print(f"build {time.perf_counter() - t0:.1f}s: {engine}")
    g = torch.Generator().manual_seed(0)
    lens_in = torch.randint(args.min_len, args.max_len + 1, (args.num_prompts,), generator=g).tolist()
    lens_out = torch.randint(args.min_len, args.max_len + 1, (args.num_prompts,), generator=g).tolist()

    timings = {"sched": [], "exec": [], "rest": [], "total": [], "kind": [], "n": []}
    sched_fn, exec_fn = engine.scheduler.schedule, engine.runner.execute
    cur = {}

    def timed_schedule():
        t = time.perf_counter()
        out = sched_fn()
        cur["sched"] = time.perf_counter() - t
        cur["kind"] = ("decode" if out.scheduled and all(s.num_new_tokens == 1 for s in out.scheduled) else "mixed")
        cur["n"] = len(out.scheduled)
        return out

    def timed_execute(out):
        t = time.perf_counter()
        r = exec_fn(out)
        cur["exec"] = time.perf_counter() - t
        return r

    engine.scheduler.schedule, engine.runner.execute = timed_schedule, timed_execute
    for i, (li, lo) in enumerate(zip(lens_in, lens_out)):
        engine.add_request(torch.randint(10, min(100000, engine.config.model.vocab_size), (li,), generator=g).tolist(),
                           SamplingParams(max_tokens=lo, temperature=0.0, ignore_eos=True))
    prof = None
    if args.cprofile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    start = time.perf_counter()
    n_out = 0
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        total = time.perf_counter() - t
        n_out += sum(len(o.new_token_ids) for o in outs)
        if "exec" not in cur:
            continue
        for k in ("sched", "exec", "kind", "n"):
            timings[k].append(cur[k])
        timings["rest"].append(total - cur["sched"] - cur["exec"])
        timings["total"].append(total)
        cur.clear()
    elapsed = time.perf_counter() - start
    if prof is not None:
        import pstats

        prof.disable()
        prof.dump_stats(args.cprofile)
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    print(f"{n_out} output tokens in {elapsed:.2f}s = {n_out / elapsed:.0f} tok/s, {len(timings['total'])} steps, "
          f"graph steps {engine.runner.num_graph_steps}")
    for kind in ("mixed", "decode"):
        idx = [i for i, k in enumerate(timings["kind"]) if k == kind]
        if not idx:
            continue
        def ms(key):
            return statistics.mean(timings[key][i] for i in idx) * 1e3
        print(f"{kind:6s} steps {len(idx):5d}  mean batch {statistics.mean(timings['n'][i] for i in idx):6.1f}  "
              f"total {ms('total'):7.2f} ms  schedule {ms('sched'):6.2f}  execute {ms('exec'):6.2f}  "
              f"rest (GPU wait + outputs) {ms('rest'):6.2f}  sum {sum(timings['total'][i] for i in idx):.2f}s")
    print("first 12 steps (ms):", [round(x * 1e3, 1) for x in timings["total"][:12]])

    # pure GPU time of one graph replay at a few batch sizes
    gr = engine.runner.graph_runner
    if gr is not None:
        from dlengine.engine.graph_layout import GraphChoice

        for bs in (64, 128, 256):
            graph = gr.graphs.get(GraphChoice(1, bs))  # the decode graph of this batch size
            if graph is None:
                continue
            gr.seq_lens[:bs].fill_(600)
            nb = gr.block_tables.shape[1]
            ids = torch.arange(bs * nb, device=gr.block_tables.device).view(bs, nb) % engine.block_manager.num_blocks
            gr.block_tables[:bs].copy_(ids.to(torch.int32))  # distinct blocks: no L2 reuse across rows
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(20):
                graph.replay()
            e1.record()
            torch.cuda.synchronize()
            print(f"graph replay bs={bs} ctx=600: {e0.elapsed_time(e1) / 20:.2f} ms")
            gr.seq_lens.zero_()


if __name__ == "__main__":
    main()
