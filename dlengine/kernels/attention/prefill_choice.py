"""Which kernel runs GQA prefill / extend rows on the triton backend (`EngineBuilder.prefill_attention`).

  "triton"  our portable kernel (`_extend_kernel`, paged_attention_triton.py): any GPU, the CPU
            interpreter, any page size, FP8 caches; every key gathered through the block table
  "hopper"  prefill_hopper_triton.py: the step's own keys read contiguously by TMA, only the
            cached prefix gathered; sm_90 (or the Triton interpreter, for tests), 16/32-bit caches
  "auto"    "triton" for now. Once the H100 sweep (`scripts/gpu_check_attention.py
            --hopper-configs`) shows the Hopper kernel at or under FlashInfer's time, "auto" is
            meant to pick "hopper" on sm_90 with a 16-bit cache.

Decode rows (query_len 1) always run the split-KV decode kernel, and CUDA-graph verify steps the
portable extend kernel, whatever the choice. An explicit "hopper" that cannot run here is a
ConfigError at build time naming why (another backend, a GPU that is not sm_90, an FP8 cache),
not a silent fallback: a benchmark that asked for it gets it or an error.
"""

from __future__ import annotations

import torch

from dlengine.config import ConfigError
from dlengine.kernels.kv_quant import is_fp8

PREFILL_ATTENTION_KERNELS = ("auto", "triton", "hopper")


def _interpreted() -> bool:
    try:
        from dlengine.kernels.attention import prefill_hopper_triton  # needs triton
    except ImportError:
        return False
    return prefill_hopper_triton.interpret_mode()


def hopper_problem(backend: str, device: torch.device, kv_dtype: torch.dtype) -> str | None:
    """Why the Hopper prefill kernel cannot run for an engine on `backend` (the resolved name)
    on `device` with this KV cache dtype, or None when it can."""
    if backend != "triton":
        return f"runs on the triton attention backend, not {backend!r}"
    if is_fp8(kv_dtype):
        return "reads bf16 / fp16 / fp32 caches; FP8 caches run the portable kernel (use 'triton' or 'auto')"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major != 9:
            return f"needs a Hopper GPU (sm_90), this one is sm_{major}{minor}; use 'triton' or 'auto'"
        return None
    if not _interpreted():
        return f"needs a CUDA device (sm_90), not {device} (or TRITON_INTERPRET=1, for tests)"
    return None


def resolve_prefill_attention(requested: str, backend: str, device: torch.device, kv_dtype: torch.dtype) -> str:
    """The prefill kernel an engine runs: "triton" or "hopper". `backend` is the attention
    backend's resolved name ("custom" for a user's object); `kv_dtype` the KV cache's."""
    if requested not in PREFILL_ATTENTION_KERNELS:
        raise ConfigError(f"unknown prefill_attention kernel {requested!r}; choose one of "
                          f"{list(PREFILL_ATTENTION_KERNELS)}")
    if requested != "hopper":
        return "triton"  # "auto": the portable kernel until the H100 sweep says otherwise (module doc)
    why = hopper_problem(backend, torch.device(device), kv_dtype)
    if why:
        raise ConfigError(f"prefill_attention('hopper'): the Hopper prefill kernel {why}")
    return "hopper"


__all__ = ["PREFILL_ATTENTION_KERNELS", "hopper_problem", "resolve_prefill_attention"]
