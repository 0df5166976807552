"""The latent-cache shape the DeepSeek-dims MLA decode kernels (Gluon, FlashInfer) are built for,
shared by those kernels and the choice between them (decode_choice.py)."""

from __future__ import annotations

import torch

DEEPSEEK_LATENT = (512, 64)  # kv_lora_rank, rope dims


def latent_cache_problem(cache_dtype: torch.dtype, kv_lora: int, rope: int) -> str | None:
    """Why a DeepSeek-dims MLA decode kernel (Gluon, FlashInfer) cannot take this latent cache, or None."""
    if cache_dtype not in (torch.bfloat16, torch.float16):
        fp8 = " (FP8 KV caches run the Triton MLA kernels)" if cache_dtype == torch.float8_e4m3fn else ""
        return f"needs a bf16/fp16 latent cache, not {cache_dtype}{fp8}"
    if (kv_lora, rope) != DEEPSEEK_LATENT:
        return f"is built for kv_lora_rank {DEEPSEEK_LATENT[0]} + rope {DEEPSEEK_LATENT[1]}, not {kv_lora} + {rope}"
    return None
