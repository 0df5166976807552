"""FP8 KV cache quantisation: the numerics every FP8 cache write and read follows (docs/fp8_kv.md).

A cache stored as float8_e4m3fn keeps one float32 scale per layer and tensor (K and V of a GQA
layer, the latent of an MLA layer), held by the attention layer as `k_scale` / `v_scale`
buffers: from the checkpoint when it carries them (models/loader.py), else 1.0.

  write  q = clamp(x / scale, -448, 448) rounded to nearest-even e4m3   (x in float32)
  read   x' = float(q) * scale

The torch functions here are the reference; Triton kernels do the same through
`kv_quant_triton.quantize_fp8` and fold the scales into their dots (scores x k_scale, output x
v_scale), which is the same arithmetic up to float32 rounding.
"""

from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether a cache of this dtype is quantised (stores x / scale in float8_e4m3fn)."""
    return dtype == FP8_KV_DTYPE


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale, saturated to +-448, rounded to nearest-even float8_e4m3fn."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | float | None) -> torch.Tensor:
    """x as stored in a cache of `cache_dtype`: quantised with `scale` (1.0 when None) for FP8,
    else a plain cast."""
    if is_fp8(cache_dtype):
        return quantize_fp8(x, 1.0 if scale is None else scale)
    return x.to(cache_dtype)


def from_cache(x: torch.Tensor, scale: torch.Tensor | float | None) -> torch.Tensor:
    """Cache contents as float32: dequantised for FP8 (scale 1.0 when None), else upcast."""
    if is_fp8(x.dtype):
        return dequantize_fp8(x, 1.0 if scale is None else scale)
    return x.float()


def index_copy_rows(rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """rows[slots] = values (dim 0), for any cache dtype: torch has no index_copy_ for float8, so
    FP8 rows are copied as their bytes."""
    if is_fp8(rows.dtype):
        rows, values = rows.view(torch.uint8), values.view(torch.uint8)
    rows.index_copy_(0, slots, values)


def round_trip_bound(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The largest error |dequantize(quantize(x)) - x| may have, elementwise, for |x| / scale <=
    448: half an e4m3 step (3 mantissa bits: relative 2^-4; subnormals: absolute 2^-10 x scale)."""
    return torch.maximum(x.abs() * 2.0**-4, torch.full_like(x, 2.0**-10 * scale))


__all__ = ["FP8_KV_DTYPE", "FP8_MAX", "dequantize_fp8", "from_cache", "index_copy_rows", "is_fp8", "quantize_fp8",
           "round_trip_bound", "to_cache"]
