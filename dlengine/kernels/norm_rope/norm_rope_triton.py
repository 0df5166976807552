"""Triton kernels for the small fused ops of a decoder layer. Torch references: norm_rope_torch.py.

- rms_norm: RMSNorm with an optional fused residual add (x + residual is also returned), float32
  statistics, Hugging Face rounding (normalise in fp32, cast, then scale by the weight); the
  zero-centred variant (Gemma, Qwen3-Next, Qwen3.5: the weight stored as its offset from 1)
  scales by 1 + weight in fp32 and casts once, as transformers does;
- gated_rms_norm: Gated DeltaNet's output norm, weight * norm(x) * silu(gate);
- silu_and_mul: silu(gate) * up for the stacked gate/up projection;
- rope_write_kv: rotate q in place, rotate k and store k and v into the paged cache at their
  slots, in one pass over the step's tokens (slots < 0 are skipped: CUDA-graph padding). An FP8
  cache (float8_e4m3fn) gets k / k_scale and v / v_scale, quantised as kernels/kv_quant.py says
  (k rounded to its own dtype first, as the reference stores the rotated k).

All of them run on CPU under TRITON_INTERPRET=1 (tests) and on GPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlengine.kernels.kv_quant import is_fp8
from dlengine.kernels.kv_quant_triton import quantize_fp8


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, x_stride, res_stride, out_stride,
                     eps, HAS_RESIDUAL: tl.constexpr, ZERO_CENTRED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        # add in fp32 and round once, exactly what torch does for a half-precision `x + residual`
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if ZERO_CENTRED:  # (norm * (1 + w)) in fp32, one rounding
        y = xf * tl.rsqrt(var + eps) * (1.0 + w)
    else:  # the normalised x rounds to x's dtype before the weight scales it
        y = w * (xf * tl.rsqrt(var + eps)).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, y.to(x.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             zero_centred: bool = False):
    """RMSNorm over the last dim of x (any leading shape). With `residual`, returns
    (norm(x + residual), x + residual). zero_centred: scale by 1 + weight (module docstring)."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    if residual is None:
        if rows:
            _rms_norm_kernel[(rows,)](x2, x2, weight, out, out, n, x2.stride(0), 0, n, eps,
                                      HAS_RESIDUAL=False, ZERO_CENTRED=zero_centred, BLOCK=block)
        return out.view(shape)
    r2 = residual.reshape(-1, n)
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    res_out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows:
        _rms_norm_kernel[(rows,)](x2, r2, weight, out, res_out, n, x2.stride(0), r2.stride(0), n, eps,
                                  HAS_RESIDUAL=True, ZERO_CENTRED=zero_centred, BLOCK=block)
    return out.view(shape), res_out.view(shape)


@triton.jit
def _gated_rms_norm_kernel(x_ptr, g_ptr, w_ptr, out_ptr, n_cols, x_stride, g_stride, eps, ROUND_Y: tl.constexpr,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # the weight scales the normalised x rounded to x's dtype; their product rounds to x's dtype
    # too when torch's promotion of (weight, x) gives it (ROUND_Y), then the gate in fp32
    y = w * (xf * tl.rsqrt(var + eps)).to(x.dtype).to(tl.float32)
    if ROUND_Y:
        y = y.to(x.dtype).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (y * g * tl.sigmoid(g)).to(x.dtype), mask=mask)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * norm(x) * silu(gate) over the last dim (norm_rope_torch.gated_rms_norm), one pass."""
    shape, n = x.shape, x.shape[-1]
    x2, g2 = x.reshape(-1, n), gate.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _gated_rms_norm_kernel[(x2.shape[0],)](x2, g2, weight, out, n, x2.stride(0), g2.stride(0), eps,
                                               ROUND_Y=torch.promote_types(weight.dtype, x.dtype) == x.dtype,
                                               BLOCK=triton.next_power_of_2(n))
    return out.view(shape)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, x_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * d + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(d))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, d, x2.stride(0), BLOCK=block)
    return out.view(*x.shape[:-1], d)


@triton.jit
def _rms_half_pair(x1, x2, w_ptr, d, eps, HALF: tl.constexpr):
    """RMSNorm of one head held as two halves (fp32 in, fp32 out), with HF rounding: normalise,
    round to the activation dtype, scale by the weight, round again."""
    var = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF)
    r = tl.rsqrt(var + eps)
    w1 = tl.load(w_ptr + d).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
    y1 = (w1 * (x1 * r).to(w_ptr.dtype.element_ty).to(tl.float32)).to(w_ptr.dtype.element_ty).to(tl.float32)
    y2 = (w2 * (x2 * r).to(w_ptr.dtype.element_ty).to(tl.float32)).to(w_ptr.dtype.element_ty).to(tl.float32)
    return y1, y2


@triton.jit
def _rope_write_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
                          qn_ptr, kn_ptr, ks_ptr, vs_ptr, eps,
                          q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, cs_stride,
                          NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                          WRITE_KV: tl.constexpr, HAS_NORM: tl.constexpr, QUANT: tl.constexpr):
    # one program per (token, head): q heads first, then kv heads. A decode step has few tokens,
    # so spreading heads over programs is what keeps this kernel from being latency-bound.
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * cs_stride + d)
    sin = tl.load(sin_ptr + pos * cs_stride + d)
    if h < NUM_Q_HEADS:
        base = q_ptr + t * q_stride_t + h * q_stride_h
        x1 = tl.load(base + d).to(tl.float32)
        x2 = tl.load(base + HALF + d).to(tl.float32)
        if HAS_NORM:
            x1, x2 = _rms_half_pair(x1, x2, qn_ptr, d, eps, HALF)
        tl.store(base + d, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty))
        tl.store(base + HALF + d, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty))
    else:
        kh = h - NUM_Q_HEADS
        base = k_ptr + t * k_stride_t + kh * k_stride_h
        x1 = tl.load(base + d).to(tl.float32)
        x2 = tl.load(base + HALF + d).to(tl.float32)
        if HAS_NORM:
            x1, x2 = _rms_half_pair(x1, x2, kn_ptr, d, eps, HALF)
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
        tl.store(base + d, r1.to(k_ptr.dtype.element_ty))
        tl.store(base + HALF + d, r2.to(k_ptr.dtype.element_ty))
        if WRITE_KV:
            slot = tl.load(slot_ptr + t)
            if slot >= 0:
                dst = (slot * NUM_KV_HEADS + kh) * (2 * HALF)
                vbase = v_ptr + t * v_stride_t + kh * v_stride_h
                v1 = tl.load(vbase + d)
                v2 = tl.load(vbase + HALF + d)
                if QUANT:  # FP8 cache: the stored (rounded) k and v over their scales
                    ks = tl.load(ks_ptr)
                    vs = tl.load(vs_ptr)
                    r1 = quantize_fp8(r1.to(k_ptr.dtype.element_ty).to(tl.float32), ks)
                    r2 = quantize_fp8(r2.to(k_ptr.dtype.element_ty).to(tl.float32), ks)
                    v1 = quantize_fp8(v1.to(tl.float32), vs)
                    v2 = quantize_fp8(v2.to(tl.float32), vs)
                tl.store(k_cache_ptr + dst + d, r1.to(k_cache_ptr.dtype.element_ty))
                tl.store(k_cache_ptr + dst + HALF + d, r2.to(k_cache_ptr.dtype.element_ty))
                tl.store(v_cache_ptr + dst + d, v1.to(v_cache_ptr.dtype.element_ty))
                tl.store(v_cache_ptr + dst + HALF + d, v2.to(v_cache_ptr.dtype.element_ty))


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor | None = None,
                  k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                  q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place (and return them) (neox layout; cos/sin [max_pos, D] float32,
    as RotaryEmbedding builds them) and, given the caches, store k and v at `slot_mapping`.
    With norm weights, each head is RMS-normalised first (Qwen3's QK-norm): norm, rotation and
    the cache write are then one pass over the step's q/k/v (which may be views of the fused
    qkv projection). An FP8 cache stores k / k_scale and v / v_scale (float32 scalar tensors;
    1.0 when None)."""
    t, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and head_dim % 2 == 0
    write = k_cache is not None
    has_norm = q_norm_weight is not None
    if not t:
        return q, k
    if write:
        assert v.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    vv = v if write else k
    quant = write and is_fp8(k_cache.dtype)
    if quant and (k_scale is None or v_scale is None):
        one = torch.ones((), dtype=torch.float32, device=k.device)
        k_scale, v_scale = (one if k_scale is None else k_scale), (one if v_scale is None else v_scale)
    _rope_write_kv_kernel[(t, num_heads + num_kv_heads)](
        q, k, vv, positions, cos, sin, slot_mapping if write else positions,
        k_cache if write else k, v_cache if write else k,
        q_norm_weight if has_norm else q, k_norm_weight if has_norm else k,
        k_scale if quant else k, v_scale if quant else k, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), vv.stride(0), vv.stride(1), cos.stride(0),
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2, WRITE_KV=write, HAS_NORM=has_norm,
        QUANT=quant,
    )
    return q, k


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated (q, k), in place: `rope_write_kv` without norms or cache write."""
    return rope_write_kv(q, k, None, positions, cos, sin)
