"""Triton helpers of the FP8 KV cache (numerics: kv_quant.py), shared by the KV write kernels of
attention/, mla/ and norm_rope/, and the scale argument of the kernels that read one (dsa/)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlengine.kernels.kv_quant import is_fp8


def scale_pointer(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The scale argument an FP8-aware kernel takes for `cache`: `scale` (a float32 scalar tensor,
    1.0 when None) for an FP8 cache; for any other cache an unused placeholder (the cache itself)."""
    if not is_fp8(cache.dtype):
        return cache
    return scale if scale is not None else torch.ones((), dtype=torch.float32, device=cache.device)


@triton.jit
def quantize_fp8(x, scale):
    """float32 x -> clamp(x / scale, +-448), rounded to the nearest-even e4m3 value but still held
    in float32, ready for an exact `.to(float8e4nv)`.

    The rounding is done here rather than by the cast because Triton's CPU interpreter (3.x)
    rounds float32 -> e4m3 wrongly when the mantissa carries into the exponent (-7.99 becomes
    -4); on GPUs the cast would be right, and these few ALU ops are free in a memory-bound write.
    Normal range (|x| >= 2^-6): round the float32 mantissa to 3 bits (add half an e4m3 step plus
    the tie-to-even bit, drop the low 20 bits). Subnormals: round to a multiple of 2^-9 with the
    1.5 x 2^23 trick, keeping the sign (so -0.0 and values rounding to zero stay -0, as torch's).
    """
    y = x / scale
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) << 31
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF).to(tl.float32, bitcast=True)
    sub = ((y * 512.0 + 12582912.0) - 12582912.0) / 512.0
    sub = (sub.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(y) < 0.015625, sub, normal)
