"""Which kernel runs MLA decode steps on the triton attention backend (`EngineBuilder.mla_decode`).

  "gluon"       our Hopper kernel (mla_decode_gluon.py): 70-82% of copy bandwidth at batch >= 32,
                ctx >= 8k (H100, page 64), 0.83-1.05x FlashInfer's time across batch 1-128, no
                host work per step; in the engine the fastest (docs/performance.md)
  "flashinfer"  FlashInfer's BatchMLAPagedAttentionWrapper (mla_flashinfer.py): slightly
                slower at page 64 (faster at page 16), plus a host re-plan every step
  "triton"      our portable Triton kernel (mla_triton.py): any GPU, any dims, fp32 too
  "auto"        on Hopper at DeepSeek's dims, per call: gluon where it applies (cache layout),
                else triton; on other GPUs flashinfer when it imports and applies, else triton

Explicit choices that cannot run with this model / device / dtype are a ConfigError at build
time, naming why. Prefills and extends always run our kernels (mla_triton.py).

An FP8 latent cache (`cache(dtype="fp8_e4m3")`) is read by the Triton kernel only: the Gluon and
FlashInfer decode kernels take bf16/fp16 latents, so "auto" resolves to "triton" (the reason is
logged) and "gluon" / "flashinfer" are ConfigErrors.
"""

from __future__ import annotations

import logging

import torch

from dlengine.config import ConfigError
from dlengine.kernels.kv_quant import is_fp8
from dlengine.kernels.mla.latent import DEEPSEEK_LATENT, latent_cache_problem

logger = logging.getLogger("dlengine")

MLA_DECODE_KERNELS = ("auto", "triton", "gluon", "flashinfer")


def _latent_dims(model) -> tuple[int, int]:
    return int(model.hf_config.get("kv_lora_rank") or 0), int(model.hf_config.get("qk_rope_head_dim") or 0)


def _gluon_problem(device: torch.device, dtype: torch.dtype, dims: tuple[int, int]) -> str | None:
    try:
        from dlengine.kernels.mla import mla_decode_gluon  # needs triton
    except ImportError as e:
        return f"needs triton ({e})"
    return mla_decode_gluon.supported(device, dtype, *dims)


def _flashinfer_problem(device: torch.device, dtype: torch.dtype, dims: tuple[int, int]) -> str | None:
    try:
        from dlengine.kernels.mla import mla_flashinfer  # optional package
    except ImportError as e:
        return f"flashinfer is not importable here ({e}); pip install flashinfer-python"
    return mla_flashinfer.supported(device, dtype, *dims)


def _mla_decode_applies(model, attention: str, device: torch.device) -> bool:
    """Whether the MLA decode kernel choice matters: an MLA model on the triton backend on CUDA."""
    on_triton = attention == "triton" or (attention == "auto" and device.type == "cuda")
    return model.uses_mla and on_triton and device.type == "cuda"


def resolve_mla_decode(requested: str, model, attention: str, device: torch.device, dtype: torch.dtype) -> str:
    """The decode kernel an engine will use ("auto" stays "auto" where only the per-call choice
    between our two kernels is left). `dtype` is the KV cache's."""
    if requested not in MLA_DECODE_KERNELS:
        raise ConfigError(f"unknown mla_decode kernel {requested!r}; choose one of {list(MLA_DECODE_KERNELS)}")
    if not _mla_decode_applies(model, attention, device):
        if requested not in ("auto", "triton"):
            raise ConfigError(f"mla_decode({requested!r}) needs a multi-head latent attention model on the "
                              f"triton attention backend on a CUDA device (model uses MLA: {model.uses_mla}, "
                              f"attention {attention!r}, device {device})")
        return "auto"
    dims = _latent_dims(model)
    if requested == "auto" and is_fp8(dtype):
        why = _gluon_problem(device, dtype, dims)
        logger.info("MLA decode runs the Triton kernel: the FP8 latent cache rules out the Gluon kernel (it %s) "
                    "and FlashInfer's", why)
        return "triton"
    if requested == "flashinfer":
        why = _flashinfer_problem(device, dtype, dims)
        if why:
            raise ConfigError(f"mla_decode('flashinfer'): FlashInfer's MLA decode {why}")
        return "flashinfer"
    if requested == "gluon":
        why = _gluon_problem(device, dtype, dims)
        if why:
            raise ConfigError(f"mla_decode('gluon'): the Gluon MLA decode kernel {why}; use 'triton' or 'auto'")
        return "gluon"
    if requested == "auto":
        if _gluon_problem(device, dtype, dims) is None:
            return "auto"  # per call: gluon where the cache layout allows, else triton
        if _flashinfer_problem(device, dtype, dims) is None:
            return "flashinfer"
    return requested


GLUON_BLOCK_SIZE = 64  # KV block size (page) at which the Gluon kernel is fastest


def preferred_block_size(mla_decode: str, model, attention: str, device: torch.device,
                         kv_dtype: torch.dtype) -> int | None:
    """The KV block size an engine takes when the user chose none: 64 where MLA decode steps run on
    the Gluon kernel (a TMA box is at most one page, so a 64-key tile takes 9 copies instead of 36
    at 16 tokens: 68 vs 62% of copy bandwidth at batch 32 x 8k on the H100, docs/performance.md;
    vLLM and SGLang run FlashMLA on 64-token pages too), else None (CacheConfig's default)."""
    if mla_decode not in ("auto", "gluon") or not _mla_decode_applies(model, attention, device):
        return None
    if _gluon_problem(device, kv_dtype, _latent_dims(model)) is not None:
        return None
    return GLUON_BLOCK_SIZE


__all__ = ["DEEPSEEK_LATENT", "GLUON_BLOCK_SIZE", "MLA_DECODE_KERNELS", "latent_cache_problem",
           "preferred_block_size", "resolve_mla_decode"]
