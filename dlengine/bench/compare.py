"""Run a workload through another framework in this process, for `--compare`.

Only `transformers` so far: its own continuous batching (`model.generate_batch`) on the same
checkpoint, device and dtype, with the same prompt token ids. transformers takes one
`max_new_tokens` for a whole batch, so the caller passes the mean output length; end-of-sequence
is disabled so every request runs to it. Nothing here raises: a failure (transformers missing,
a model it cannot load, an API that changed) comes back as `{"error": "..."}` so the numbers of
our own run survive.

Timing: `elapsed_s` runs from the first request leaving transformers' queue to the last one
finishing (the `lifespan` stamps of its GenerationOutput), so it leaves out the per-call setup
of `generate_batch` (KV cache allocation, CUDA-graph warm-up, thread start and stop) the way our
clock leaves out building the engine; `wall_s` is the whole `generate_batch` call. On CUDA one
small `generate_batch` runs first, off the clock, as our own warm-up does, and transformers
sizes its KV cache from free GPU memory as usual; on CPU its KV cache is sized to the workload
(left alone it would allocate most of the host's memory on every call).
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import time
import traceback
from typing import Any, Sequence

import torch

COMPARE_FRAMEWORKS = ("transformers",)


def default_attn_implementations(device: torch.device) -> list[str]:
    """What to try, in order: "paged|sdpa" (what the issue's baseline ran with on transformers
    5.17) then "sdpa" on CUDA; "eager" on CPU."""
    return ["paged|sdpa", "sdpa"] if device.type == "cuda" else ["eager"]


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load_model(path: str, dtype: torch.dtype, device: torch.device, dummy: bool, impl: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if dummy:  # random weights at the real size: build straight on the device
        config = AutoConfig.from_pretrained(path)
        try:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=impl)
        except (TypeError, ValueError, RuntimeError):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=impl)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": impl}
        if device.type == "cuda" and importlib.util.find_spec("accelerate") is not None:
            kwargs["device_map"] = str(device)  # load straight to the GPU when accelerate allows it
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval()


def _cpu_cb_config(inputs: list[list[int]], max_new_tokens: int):
    """On CPU transformers sizes its KV cache from the host's total memory (tens of GiB zeroed:
    seconds per call); size it to the workload instead. None where the class is missing."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return None
    try:
        page = getattr(ContinuousBatchingConfig(), "page_size", None) or 256
        blocks = sum(-(-(len(p) + max_new_tokens) // page) for p in inputs) + len(inputs)
        return ContinuousBatchingConfig(num_blocks=blocks)
    except Exception:  # noqa: BLE001 - an API that differs: keep its defaults
        return None


def _call_generate_batch(model, inputs: list[list[int]], gen_config, device: torch.device, max_new_tokens: int):
    fn = model.generate_batch
    want: dict[str, Any] = {"generation_config": gen_config, "progress_bar": False}
    if device.type != "cuda":
        want["warmup"] = False  # its warm-up pre-captures CUDA graphs: nothing to do on CPU but slow
        cb = _cpu_cb_config(inputs, max_new_tokens)
        if cb is not None:
            want["continuous_batching_config"] = cb
    try:
        params = inspect.signature(fn).parameters
        takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in want.items() if k in params}
        if "generation_config" not in params and takes_var_kw:
            kwargs["generation_config"] = gen_config
    except (TypeError, ValueError):
        kwargs = {"generation_config": gen_config}
    return fn(inputs=inputs, **kwargs)  # it generates on a thread of its own (no_grad there is its business)


def _generated(out) -> list[int] | None:
    for name in ("generated_tokens", "output_ids", "static_outputs"):
        v = getattr(out, name, None)
        if v is not None:
            return list(v)
    return None


def compare_transformers(
    model_path: str,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    dtype: str | torch.dtype,
    device: str | torch.device,
    load_format: str = "auto",
    attn_implementation: str | None = None,
    temperature: float = 0.0,
    pad_token_id: int | None = 0,
    warmup: bool | None = None,
) -> dict[str, Any]:
    """Run `prompts` (token ids) through transformers' `generate_batch`, each for `max_new_tokens`
    tokens, and time it. Returns a dict with `output_tokens_per_s` (and the details), or with
    `error` set when anything fails. Without `attn_implementation` the defaults of
    `default_attn_implementations` are tried in order until one loads and runs; `failed_attempts`
    lists the ones that did not. `warmup` (default: on CUDA only) runs a small call first."""
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    impls = [attn_implementation] if attn_implementation else default_attn_implementations(device)
    res: dict[str, Any] = {
        "framework": "transformers",
        "num_requests": len(prompts),
        "max_new_tokens": int(max_new_tokens),
        "total_input_tokens": sum(len(p) for p in prompts),
        "expected_output_tokens": len(prompts) * int(max_new_tokens),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "load_format": load_format,
        "error": None,
    }
    failures: list[str] = []
    tb = None
    try:
        import transformers

        res["transformers_version"] = transformers.__version__
    except Exception as e:  # noqa: BLE001
        failures.append(_err(e))
        tb = traceback.format_exc(limit=8)
        impls = []
    for impl in impls:
        attempt = dict(res, attn_implementation=impl)
        try:
            _attempt(attempt, model_path, [list(map(int, p)) for p in prompts], int(max_new_tokens), dtype, device,
                     load_format == "dummy", impl, temperature, pad_token_id, warmup)
            if failures:
                attempt["failed_attempts"] = failures
            return attempt
        except Exception as e:  # noqa: BLE001 - reported, never raised: our own numbers must survive
            failures.append(f"{impl}: {_err(e)}" if len(impls) > 1 else _err(e))
            tb = traceback.format_exc(limit=8)
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    res.update(error="; ".join(failures), failed_attempts=failures, traceback=tb, output_tokens_per_s=None)
    return res


def _attempt(res: dict[str, Any], model_path: str, inputs: list[list[int]], max_new_tokens: int, dtype: torch.dtype,
             device: torch.device, dummy: bool, impl: str, temperature: float, pad_token_id: int | None,
             warmup: bool | None) -> None:
    """Load the model with `impl`, run the workload, fill `res`; raises on any failure."""
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    model = _load_model(model_path, dtype, device, dummy, impl)
    res["load_s"] = time.perf_counter() - t0
    try:
        sample = temperature > 0
        gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample,
                                      "eos_token_id": None, "pad_token_id": pad_token_id}
        if sample:
            gen_kwargs["temperature"] = temperature
        if warmup if warmup is not None else device.type == "cuda":
            warm = GenerationConfig(**{**gen_kwargs, "max_new_tokens": 4})
            _call_generate_batch(model, [p[:64] for p in inputs[:2]], warm, device, 4)
            _sync(device)

        gen_config = GenerationConfig(**gen_kwargs)
        _sync(device)
        t0 = time.perf_counter()
        outs = _call_generate_batch(model, inputs, gen_config, device, max_new_tokens)
        _sync(device)
        wall = time.perf_counter() - t0
        res["attn_implementation_used"] = getattr(model.config, "_attn_implementation", None)
    finally:
        del model

    values = list(outs.values()) if isinstance(outs, dict) else list(outs or [])
    if not values:
        raise RuntimeError("generate_batch returned no results (see the ContinuousBatchingLogger messages above)")
    tokens = [_generated(o) for o in values]
    errors = [str(o.error) for o in values if getattr(o, "error", None)]
    if any(t is None for t in tokens):
        raise RuntimeError(f"cannot find the generated tokens in {type(values[0]).__name__} "
                           f"(fields: {sorted(vars(values[0]))})")
    if len(values) < len(inputs) or errors:
        raise RuntimeError(f"generate_batch returned {len(values)} of {len(inputs)} requests"
                           + (f"; errors: {errors[:3]}" if errors else "")
                           + " (see the ContinuousBatchingLogger messages above)")
    n_out = sum(len(t) for t in tokens)
    if n_out == 0:
        raise RuntimeError("generate_batch generated no tokens")
    res["total_output_tokens"] = n_out
    res["wall_s"] = wall
    res["output_tokens_per_s_wall"] = n_out / wall
    starts = [o.lifespan[0] for o in values if getattr(o, "lifespan", None) and o.lifespan[0] > 0]
    ends = [o.lifespan[1] for o in values if getattr(o, "lifespan", None) and o.lifespan[1] > 0]
    if len(starts) == len(values) == len(ends) and max(ends) > min(starts):
        res["elapsed_s"] = max(ends) - min(starts)
        res["timing"] = "lifespan"
    else:  # no per-request stamps in this version: the whole call
        res["elapsed_s"] = wall
        res["timing"] = "wall"
    res["output_tokens_per_s"] = n_out / res["elapsed_s"]
    short = sum(1 for t in tokens if len(t) < max_new_tokens)
    if short:
        res["note"] = f"{short} of {len(tokens)} requests stopped before max_new_tokens"
