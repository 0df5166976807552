"""What every benchmark shares: engine options, config coercion, engine building, errors.

`EngineArgs` holds the engine choices a benchmark exposes on the command line; a benchmark's
own config (e.g. `ThroughputConfig`) subclasses it and adds its workload fields. Options left at
None keep the engine's own defaults, so the bench measures what `EngineBuilder(model).build()`
gives unless told otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from dlengine.builder import EngineBuilder
from dlengine.config import ConfigError
from dlengine.engine.engine import Engine


class BenchError(ValueError):
    """A benchmark setting or workload that cannot run; the message names the problem."""


@dataclass
class EngineArgs:
    model: str = "tiny-qwen3"  # a preset name or a Hugging Face checkpoint folder
    dtype: str | None = None  # None: the engine default (float32 on CPU, the checkpoint's on GPU)
    device: str | None = None  # None: cuda when available, else cpu
    block_size: int | None = None
    num_blocks: int | None = None
    memory_utilization: float | None = None
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) or "fp8_e4m3" / "fp8" (docs/fp8_kv.md)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    prefix_caching: bool = True
    load_format: str = "auto"
    attention_backend: str = "auto"
    mla_decode: str = "auto"  # MLA decode kernel (EngineBuilder.mla_decode)
    prefill_attention: str = "auto"  # GQA prefill kernel (EngineBuilder.prefill_attention)
    seed: int = 0
    num_layers: int | None = None  # None: the model's; else hf_overrides(num_hidden_layers=...)
    speculative: str | None = None  # "mtp" or "ngram" (EngineBuilder.speculative)
    num_speculative_tokens: int = 3
    # benchmarking only: keep each draft with this probability instead of when it matches
    # (EngineBuilder.speculative(forced_acceptance=...)); outputs are then not the model's
    spec_forced_acceptance: float | None = None
    threads: int | None = None  # torch CPU threads; None: OMP_NUM_THREADS if set, else chosen (bench/cpu_threads.py)
    # EngineBuilder.parallel (docs/parallel.md): world size tp x attention_dp; more than one rank
    # spawns one worker process per rank behind a ParallelEngine front
    tp: int = 1
    attention_dp: int = 1
    ffn_ep: int = 1
    expert_placement: str = "contiguous"  # dlengine.parallel.PLACEMENTS
    dispatch_backend: str = "auto"  # "auto" or one of dlengine.parallel.dispatch_backends()


# the EngineArgs fields that go to EngineBuilder.parallel, under the same names
PARALLEL_OPTIONS = ("tp", "attention_dp", "ffn_ep", "expert_placement", "dispatch_backend")

C = TypeVar("C", bound=EngineArgs)


def coerce_config(cls: type[C], config: Any = None, **overrides: Any) -> C:
    """Make a `cls` from an instance of it, an argparse.Namespace (attributes that are not fields
    are ignored: the CLI's own bookkeeping), a mapping (unknown keys are an error) or None
    (defaults); `overrides` are applied last."""
    names = {f.name for f in dataclasses.fields(cls)}
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, cls):
        values = dataclasses.asdict(config)
    elif isinstance(config, argparse.Namespace):
        values = {k: v for k, v in vars(config).items() if k in names}
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        raise TypeError(f"expected a {cls.__name__}, an argparse.Namespace or a dict, not {type(config).__name__}")
    values.update(overrides)
    unknown = sorted(set(values) - names)
    if unknown:
        raise BenchError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**values)


def build_engine(args: EngineArgs) -> Engine:
    """Build the engine the options describe. Bad options raise dlengine.ConfigError."""
    return engine_builder(args).build()


def engine_builder(args: EngineArgs) -> EngineBuilder:
    """The builder the options describe, for callers that add choices of their own (dlengine
    serve adds the role and the KV transfer engine)."""
    b = (EngineBuilder(args.model).load_format(args.load_format).attention(args.attention_backend)
         .mla_decode(args.mla_decode).prefill_attention(args.prefill_attention).seed(args.seed))
    if args.num_layers is not None:
        b.hf_overrides(num_hidden_layers=args.num_layers)
    if args.dtype is not None:
        b.dtype(args.dtype)
    if args.device is not None:
        b.device(args.device)
    cache: dict[str, Any] = {"prefix_caching": args.prefix_caching}
    if args.kv_cache_dtype != "auto":
        cache["dtype"] = args.kv_cache_dtype
    for name in ("block_size", "num_blocks", "memory_utilization"):
        if getattr(args, name) is not None:
            cache[name] = getattr(args, name)
    b.cache(**cache)
    sched = {n: getattr(args, n) for n in ("max_num_seqs", "max_num_batched_tokens") if getattr(args, n) is not None}
    if sched:
        b.scheduler(**sched)
    if args.max_model_len is not None:
        b.max_model_len(args.max_model_len)
    parallel = {n: getattr(args, n) for n in PARALLEL_OPTIONS}
    if parallel != {n: getattr(EngineArgs, n) for n in PARALLEL_OPTIONS}:
        b.parallel(**parallel)
    if args.speculative is not None:
        b.speculative(args.speculative, num_tokens=args.num_speculative_tokens,
                      forced_acceptance=args.spec_forced_acceptance)
    elif args.spec_forced_acceptance is not None:
        raise ConfigError("spec_forced_acceptance (--spec-forced-acceptance) forces the acceptance of drafts: it "
                          "needs speculative decoding (--speculative mtp | ngram)")
    return b


def probe_device(args: EngineArgs):
    """The torch.device the engine for `args` will run on, or None when that cannot be told
    without building it (an unusable --device: building the engine then reports the error)."""
    import torch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError, ValueError):
        return None
    if device.type == "cpu":
        return device
    if device.type == "cuda" and torch.cuda.is_available():
        if device.index is not None and device.index >= torch.cuda.device_count():
            return None
        return device
    return None


def engine_stats(engine: Engine):
    """The engine's counters (an EngineStats with its step records): a local engine's `stats`,
    or a parallel front's `engine_stats()` (its DP replicas' output ranks, merged)."""
    merged = getattr(engine, "engine_stats", None)
    return merged() if callable(merged) else engine.stats


def is_parallel(engine: Engine) -> bool:
    """More than one rank: the model, cache and scheduler live in worker processes."""
    return engine.config.parallel.world_size > 1


def wants_peaks(args: EngineArgs) -> bool:
    """Whether the benchmark needs the MBU / MFU peaks: not for a parallel engine (no estimates)."""
    return args.tp * args.attention_dp == 1


# why a parallel engine's results carry no roofline estimates (docs/bench.md)
PARALLEL_ROOFLINE_NOTE = ("MBU / MFU not computed for a parallel engine (tp x attention_dp > 1): its ranks' shards "
                          "live in the worker processes; tokens/s and latencies are the whole engine's")


def settle(engine: Engine) -> None:
    """Make an engine idle for a benchmark: raise BenchError when it holds requests of its own;
    otherwise apply a step still in flight (async scheduling computes one step past the last
    token; `step()` hands it back) and hand out pending abort outputs, off the clock."""
    if engine.num_unfinished_requests:
        raise BenchError("the engine has unfinished requests; benchmark an idle engine")
    drain(engine)


def drain(engine: Engine, max_steps: int = 8) -> None:
    """Step an engine whose requests have all finished (or been aborted) until it is idle: with
    async scheduling the last step is still in flight when the last request finishes."""
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return
        engine.step()


def free_device_memory(device) -> None:
    """After the last reference to an engine is dropped: collect it and hand its device memory
    back, so the next engine built in this process can size its KV cache from free memory (the
    caching allocator would otherwise keep the old cache reserved)."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def describe_engine(engine: Engine) -> dict[str, Any]:
    """The engine facts a benchmark result should carry. `spec_forced_acceptance` is the
    probability each draft was kept with when acceptance was forced for benchmarking (the
    acceptance numbers and tokens are then not the model's), else None."""
    p = engine.config.parallel
    return {"engine": repr(engine), **engine.describe(),
            "spec_forced_acceptance": getattr(engine.config, "speculative_forced_acceptance", None),
            "parallel": {"tp": p.tp, "attention_dp": p.attention_dp, "ffn_ep": p.ffn_ep,
                         "world_size": p.world_size}}


def write_json(result: Mapping[str, Any], path: str | os.PathLike) -> None:
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, allow_nan=False)
        f.write("\n")
