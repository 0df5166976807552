"""Offline throughput: queue a whole workload at once, step the engine until it drains.

    from dlengine.bench import run_throughput
    result = run_throughput(num_prompts=16, input_len=64, output_len=32)
    print(result["output_tokens_per_s"], result["p99_ttft_ms"])

Every request arrives at the start (like vLLM's `benchmark_throughput`), so TTFT includes the
time a request waits for a batch slot. The clock starts before the first `add_request` (text
prompts are tokenised on the clock, as in `Engine.generate`) and stops when the last request
finishes. An optional warm-up runs a few short requests first, off the clock.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from collections import Counter
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
    engine_stats,
    free_device_memory,
    is_parallel,
    probe_device,
    settle,
    wants_peaks,
    write_json,
)
from dlengine.bench.cpu_threads import cpu_threads, describe_cpu_threads
from dlengine.bench.datasets import BenchRequest, load_jsonl_requests, random_requests
from dlengine.bench.metrics import latency_summary, request_timing
from dlengine.bench.peaks import resolve_peaks
from dlengine.bench.roofline import ModelCost
from dlengine.engine.engine import Engine
from dlengine.sampling_params import InvalidRequestError, SamplingParams

DATASETS = ("random", "jsonl")


@dataclass
class ThroughputConfig(EngineArgs):
    num_prompts: int = 64
    input_len: int = 128  # random dataset: prompt tokens (before range_ratio)
    output_len: int = 64  # tokens to generate (jsonl: when a line gives no output_len)
    range_ratio: float = 0.0  # lengths uniform in [len*(1-r), len*(1+r)]
    prefix_len: int = 0  # random dataset: tokens of a prefix shared by every prompt
    dataset: str = "random"
    dataset_path: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True  # generate exactly output_len tokens
    num_warmup: int = 1  # short requests run before the clock starts
    progress: bool = True
    json_path: str | None = None  # also write the result here
    peak_bandwidth_gbps: float | None = None  # MBU denominator; None: measure (dlengine.bench.peaks)
    peak_tflops: float | None = None  # MFU denominator; None: measure
    compare: str | None = None  # "transformers": run the workload through it too, report the ratio
    compare_num_prompts: int | None = None  # requests the comparison runs (None: min(num_prompts, 64))
    compare_attn_implementation: str | None = None  # None: "paged|sdpa" then "sdpa" on CUDA, "eager" on CPU

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise BenchError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}")
        if self.dataset == "jsonl" and not self.dataset_path:
            raise BenchError("dataset 'jsonl' needs a dataset_path (--dataset-path FILE.jsonl)")
        if self.dataset == "random" and self.dataset_path:
            raise BenchError("dataset_path is only read with dataset 'jsonl' (--dataset jsonl)")
        for name in ("num_prompts", "input_len", "output_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise BenchError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise BenchError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.prefix_len < 0:
            raise BenchError(f"prefix_len must be >= 0, got {self.prefix_len}")
        if self.num_warmup < 0:
            raise BenchError(f"num_warmup must be >= 0, got {self.num_warmup}")
        if self.temperature < 0:
            raise BenchError(f"temperature must be >= 0, got {self.temperature}")
        for name in ("peak_bandwidth_gbps", "peak_tflops"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise BenchError(f"{name} must be a positive number, got {v!r}")
        from dlengine.bench.compare import COMPARE_FRAMEWORKS

        if self.compare is not None and self.compare not in COMPARE_FRAMEWORKS:
            raise BenchError(f"unknown compare framework {self.compare!r}; choose one of {COMPARE_FRAMEWORKS}")
        if self.compare_num_prompts is not None and (not isinstance(self.compare_num_prompts, int)
                                                     or self.compare_num_prompts < 1):
            raise BenchError(f"compare_num_prompts must be a positive integer, got {self.compare_num_prompts!r}")


def _special_ids(engine: Engine) -> set[int]:
    m = engine.config.model
    ids = set(m.eos_token_ids) | {t for t in (m.pad_token_id, m.bos_token_id) if t is not None}
    tok = engine.tokenizer
    if tok is not None:
        ids |= set(getattr(tok, "all_special_ids", []) or [])
    return ids


def _sample_vocab(engine: Engine) -> int:
    """Sample prompt ids below both the model's and the tokenizer's vocabulary size (checkpoints
    often pad the embedding past the last real token)."""
    vocab = engine.config.model.vocab_size
    if engine.tokenizer is not None:
        vocab = min(vocab, len(engine.tokenizer))
    return vocab


def make_workload(cfg: ThroughputConfig, engine: Engine) -> list[BenchRequest]:
    if cfg.dataset == "jsonl":
        reqs = load_jsonl_requests(cfg.dataset_path, cfg.num_prompts, cfg.output_len)
        if len(reqs) < cfg.num_prompts and cfg.progress:
            import sys

            print(f"note: {cfg.dataset_path} holds {len(reqs)} requests (< num_prompts={cfg.num_prompts}); "
                  "running all of them", file=sys.stderr)
        return reqs
    return random_requests(
        cfg.num_prompts, cfg.input_len, cfg.output_len, _sample_vocab(engine),
        range_ratio=cfg.range_ratio, prefix_len=cfg.prefix_len, exclude_ids=_special_ids(engine), seed=cfg.seed,
    )


def _params(cfg: ThroughputConfig, output_len: int) -> SamplingParams:
    return SamplingParams(max_tokens=output_len, temperature=cfg.temperature, ignore_eos=cfg.ignore_eos)


def _check_fits(engine: Engine, cfg: ThroughputConfig, workload: list[BenchRequest]) -> list[int]:
    """Validate every request before anything runs; returns the prompt lengths in tokens."""
    max_len = engine.config.max_model_len
    lens = []
    for i, r in enumerate(workload):
        try:
            req = engine.make_request(r.prompt, _params(cfg, r.output_len))
        except InvalidRequestError as e:
            raise BenchError(f"request {i}: {e}") from None
        n = req.num_prompt_tokens
        if n + r.output_len > max_len:
            raise BenchError(
                f"request {i}: {n} prompt + {r.output_len} output tokens exceed max_model_len={max_len}; "
                "shorten --input-len/--output-len (and --range-ratio, --prefix-len) or raise --max-model-len"
            )
        lens.append(n)
    return lens


def _warmup(engine: Engine, cfg: ThroughputConfig) -> None:
    if cfg.num_warmup <= 0:
        return
    n_in = max(1, min(cfg.input_len, engine.config.max_model_len - 2))
    prompts = random_requests(cfg.num_warmup, n_in, 2, _sample_vocab(engine),
                              exclude_ids=_special_ids(engine), seed=cfg.seed + 7919)
    engine.generate([r.prompt for r in prompts], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))


def _counters(engine: Engine) -> dict[str, int]:
    s = engine_stats(engine)
    return {
        "steps": len(s.steps),
        "preemptions": s.num_preemptions,
        "cached": s.num_cached_tokens,
        "prompt_computed": s.num_prompt_tokens_computed,
        "computed": s.num_computed_tokens,
        "drafts": s.num_draft_tokens,
        "accepted": s.num_accepted_tokens,
        "verifications": s.num_spec_verifications,
    }


def _speculation(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Speculative decoding in the run: acceptance rate and tokens gained per verified step."""
    drafts = after["drafts"] - before["drafts"]
    if not drafts:
        return {}
    accepted = after["accepted"] - before["accepted"]
    verifications = after["verifications"] - before["verifications"]
    return {"spec_draft_tokens": drafts, "spec_accepted_tokens": accepted,
            "spec_acceptance_rate": accepted / drafts,
            "spec_mean_accepted_length": (accepted + verifications) / max(1, verifications)}


def run_throughput(config: Any = None, *, engine: Engine | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the offline throughput benchmark and return its result as a JSON-ready dict.

    `config` is a ThroughputConfig, an argparse.Namespace from `dlengine bench throughput`, a dict
    of ThroughputConfig fields, or None (defaults); keyword `overrides` win over it. Pass a built
    `engine` to benchmark it as is (its engine options in `config` are then ignored; it must be
    idle). With `compare="transformers"` the same prompts then run through transformers'
    continuous batching (after our engine is freed, when we built it) and `result["compare"]`
    holds its numbers. Writes the result to `config.json_path` when set.
    """
    cfg = coerce_config(ThroughputConfig, config, **overrides)
    cfg.validate()
    device = engine.config.device if engine is not None else probe_device(cfg)
    with cpu_threads(device, cfg.threads) as threads:
        if threads is not None and cfg.progress:
            print(f"CPU threads: {describe_cpu_threads(threads)}", file=sys.stderr)
        if engine is not None:
            settle(engine)
            peaks = (resolve_peaks(engine.config.device, cfg.peak_bandwidth_gbps, cfg.peak_tflops)
                     if not is_parallel(engine) else None)
            result, compare_inputs = _run(cfg, engine, peaks)
            model_path = engine.config.model.path
            pad = engine.config.model.pad_token_id
        else:
            device = probe_device(cfg)  # measure the peaks before the engine takes the memory
            peaks = (resolve_peaks(device, cfg.peak_bandwidth_gbps, cfg.peak_tflops)
                     if device is not None and wants_peaks(cfg) else None)
            engine = build_engine(cfg)
            device = engine.config.device
            model_path = engine.config.model.path
            pad = engine.config.model.pad_token_id
            try:
                if peaks is None and wants_peaks(cfg):
                    peaks = resolve_peaks(device, cfg.peak_bandwidth_gbps, cfg.peak_tflops)
                result, compare_inputs = _run(cfg, engine, peaks)
            finally:  # the engine is ours: free its device memory (KV cache, graphs, weights) for what runs next
                engine.close()
                del engine
                free_device_memory(device)
        if cfg.compare:
            result["compare"] = _compare(cfg, result, compare_inputs, model_path, pad)
    if threads is not None:
        result["cpu_threads"] = threads
    if cfg.json_path:
        write_json(result, cfg.json_path)
    return result


def _compare(cfg: ThroughputConfig, result: dict[str, Any], inputs: list[tuple[list[int], int]], model_path: str,
             pad_token_id: int | None) -> dict[str, Any]:
    """The first compare_num_prompts requests through transformers, for as many tokens as their
    mean output length; the ratio is our output tokens/s (whole workload) over theirs."""
    from dlengine.bench.compare import compare_transformers

    n = cfg.compare_num_prompts or min(len(inputs), 64)
    subset = inputs[:n]
    max_new = max(1, round(sum(o for _, o in subset) / len(subset)))
    res = compare_transformers(
        model_path, [p for p, _ in subset], max_new, dtype=result["dtype"], device=result["device"],
        load_format=cfg.load_format, attn_implementation=cfg.compare_attn_implementation,
        temperature=cfg.temperature, pad_token_id=pad_token_id if pad_token_id is not None else 0,
    )
    ours = result["output_tokens_per_s"]
    res["ours_output_tokens_per_s"] = ours
    theirs, theirs_wall = res.get("output_tokens_per_s"), res.get("output_tokens_per_s_wall")
    res["ratio"] = ours / theirs if theirs else None
    res["ratio_wall"] = ours / theirs_wall if theirs_wall else None
    return res


def _run(cfg: ThroughputConfig, engine: Engine, peaks: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """The measured run; returns the result and [(prompt token ids, output_len)] per request."""
    workload = make_workload(cfg, engine)
    _check_fits(engine, cfg, workload)
    _warmup(engine, cfg)
    drain(engine)

    from tqdm import tqdm

    before = _counters(engine)
    ids = [f"bench-{i}" for i in range(len(workload))]
    finals: dict[str, Any] = {}
    pending: set[str] = set()
    out_tokens = 0
    bar = tqdm(total=len(workload), desc="throughput", unit="req", disable=not cfg.progress, dynamic_ncols=True)
    try:
        t0 = time.perf_counter()
        for rid, r in zip(ids, workload):
            engine.add_request(r.prompt, _params(cfg, r.output_len), request_id=rid, output_kind="final_only")
            pending.add(rid)
        while pending:
            if not engine.has_unfinished_requests():
                raise BenchError(f"the engine went idle with {len(pending)} benchmark requests unfinished")
            done = 0
            for out in engine.step():
                if out.request_id not in pending:
                    continue
                if out.finished:  # final-only: the one output of a request
                    out_tokens += len(out.token_ids)
                    finals[out.request_id] = out
                    pending.discard(out.request_id)
                    done += 1
            if not bar.disable:
                bar.set_postfix(out_tok=out_tokens, refresh=False)
                bar.update(done)
        elapsed = time.perf_counter() - t0
    finally:
        bar.close()
        for rid in pending:  # an error or Ctrl-C mid-run: leave the engine clean
            engine.abort(rid)
        try:  # apply a step still in flight (async scheduling) and hand out aborted outputs here,
            drain(engine)  # not to the caller's next step()
        except Exception:
            if not pending:
                raise

    after = _counters(engine)
    outputs = [finals[rid] for rid in ids]
    timings = [request_timing(o) for o in outputs]
    steps = engine_stats(engine).steps[before["steps"]:after["steps"]]
    n_in = sum(t.prompt_len for t in timings)
    n_out = sum(t.output_len for t in timings)
    est = ({"notes": [PARALLEL_ROOFLINE_NOTE]} if is_parallel(engine)
           else _estimates(ModelCost.from_engine(engine), timings, steps, elapsed, peaks))

    import torch

    import dlengine

    result: dict[str, Any] = {
        "benchmark": "throughput",
        "dataset": cfg.dataset if cfg.dataset == "random" else f"jsonl:{cfg.dataset_path}",
        **describe_engine(engine),
        "num_requests": len(outputs),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "elapsed_s": elapsed,
        "requests_per_s": len(outputs) / elapsed,
        "input_tokens_per_s": n_in / elapsed,
        "output_tokens_per_s": n_out / elapsed,
        "total_tokens_per_s": (n_in + n_out) / elapsed,
        **latency_summary(timings),
        "num_steps": len(steps),
        "mean_seqs_per_step": float(np.mean([s.num_seqs for s in steps])) if steps else 0.0,
        "max_seqs_per_step": max((s.num_seqs for s in steps), default=0),
        "mean_tokens_per_step": float(np.mean([s.num_tokens for s in steps])) if steps else 0.0,
        "num_preemptions": after["preemptions"] - before["preemptions"],
        "prefix_cache_hit_tokens": after["cached"] - before["cached"],
        "prefix_cache_hit_requests": sum(1 for t in timings if t.num_cached_tokens > 0),
        "num_prompt_tokens_computed": after["prompt_computed"] - before["prompt_computed"],
        "num_tokens_computed": after["computed"] - before["computed"],
        "finish_reasons": dict(Counter(o.finish_reason for o in outputs)),
        **_speculation(before, after),
        **est,
        "versions": {"dlengine": dlengine.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "config": dataclasses.asdict(cfg),
        "requests": [t.as_dict() for t in timings],
    }
    return result, [(list(o.prompt_token_ids), r.output_len) for o, r in zip(outputs, workload)]


def _estimates(cost: ModelCost, timings, steps, elapsed: float, peaks: dict[str, Any]) -> dict[str, Any]:
    """Whole-run MBU and MFU estimates (docs/bench.md): bytes every decode step must read and
    FLOPs every token must cost, over the elapsed time, against the measured (or given) peaks.
    Recomputation after preemption is not counted."""
    decode_steps = sum(1 for s in steps if s.num_decodes > 0)
    kv_bytes = sum(cost.request_decode_kv_bytes(t.prompt_len, t.output_len) for t in timings)
    # MoE models read only the experts a step's tokens route to (ModelCost.weight_bytes_for_tokens)
    read_bytes = sum(cost.weight_bytes_for_tokens(s.num_tokens) for s in steps if s.num_decodes > 0) + kv_bytes
    flops = sum(cost.request_flops(t.prompt_len, t.output_len, t.num_cached_tokens) for t in timings)
    gbps = read_bytes / elapsed / 1e9
    tflops = flops / elapsed / 1e12
    return {
        "num_decode_steps": decode_steps,
        "est_decode_bytes": read_bytes,
        "est_achieved_gbps": gbps,
        "mbu_est": gbps / peaks["copy_gbps"],
        "est_flops": flops,
        "est_achieved_tflops": tflops,
        "mfu_est": tflops / peaks["bf16_tflops"],
        "peaks": peaks,
        "model_cost": cost.as_dict(),
    }
