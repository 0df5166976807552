#!/usr/bin/env python3
"""Host time of a decode step, without the model: what the engine's Python costs per step and per
request at a fixed decode batch, on any machine (CPU is enough).

    python scripts/profile_host.py                      # batches 64, 128, 256; final-only and cumulative
    python scripts/profile_host.py --batch 256 --output-kind final_only --steps 300

The engine is assembled from its usual parts (config, KV cache, block manager, tokenizer of a
tiny checkpoint) with two stand-ins passed to the constructors, never patched onto built objects:
- the runner's `model` is `NullModel` (no compute: one zero hidden column per row), so the step is
  the runner's real host work (`prepare_inputs`: numpy arrays -> tensors, the sampling settings)
  around an empty forward;
- the sampler (the `EngineBuilder.sampler` seam) is `ScriptedSampler`: ordinary token ids from a
  seeded generator, so no request stops early and the front has text to decode.
Scheduler, runner and core are subclasses here that only time their parent's methods.

Columns, median microseconds per decode step (all requests decoding one token; the medians do
not add up exactly):
  schedule   Scheduler.schedule
  prepare    ModelRunner.prepare_inputs (the eager path's input arrays, what CPU steps run)
  layout     choose_graph + padded_layout of the same step (what a CUDA-graph decode step runs
             instead of prepare_inputs on the GPU; timed beside the step, not part of it)
  execute    ModelRunner.execute: prepare + the empty forward + sampling settings + sampler
  core rest  EngineCore.step minus schedule and execute: applying tokens (_resolve), stop checks,
             core outputs, update_after_step, step records
  front      Engine.step minus EngineCore.step: output processing (detokenising, RequestOutputs)
  total      Engine.step (without the layout column)
  graph path total - prepare + layout: the host's share of a graph decode step (staging copies
             and launches excluded)
  mean total the mean of total: with the occasional slow step (garbage collection, a block
             boundary for many requests at once)
Async scheduling is on by default, as on the GPU (the core resolves step N while N+1 is queued).
"""

from __future__ import annotations

import argparse
import statistics
import time

import gpu_common  # noqa: F401 - puts the repository on sys.path
import torch
from torch import nn

from dlengine import EngineBuilder, SamplingParams
from dlengine.engine.core import EngineCore
from dlengine.engine.cuda_graph import default_batch_ladder
from dlengine.engine.engine import Engine
from dlengine.engine.graph_layout import choose_graph, padded_layout
from dlengine.engine.runner import ModelRunner
from dlengine.engine.sampler import SamplerOutput
from dlengine.engine.scheduler import Scheduler


class NullModel(nn.Module):
    """The runner's model argument: returns one zero column per input row and uses it as logits."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class ScriptedSampler:
    """The sampler seam: ignores the logits, returns token ids in [low, high) from a seeded generator."""

    def __init__(self, low: int, high: int, seed: int = 0) -> None:
        self.low, self.high = low, high
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, tensors) -> SamplerOutput:
        tokens = torch.randint(self.low, self.high, (logits.shape[0],), generator=self.generator)
        return SamplerOutput(tokens, None, None, None)


class Timings:
    def __init__(self) -> None:
        self.step: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.step[key] = self.step.get(key, 0.0) + seconds


class TimedScheduler(Scheduler):
    def __init__(self, *args, timings: Timings, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timings = timings

    def schedule(self):
        t = time.perf_counter()
        out = super().schedule()
        self.timings.add("schedule", time.perf_counter() - t)
        self.timings.step["decode"] = bool(out.scheduled) and all(s.num_new_tokens == 1 for s in out.scheduled)
        self.timings.step["n"] = len(out.scheduled)
        return out


class TimedRunner(ModelRunner):
    def __init__(self, *args, timings: Timings, graph_batch_sizes: list[int], max_model_len: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timings = timings
        self.graph_batch_sizes = graph_batch_sizes
        self.max_model_len = max_model_len

    def prepare_inputs(self, out):
        t = time.perf_counter()
        inputs = super().prepare_inputs(out)
        self.timings.add("prepare", time.perf_counter() - t)
        return inputs

    def execute(self, out):
        # the graph path's layout of this step, timed beside it (its result is not used)
        t = time.perf_counter()
        choice = choose_graph(out.scheduled, (1,), self.graph_batch_sizes)
        if choice is not None:
            padded_layout([s.request for s in out.scheduled], [s.num_spec_tokens for s in out.scheduled], choice,
                          self.block_size, self.max_model_len)
        self.timings.add("layout", time.perf_counter() - t)
        t = time.perf_counter()
        handle = super().execute(out)
        self.timings.add("execute", time.perf_counter() - t)
        return handle


class TimedCore(EngineCore):
    def __init__(self, *args, timings: Timings, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timings = timings

    def step(self):
        t = time.perf_counter()
        outputs = super().step()
        self.timings.add("core", time.perf_counter() - t)
        return outputs


def build(model: str, batch: int, max_model_len: int, async_scheduling: bool, timings: Timings) -> Engine:
    """An engine of `model`'s config, cache and tokenizer whose runner has a NullModel."""
    sampler = ScriptedSampler(10, 500)  # below tiny-qwen3's vocab (512), above its special tokens
    base = (EngineBuilder(model).max_model_len(max_model_len).async_scheduling(async_scheduling)
            .scheduler(max_num_seqs=batch).sampler(sampler).build())
    cfg, core = base.config, base.core
    scheduler = TimedScheduler(cfg.scheduler, core.block_manager, policy=cfg.scheduler.policy,
                               max_model_len=cfg.max_model_len, timings=timings)
    null = NullModel()
    runner = TimedRunner(null, core.kv_cache, core.runner.backend, sampler, cfg.model.vocab_size, cfg.device,
                         timings=timings, graph_batch_sizes=default_batch_ladder(batch), max_model_len=max_model_len)
    timed = TimedCore(cfg, null, core.kv_cache, core.block_manager, scheduler, runner, timings=timings)
    return Engine(cfg, timed, base.tokenizer)


def measure(args, batch: int, output_kind: str) -> dict[str, float]:
    timings = Timings()
    engine = build(args.model, batch, args.max_model_len, not args.sync, timings)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_len, args.max_len + 1, (batch,), generator=g).tolist()
    # every request outlives the measured steps, so the batch stays at `batch` throughout
    max_tokens = args.warmup + args.steps + 2
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for n in lens:
        engine.add_request(torch.randint(10, 500, (n,), generator=g).tolist(), params, output_kind=output_kind)
    rows: list[dict[str, float]] = []
    decode_steps = 0
    while decode_steps < args.warmup + args.steps:
        timings.step = {}
        t = time.perf_counter()
        engine.step()
        total = time.perf_counter() - t
        s = timings.step
        if not s.get("decode") or s["n"] != batch:
            continue
        decode_steps += 1
        if decode_steps <= args.warmup:
            continue
        # the layout is timed inside EngineCore.step but is not part of this (eager) step
        core = s["core"] - s["layout"]
        total -= s["layout"]
        rows.append({
            "schedule": s["schedule"], "prepare": s["prepare"], "layout": s["layout"], "execute": s["execute"],
            "core rest": core - s["schedule"] - s["execute"], "front": total - core, "total": total,
            "graph path": total - s["prepare"] + s["layout"],
        })
    result = {k: statistics.median(r[k] for r in rows) * 1e6 for k in rows[0]}
    result["mean total"] = statistics.mean(r["total"] for r in rows) * 1e6  # with the occasional slow step
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-qwen3", help="config, cache and tokenizer come from it; "
                    "its weights are never run")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--output-kind", nargs="+", default=["final_only", "cumulative"],
                    choices=["final_only", "cumulative"])
    ap.add_argument("--steps", type=int, default=200, help="measured decode steps per row")
    ap.add_argument("--warmup", type=int, default=10, help="decode steps run before measuring")
    ap.add_argument("--min-len", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=120)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--sync", action="store_true", help="synchronous scheduling (default: async, as on GPU)")
    args = ap.parse_args()

    cols = ["schedule", "prepare", "layout", "execute", "core rest", "front", "total", "graph path", "mean total"]
    print(f"median us per decode step (us per request in brackets), {args.steps} steps per row")
    print(f"{'batch':>5} {'output kind':<11} " + " ".join(f"{c:>15}" for c in cols))
    for kind in args.output_kind:
        for batch in args.batch:
            r = measure(args, batch, kind)
            cells = " ".join(f"{f'{r[c]:.0f} ({r[c] / batch:.2f})':>15}" for c in cols)
            print(f"{batch:>5} {kind:<11} {cells}", flush=True)


if __name__ == "__main__":
    main()
