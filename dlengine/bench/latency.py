"""Latency of one fixed batch: prefill time, per-token decode time, end to end, MBU and MFU.

    from dlengine.bench import run_latency
    result = run_latency(batch_size=1, input_len=512, output_len=256)
    print(result["prefill_ms"], result["decode_ms_per_token"], result["decode_mbu"])

Each iteration adds `batch_size` random prompts of exactly `input_len` tokens at once (greedy,
ignore_eos, `output_len` tokens each) and steps the engine until all have finished. The clock of
an iteration starts just before the first `add_request`:

- prefill phase: steps until every request has its first token (with chunked prefill a long
  batch takes several steps, and requests already past their prefill may decode meanwhile);
- decode phase: every step after that, each timed on the host around `engine.step()` (which
  waits for the tokens it returns). With async scheduling `step()` returns the previous step's
  tokens, so each call still spans one step's time between tokens in the steady state.

Every iteration draws fresh prompts, so the prefix cache never serves one iteration from another.
`num_warmup_iters` identical iterations run first, off the record.

With `synthetic_context=True` (`--synthetic-context`) the prompts are not computed: the engine is
built with a SyntheticContextConnector (bench/synthetic_context.py), which counts every prompt as
computed and gives each request a first token, so the first step only allocates the blocks (no
forward pass) and every step after it is a decode step at context `input_len` and up. Prefill
time and MFU are then not measured (None); the decode numbers are measured as usual, on KV that
is not the prompt's (the tokens are meaningless, the cost is real).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlengine.bench.common import (
    PARALLEL_ROOFLINE_NOTE,
    BenchError,
    EngineArgs,
    build_engine,
    coerce_config,
    describe_engine,
    drain,
    engine_builder,
    engine_stats,
    free_device_memory,
    is_parallel,
    probe_device,
    settle,
    wants_peaks,
    write_json,
)
from dlengine.bench.cpu_threads import cpu_threads, describe_cpu_threads
from dlengine.bench.datasets import random_requests
from dlengine.bench.metrics import summarize
from dlengine.bench.peaks import resolve_peaks
from dlengine.bench.roofline import ModelCost
from dlengine.bench.synthetic_context import SyntheticContextConnector
from dlengine.bench.throughput import _counters, _sample_vocab, _special_ids, _speculation
from dlengine.engine.engine import Engine
from dlengine.sampling_params import SamplingParams


@dataclass
class LatencyConfig(EngineArgs):
    batch_size: int = 1
    input_len: int = 512  # prompt tokens of every request
    output_len: int = 256  # tokens generated per request (ignore_eos, greedy)
    num_iters: int = 3
    num_warmup_iters: int = 1
    peak_bandwidth_gbps: float | None = None  # None: measure (dlengine.bench.peaks)
    peak_tflops: float | None = None  # None: measure
    progress: bool = True
    json_path: str | None = None  # also write the result here
    # decode only: prompts count as computed without running them (bench/synthetic_context.py)
    synthetic_context: bool = False

    def validate(self) -> None:
        for name in ("batch_size", "input_len", "output_len", "num_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BenchError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.num_warmup_iters, int) or self.num_warmup_iters < 0:
            raise BenchError(f"num_warmup_iters must be >= 0, got {self.num_warmup_iters!r}")
        for name in ("peak_bandwidth_gbps", "peak_tflops"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise BenchError(f"{name} must be a positive number, got {v!r}")
        if self.synthetic_context and self.output_len < 2:
            raise BenchError(f"synthetic_context measures decode steps: output_len must be at least 2 (the first "
                             f"token is given, not generated), got {self.output_len}")


def run_latency(config: Any = None, *, engine: Engine | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the latency benchmark and return its result as a JSON-ready dict.

    `config` is a LatencyConfig, an argparse.Namespace from `dlengine bench latency`, a dict of
    LatencyConfig fields, or None (defaults); keyword `overrides` win over it. Pass a built
    `engine` to benchmark it as is (its engine options in `config` are then ignored; it must be
    idle). Writes the result to `config.json_path` when set.
    """
    cfg = coerce_config(LatencyConfig, config, **overrides)
    cfg.validate()
    if cfg.synthetic_context and engine is None:
        # a synthetic prompt's blocks must never serve a prefix-cache hit (and publishing 2M
        # tokens' worth of block hashes would land in the first timed decode step)
        cfg = dataclasses.replace(cfg, prefix_caching=False)
    device = engine.config.device if engine is not None else probe_device(cfg)
    with cpu_threads(device, cfg.threads) as threads:
        if threads is not None and cfg.progress:
            print(f"CPU threads: {describe_cpu_threads(threads)}", file=sys.stderr)
        if engine is not None:
            settle(engine)
            peaks = (resolve_peaks(engine.config.device, cfg.peak_bandwidth_gbps, cfg.peak_tflops)
                     if not is_parallel(engine) else None)
            result = _run(cfg, engine, peaks)
        else:
            device = probe_device(cfg)  # measure the peaks before the engine takes the memory
            peaks = (resolve_peaks(device, cfg.peak_bandwidth_gbps, cfg.peak_tflops)
                     if device is not None and wants_peaks(cfg) else None)
            engine = _build_engine(cfg)
            device = engine.config.device
            try:
                if peaks is None and wants_peaks(cfg):
                    peaks = resolve_peaks(device, cfg.peak_bandwidth_gbps, cfg.peak_tflops)
                result = _run(cfg, engine, peaks)
            finally:  # the engine is ours: free its device memory (KV cache, graphs, weights) for what runs next
                engine.close()
                del engine
                free_device_memory(device)
    if threads is not None:
        result["cpu_threads"] = threads
    if cfg.json_path:
        write_json(result, cfg.json_path)
    return result


def _build_engine(cfg: LatencyConfig) -> Engine:
    if not cfg.synthetic_context:
        return build_engine(cfg)
    return engine_builder(cfg).kv_connector(SyntheticContextConnector).build()


def _check_mode(cfg: LatencyConfig, engine: Engine) -> None:
    """A synthetic context needs an engine built with the connector, and nothing else may give it
    prompts that were not computed here."""
    if cfg.synthetic_context and is_parallel(engine):
        raise BenchError("synthetic_context (--synthetic-context) is not supported on a parallel engine "
                         "(--tp / --attention-dp > 1) yet")
    synthetic = isinstance(getattr(engine, "connector", None), SyntheticContextConnector)
    if cfg.synthetic_context and engine.config.role != "hybrid":
        raise BenchError(f"synthetic_context runs decode on a hybrid engine; this engine's role is "
                         f"{engine.config.role!r}")
    if cfg.synthetic_context and not synthetic:
        raise BenchError("synthetic_context needs an engine built with "
                         ".kv_connector(dlengine.bench.synthetic_context.SyntheticContextConnector), or let "
                         "run_latency build the engine")
    if synthetic and not cfg.synthetic_context:
        raise BenchError("this engine skips every prompt (SyntheticContextConnector): prefill cannot be measured "
                         "on it; pass synthetic_context=True")


def _check_fits(cfg: LatencyConfig, engine: Engine) -> None:
    c = engine.config
    if cfg.input_len + cfg.output_len > c.max_model_len:
        raise BenchError(f"{cfg.input_len} prompt + {cfg.output_len} output tokens exceed max_model_len="
                         f"{c.max_model_len}; shorten --input-len/--output-len or raise --max-model-len")
    if cfg.batch_size > c.scheduler.max_num_seqs:
        raise BenchError(f"batch_size={cfg.batch_size} exceeds the engine's max_num_seqs={c.scheduler.max_num_seqs}; "
                         "raise --max-num-seqs")
    bs, num_blocks = _kv_pool(engine)
    need = cfg.batch_size * math.ceil((cfg.input_len + cfg.output_len) / bs)
    if need > num_blocks:
        raise BenchError(f"the batch needs {need} KV blocks of {bs} tokens but the cache has "
                         f"{num_blocks}; lower --batch-size or the lengths, or give the cache "
                         "more (--num-blocks, --memory-utilization)")


def _kv_pool(engine: Engine) -> tuple[int, int]:
    """(block size, blocks) of the engine's KV cache; a parallel engine's, of one rank (the ranks
    of a DP group hold the same blocks; each DP replica has its own pool: one is the bound)."""
    if is_parallel(engine):
        d = engine.describe()
        return d["block_size"], d["num_kv_blocks"]
    return engine.kv_cache.block_size, engine.block_manager.num_blocks


def _sync(engine: Engine) -> None:
    dev = engine.config.device
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def _one_iteration(cfg: LatencyConfig, engine: Engine, it: int, vocab: int, exclude: set[int]) -> dict[str, Any]:
    # fresh prompts every iteration, and on every call on the same engine (its step count differs),
    # so the prefix cache never turns a prefill into a cache hit
    s = engine_stats(engine)
    seed = cfg.seed + 1009 * (it + 1) + 7919 * s.num_steps
    prompts = random_requests(cfg.batch_size, cfg.input_len, cfg.output_len, vocab, exclude_ids=exclude, seed=seed)
    params = SamplingParams(max_tokens=cfg.output_len, temperature=0.0, ignore_eos=True)
    before = (len(s.steps), s.num_cached_tokens, s.num_preemptions)
    ids = [f"latency-{it}-{i}" for i in range(cfg.batch_size)]
    waiting_first, pending = set(ids), set(ids)
    n_prefill_phase_tokens = n_decode_tokens = 0
    step_times: list[float] = []
    step_batch: list[int] = []  # requests still generating when each decode step was called
    _sync(engine)
    try:
        t0 = time.perf_counter()
        for rid, r in zip(ids, prompts):
            engine.add_request(r.prompt, params, request_id=rid)
        if cfg.synthetic_context:
            _admit_synthetic(engine)  # every request starts with its first token: no prefill phase
            waiting_first.clear()
        while waiting_first:
            if not engine.has_unfinished_requests():
                raise BenchError("the engine went idle before every request had its first token")
            for out in engine.step():
                if out.request_id not in pending:
                    continue
                n_prefill_phase_tokens += len(out.new_token_ids)
                if out.new_token_ids:
                    waiting_first.discard(out.request_id)
                if out.finished:
                    pending.discard(out.request_id)
        t_first = time.perf_counter()
        # synthetic context on an async engine: the first decode call only launches the first
        # decode step (it returns no tokens yet) and measures no time between two tokens
        timing = not cfg.synthetic_context or not engine.async_scheduling
        while pending:
            if not engine.has_unfinished_requests():
                raise BenchError(f"the engine went idle with {len(pending)} requests unfinished")
            batch = len(pending)
            ts = time.perf_counter()
            outs = engine.step()
            te = time.perf_counter()
            gained = 0
            for out in outs:
                if out.request_id not in pending:
                    continue
                gained += len(out.new_token_ids)
                if out.finished:
                    pending.discard(out.request_id)
            n_decode_tokens += gained
            if not timing and not gained:
                t_first = te
                continue
            timing = True
            step_batch.append(batch)
            step_times.append(te - ts)
        t_end = time.perf_counter()
    finally:
        for rid in pending:  # an error or Ctrl-C mid-run: leave the engine clean
            engine.abort(rid)
        try:  # off the clock: apply a step still in flight (async scheduling), hand out aborted outputs
            drain(engine)
        except Exception:
            if not pending:
                raise
    s = engine_stats(engine)  # a parallel engine's is a snapshot: read it again
    steps = s.steps[before[0]:]
    return {
        "prefill_s": t_first - t0,
        "decode_s": t_end - t_first,
        "e2e_s": t_end - t0,
        "decode_step_s": step_times,
        "decode_step_batch": step_batch,
        "num_prefill_steps": sum(1 for st in steps if st.num_prefill_tokens > 0),  # forward passes with prompt
        "num_decode_steps": len(step_times),  # step() calls after every request had its first token
        "prefill_phase_tokens": n_prefill_phase_tokens,
        "decode_tokens": n_decode_tokens,
        "engine_steps": len(steps),
        "prefix_cache_hit_tokens": s.num_cached_tokens - before[1],
        "preemptions": s.num_preemptions - before[2],
    }


def _admit_synthetic(engine: Engine, max_steps: int = 8) -> None:
    """Step until the synthetic-context connector has blocks for every request added (the first
    step's admission allocates them; it runs no forward pass, as nothing is ready to run yet)."""
    connector = engine.connector
    for _ in range(max_steps):
        if not connector.num_waiting_for_blocks:
            return
        if any(out.new_token_ids for out in engine.step()):
            raise BenchError("a step generated tokens before every synthetic context had its blocks")
    raise BenchError(f"{connector.num_waiting_for_blocks} requests got no KV blocks for their synthetic context in "
                     f"{max_steps} steps; lower --batch-size or the lengths, or give the cache more")


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1e3


def _run(cfg: LatencyConfig, engine: Engine, peaks: dict[str, Any]) -> dict[str, Any]:
    _check_mode(cfg, engine)
    _check_fits(cfg, engine)
    # a parallel engine's shards live in its workers: no roofline estimates (docs/bench.md)
    cost = None if is_parallel(engine) else ModelCost.from_engine(engine)
    vocab, exclude = _sample_vocab(engine), _special_ids(engine)

    from tqdm import tqdm

    total = cfg.num_warmup_iters + cfg.num_iters
    iters = []
    spec_before = None
    with tqdm(total=total, desc="latency", unit="iter", disable=not cfg.progress, dynamic_ncols=True) as bar:
        for it in range(total):
            if it == cfg.num_warmup_iters:
                spec_before = _counters(engine)
            r = _one_iteration(cfg, engine, it, vocab, exclude)
            if it >= cfg.num_warmup_iters:
                iters.append(r)
            bar.update(1)

    B, P, O = cfg.batch_size, cfg.input_len, cfg.output_len
    synthetic = cfg.synthetic_context
    # with a synthetic context the "prefill phase" only allocated blocks: nothing to report
    prefill_s = None if synthetic else float(np.mean([r["prefill_s"] for r in iters]))
    e2e_s = float(np.mean([r["e2e_s"] for r in iters]))
    steps = [t for r in iters for t in r["decode_step_s"]]
    decode_time = sum(r["decode_s"] for r in iters)
    decode_tokens = sum(r["decode_tokens"] for r in iters)
    step_stats = summarize(steps)
    mean_step_s = step_stats["mean"]
    # speculative decoding: a step gives each request 1 + its accepted drafts, so the time per
    # token is the step time over the tokens a request gained per step (1 without speculation)
    spec = _speculation(spec_before, _counters(engine))
    n_steps = sum(r["num_decode_steps"] for r in iters)
    tokens_per_step = decode_tokens / (B * n_steps) if spec and n_steps else 1.0

    # MBU of decode: bytes one decode step of the whole batch reads / the mean time of the steps
    # that ran the whole batch / measured copy bandwidth. (With a chunked prefill the requests that
    # finished their prompt first decode during the prefill phase and finish early, so the last
    # decode steps run fewer requests: cheaper steps that must not be set against B requests' bytes.)
    # A decode step for output token k (k = 2..O) attends to P + k - 1 tokens: mean P + O/2.
    mean_ctx = P + O / 2.0
    step_bytes = cost.decode_step_bytes([mean_ctx] * B) if cost is not None else None
    full = [t for r in iters for t, b in zip(r["decode_step_s"], r["decode_step_batch"]) if b == B]
    if full:
        full_step_s = float(np.mean(full))
        decode_gbps = step_bytes / full_step_s / 1e9 if full_step_s and cost is not None else None
    elif cost is None:
        full_step_s = decode_gbps = None
    else:
        # no step ran all B requests (the chunked prefill outlasted the first requests' outputs):
        # set each step against the bytes of the requests it did run, never against B's
        full_step_s = None
        pairs = [(t, b) for r in iters for t, b in zip(r["decode_step_s"], r["decode_step_batch"]) if b]
        run_bytes = sum(cost.decode_step_bytes([mean_ctx] * b) for _, b in pairs)
        run_s = sum(t for t, _ in pairs)
        decode_gbps = run_bytes / run_s / 1e9 if run_s else None
    # MFU of prefill: FLOPs of the B prompts / mean prefill time / measured GEMM peak.
    prefill_flops = None if synthetic or cost is None else B * cost.prefill_flops(P)
    prefill_tflops = None if prefill_flops is None else prefill_flops / prefill_s / 1e12

    import torch

    import dlengine

    notes = [PARALLEL_ROOFLINE_NOTE] if cost is None else []
    if synthetic:
        notes.append("synthetic context: the prompts were not computed (their KV is zeros or stale cache content), "
                     "so prefill is not measured and the generated tokens are meaningless; decode cost is real")
        if getattr(engine.block_manager, "prefix_caching_active", False):
            notes.append("prefix caching is on: the synthetic blocks were published in the prefix cache (hashing "
                         "them falls in the first decode step); build the engine with cache(prefix_caching=False)")
    forced = engine.config.speculative_forced_acceptance
    if forced is not None:
        notes.append(f"speculative acceptance forced at {forced:g} per draft (benchmark only): the decode numbers "
                     "are those of that acceptance, the generated tokens are not the model's")
    if any(r["prefix_cache_hit_tokens"] for r in iters):
        notes.append("some prompt tokens came from the prefix cache: prefill is faster than a cold one")
    if any(r["preemptions"] for r in iters):
        notes.append("requests were preempted (KV cache too small): numbers include recomputation")
    if any(r["num_prefill_steps"] > 1 for r in iters):
        notes.append("the prefill took several steps (chunked prefill: batch_size * input_len > "
                     "max_num_batched_tokens); some decode tokens fall into the prefill phase, and the "
                     "last decode steps run fewer requests (the MBU uses the full-batch steps only)")
    if not full:
        notes.append(f"no decode step ran all {B} requests (the prefill phase outlasted the first requests' "
                     "outputs): the MBU sets each step against the requests it ran; raise --output-len above the "
                     "number of prefill steps, or time decode alone with --synthetic-context")

    result: dict[str, Any] = {
        "benchmark": "latency",
        **describe_engine(engine),
        "batch_size": B,
        "input_len": P,
        "output_len": O,
        "synthetic_context": synthetic,
        "num_iters": cfg.num_iters,
        "num_warmup_iters": cfg.num_warmup_iters,
        "prefill_ms": _ms(prefill_s),
        "prefill_tokens_per_s": None if synthetic else B * P / prefill_s,
        "decode_ms_per_token": _ms(mean_step_s / tokens_per_step),
        "decode_ms_per_step": _ms(mean_step_s),
        "decode_tokens_per_request_step": tokens_per_step,
        **spec,
        "full_batch_decode_ms_per_token": _ms(full_step_s),  # steps that ran all B requests (MBU's basis)
        "num_full_batch_decode_steps": len(full) // max(1, len(iters)),
        "p50_decode_ms_per_token": _ms(step_stats["p50"]),
        "p90_decode_ms_per_token": _ms(step_stats["p90"]),
        "p99_decode_ms_per_token": _ms(step_stats["p99"]),
        "decode_tokens_per_s": decode_tokens / decode_time if decode_time > 0 and decode_tokens else None,
        "e2e_ms": e2e_s * 1e3,
        "p50_e2e_ms": _ms(float(np.percentile([r["e2e_s"] for r in iters], 50))),
        # a synthetic context's first token is given, not generated
        "output_tokens_per_s": B * (O - 1 if synthetic else O) / e2e_s,
        "num_decode_steps": int(np.mean([r["num_decode_steps"] for r in iters])),
        "num_prefill_steps": int(np.mean([r["num_prefill_steps"] for r in iters])),
        # roofline estimates (docs/bench.md)
        "decode_bytes_per_step": step_bytes,
        "decode_mean_context": mean_ctx,
        "decode_achieved_gbps": decode_gbps,
        "decode_mbu": decode_gbps / peaks["copy_gbps"] if decode_gbps is not None else None,
        "prefill_flops": prefill_flops,
        "prefill_achieved_tflops": prefill_tflops,
        "prefill_mfu": None if prefill_tflops is None else prefill_tflops / peaks["bf16_tflops"],
        "peaks": peaks,
        "model_cost": cost.as_dict() if cost is not None else None,
        "notes": notes,
        "iterations": [
            {
                "prefill_ms": None if synthetic else r["prefill_s"] * 1e3,
                "decode_ms": r["decode_s"] * 1e3,
                "e2e_ms": r["e2e_s"] * 1e3,
                "decode_ms_per_token": _ms(float(np.mean(r["decode_step_s"]))) if r["decode_step_s"] else None,
                "num_prefill_steps": r["num_prefill_steps"],
                "num_decode_steps": r["num_decode_steps"],
                "prefix_cache_hit_tokens": r["prefix_cache_hit_tokens"],
                "preemptions": r["preemptions"],
            }
            for r in iters
        ],
        "versions": {"dlengine": dlengine.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "config": dataclasses.asdict(cfg),
    }
    return result
