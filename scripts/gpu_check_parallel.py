#!/usr/bin/env python3
"""Check the parallel engine against the single-process engine: greedy tokens must be identical.

    python scripts/gpu_check_parallel.py                    # N = every visible GPU, NCCL, spawned workers
    python scripts/gpu_check_parallel.py --world-size 2
    python scripts/gpu_check_parallel.py --world-size 1     # one GPU (see below)
    torchrun --nproc-per-node 2 scripts/gpu_check_parallel.py   # the torchrun path (rank 0 reports)
    ... --device cpu                                        # gloo on CPU processes instead

Layouts (each on the tiny checkpoints, float32): tp=N on Qwen3 and DeepSeek-V3 (MLA heads, TP
experts), attention_dp=N x ffn_ep=N on Qwen3-MoE (contiguous experts) and DeepSeek-V3
(round-robin experts), and attention_dp=N x ffn_ep=N on DeepSeek-V3 with its trained MTP layer
drafting 2 tokens a step (the MTP layer's MoE joins the expert-parallel collectives; every rank
pads its MTP passes to 2 a step); DeepSeek-V4 under tp=N (N <= 2: its 2 output groups) and
attention_dp=N x ffn_ep=N (hash- and learned-routed clamped experts). Batches: 8 prompts of 1..100 tokens, then one prompt alone (the other DP
ranks idle), then uneven lengths. A layout the tiny models cannot take (tp=8 > 4 heads) is skipped.

With world size 1 the layouts would be plain engines, so instead one NCCL rank builds engines
whose TP and EP layers are given a one-rank process group: every collective of the parallel path
(all-reduce after row-parallel layers and the vocab-parallel embedding, all-gather of logits,
all-to-all dispatch/combine of the MoE layers, the lockstep all-reduce) runs through NCCL, and the
tokens must equal the plain engine's.

Exit status 0 when every check passed; prints one line per check and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import gpu_common as gc
import torch
import torch.distributed as dist

from dlengine import EngineBuilder, SamplingParams
from dlengine.config import ConfigError

MAX_NEW = 16


def prompts(n: int = 8, lengths=(1, 2, 5, 16, 17, 31, 64, 100), vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, vocab, (L,), generator=g).tolist() for L in lengths[:n]]


def batches() -> list[tuple[list, list]]:
    p = prompts()
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    short = SamplingParams(max_tokens=3, temperature=0.0)
    return [(p, [greedy] * len(p)), ([p[6]], [greedy]), ([p[0], p[7], p[1]], [short, greedy, short])]


def layouts(n: int) -> list[tuple[str, str, dict]]:
    # tiny DeepSeek-V4 has o_groups=2 (each TP rank holds whole output groups): tp <= 2 only
    v4_tp = [("tp", "tiny-deepseek-v4", dict(tp=n))] if n <= 2 else []
    return [("tp", "tiny-qwen3", dict(tp=n)), ("tp", "tiny-deepseek-v3", dict(tp=n)),
            ("dp-ep", "tiny-qwen3-moe", dict(attention_dp=n, ffn_ep=n)),
            ("dp-ep", "tiny-deepseek-v3", dict(attention_dp=n, ffn_ep=n, expert_placement="round_robin")),
            ("dp-ep-mtp", "tiny-deepseek-v3-mtp", dict(attention_dp=n, ffn_ep=n)),
            *v4_tp, ("dp-ep", "tiny-deepseek-v4", dict(attention_dp=n, ffn_ep=n))]


def builder(kind: str, device: str) -> EngineBuilder:
    return EngineBuilder(kind).dtype("float32").device(device)


def layout_builder(mode: str, kind: str, device: str) -> EngineBuilder:
    """The engine a layout checks (the reference is `builder`: plain decoding)."""
    b = builder(kind, device)
    return b.speculative("mtp", num_tokens=2) if mode == "dp-ep-mtp" else b


def reference(kind: str, device: str) -> list[list[list[int]]]:
    engine = builder(kind, device).build()
    try:
        return [[o.token_ids for o in engine.generate(ps, sp)] for ps, sp in batches()]
    finally:
        engine.close()


def run_engine(engine) -> list[list[list[int]]]:
    return [[o.token_ids for o in engine.generate(ps, sp)] for ps, sp in batches()]


def report(results: list[dict], name: str, ok: bool | None, seconds: float, detail: str = "") -> None:
    status = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
    print(f"{status} {name} ({seconds:.1f} s){': ' + detail if detail else ''}", flush=True)
    results.append({"check": name, "status": status, "seconds": round(seconds, 2), "detail": detail})


def compare(ref, got) -> tuple[bool, str]:
    for b, (rb, gb) in enumerate(zip(ref, got)):
        for i, (r, g) in enumerate(zip(rb, gb)):
            if r != g:
                return False, f"batch {b} prompt {i}: expected {r} got {g}"
    return True, ""


# ---------------------------------------------------------------------- world size 1
def one_rank_check(kind: str, mode: str, device: str) -> list[list[list[int]]]:
    """Inside a 1-rank world: TP or EP layers given the world as their (one-rank) group."""
    from dlengine.assemble import build_core
    from dlengine.engine.engine import Engine
    from dlengine.parallel.state import ParallelState, set_parallel_state

    world = dist.group.WORLD
    state = ParallelState(world_group=world, tp_group=world if mode == "tp" else None,
                          ep_group=world if mode.startswith("dp-ep") else None)
    set_parallel_state(state)
    cfg = layout_builder(mode, kind, device).config()
    engine = Engine(cfg, build_core(cfg, state), None)
    outs = []
    for ps, sp in batches():
        outs.append([o.token_ids for o in engine.generate(ps, sp)])
    # every MoE layer must really have gone through the collective path
    from dlengine.models.layers.parallel_moe import moe_layers

    assert all(m.mode == ("tp" if mode == "tp" else "ep") for m in moe_layers(engine.model))
    engine.close()
    return outs


def main_single_world(args, results) -> None:
    from dlengine.parallel import launch

    backend = "nccl" if args.device == "cuda" else "gloo"
    device = "cuda:0" if args.device == "cuda" else "cpu"
    for mode, kind, _ in layouts(1):
        t0 = time.time()
        try:
            ref = reference(kind, device)
            [got] = launch(one_rank_check, 1, kind, mode, device, backend=backend, timeout=600)
            ok, detail = compare(ref, got)
        except Exception:
            ok, detail = False, traceback.format_exc()
        report(results, f"1-rank {backend} {mode} {kind}", ok, time.time() - t0, detail)


# ---------------------------------------------------------------------- spawned workers
def main_spawned(args, results) -> None:
    device = args.device
    for mode, kind, par in layouts(args.world_size):
        name = f"{mode} {kind} {par}"
        t0 = time.time()
        try:
            ref = reference(kind, "cuda:0" if device == "cuda" else "cpu")
            engine = layout_builder(mode, kind, device).parallel(**par).build()
        except ConfigError as e:
            report(results, name, None, time.time() - t0, str(e))
            continue
        except Exception:
            report(results, name, False, time.time() - t0, traceback.format_exc())
            continue
        try:
            procs = engine.processes
            ok, detail = compare(ref, run_engine(engine))
            stats = engine.stats()
            detail += f" idle steps per rank {[s['idle_steps'] for s in stats]}"
            if mode == "dp-ep-mtp":
                detail += (f", accepted/drafted per rank "
                           f"{[(s['num_accepted_tokens'], s['num_draft_tokens']) for s in stats]}")
        except Exception:
            ok, detail = False, traceback.format_exc()
        finally:
            engine.close()
        if any(p.exitcode != 0 for p in procs):
            ok, detail = False, f"workers exited with {[p.exitcode for p in procs]}"
        report(results, name, ok, time.time() - t0, detail)


# ---------------------------------------------------------------------- torchrun
def main_torchrun(args, results) -> None:
    from dlengine.parallel.state import destroy_distributed, init_distributed

    # initialised here, not by build(): the world outlives each engine (close() keeps it)
    rank, world, local_rank = init_distributed("nccl" if args.device == "cuda" else "gloo")
    device = f"cuda:{local_rank}" if args.device == "cuda" else "cpu"
    for mode, kind, par in layouts(world):
        if args.only and kind not in args.only:
            continue
        name = f"torchrun {mode} {kind} {par}"
        t0 = time.time()
        ref = reference(kind, device)
        try:
            engine = layout_builder(mode, kind, args.device).parallel(**par).build()
        except ConfigError as e:
            if rank == 0:
                report(results, name, None, time.time() - t0, str(e))
            continue
        got = run_engine(engine)  # collective: every rank calls it, rank 0's batches run
        engine.close()
        ok, detail = compare(ref, got)
        flags = [None] * world
        dist.all_gather_object(flags, ok)
        if rank == 0:
            report(results, name, all(flags), time.time() - t0, detail)
    destroy_distributed()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=None, help="ranks to spawn (default: visible GPUs)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="*", help="tiny model kinds to check (default: all)")
    ap.add_argument("--json", help="write the summary here")
    args = ap.parse_args()
    results: list[dict] = []
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_torchrun:
        main_torchrun(args, results)
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        if args.world_size is None:
            args.world_size = torch.cuda.device_count() if args.device == "cuda" else 2
        if args.world_size == 1:
            main_single_world(args, results)
        else:
            if args.only:
                global layouts
                full = layouts
                layouts = lambda n: [x for x in full(n) if x[1] in args.only]  # noqa: E731
            main_spawned(args, results)
    failed = [r for r in results if r["status"] == "FAIL"]
    summary = {"device": args.device, "checks": results, "passed": not failed}
    print(json.dumps(summary, indent=1))
    gc.write_json(args.json, summary, announce=False)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
