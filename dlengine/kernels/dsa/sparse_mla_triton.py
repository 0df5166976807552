"""Triton kernel of sparse MLA over gathered latent rows (reference:
sparse_mla_torch.sparse_mla_absorbed_ref), the attention of DeepSeek Sparse Attention for
decode, chunked prefill and prefill alike.

Every query token has its own list of K selected tokens, given as flat cache slots (-1: none), so
prefill is no different from decode: grid (query token, head tile). A program keeps the tile's
absorbed queries q_lat [BLOCK_H, C] and q_pe [BLOCK_H, rope] and walks the token's slot list in
tiles of BLOCK_N, gathering those latent rows [c_kv | k_pe] and folding them into an online
softmax (acc [BLOCK_H, C] float32, the whole latent width in one tile as the dense decode kernel
of kernels/mla/mla_triton.py does). The work per token is K rows whatever the context length:
the point of DSA. Capturable in CUDA graphs (static sizes, no host syncs); a token that selects
nothing (CUDA-graph padding rows) gets zeros.

An FP8 latent cache (docs/fp8_kv.md) holds latent / kv_scale: each gathered tile is converted to
the query's dtype for the dots (bf16 / fp16 tensor cores, IEEE float32 for float32 models), the
scores are multiplied by kv_scale (folded into the softmax scale) and so is the output (the
latent is the value too), as the dense MLA decode kernel does. kv_scale is a device tensor read
in the kernel, so graphs capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlengine.kernels.kv_quant import is_fp8
from dlengine.kernels.kv_quant_triton import scale_pointer
from dlengine.kernels.mla.mla_triton import interpret_mode

LOG2E = 1.4426950408889634


@triton.jit
def _sparse_mla_kernel(q_lat_ptr, q_pe_ptr, cache_ptr, slots_ptr, out_ptr, scale_ptr, num_selected, qk_scale,
                       stride_lt, stride_lh, stride_pt, stride_ph, stride_cb, stride_cs, stride_st,
                       stride_ot, stride_oh,
                       H: tl.constexpr, KV_LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr):
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    h_ok = offs_h < H
    c_ok = offs_c < KV_LORA
    r_ok = offs_r < ROPE
    q_lat = tl.load(q_lat_ptr + t * stride_lt + offs_h[:, None] * stride_lh + offs_c[None, :],
                    mask=h_ok[:, None] & c_ok[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + t * stride_pt + offs_h[:, None] * stride_ph + offs_r[None, :],
                   mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    if UPCAST:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    elif KV_FP8:  # dots run in the query's dtype (the FP8 tiles are converted to it)
        q_pe = q_pe.to(q_lat.dtype)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(scale_ptr)  # scores of the dequantised latent
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), tl.float32)
    for start in range(0, num_selected, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        slot = tl.load(slots_ptr + t * stride_st + offs_n, mask=offs_n < num_selected, other=-1).to(tl.int64)
        ok = slot >= 0
        safe = tl.where(ok, slot, 0)
        row = cache_ptr + (safe // PAGE) * stride_cb + (safe % PAGE) * stride_cs  # [BLOCK_N]
        c_kv = tl.load(row[:, None] + offs_c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
        k_pe = tl.load(row[:, None] + KV_LORA + offs_r[None, :], mask=ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            c_kv = c_kv.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        elif KV_FP8:
            c_kv = c_kv.to(q_lat.dtype)
            k_pe = k_pe.to(q_lat.dtype)
        if IEEE:
            s = tl.dot(q_lat, tl.trans(c_kv), input_precision="ieee")
            s += tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee")
        else:
            s = tl.dot(q_lat, tl.trans(c_kv))
            s += tl.dot(q_pe, tl.trans(k_pe))
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv)
        m_i = m_new
    if KV_FP8:
        acc = acc * tl.load(scale_ptr)  # the latent is the value too
    out = (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_c[None, :], out,
             mask=h_ok[:, None] & c_ok[None, :])


def sparse_mla_attend(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                      scale: float, block_h: int | None = None, block_n: int | None = None,
                      out_dtype: torch.dtype = torch.float32, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as sparse_mla_torch.sparse_mla_absorbed_ref: q_lat [T, H, C] and q_pe
    [T, H, rope] over the latent rows at slots [T, K] of cache [N, page, 1, C + rope]
    -> out_lat [T, H, C] (float32 by default; `out_dtype` stores it narrower, e.g. the
    activations' bf16, which halves a long prefill chunk's buffer). An FP8 cache is read with
    kv_scale (a float32 scalar tensor; 1.0 when None)."""
    num_tokens, num_heads, kv_lora = q_lat.shape
    rope = q_pe.shape[-1]
    out = torch.empty(num_tokens, num_heads, kv_lora, dtype=out_dtype, device=q_lat.device)
    if num_tokens == 0:
        return out
    slots = slots.contiguous()
    interp = interpret_mode()
    # the dense MLA decode kernel's tiles (mla_triton.DECODE_DEFAULTS*): heads share each gathered row
    kv_fp8 = is_fp8(cache.dtype)
    compute = q_lat.dtype if kv_fp8 else cache.dtype  # what the dots run in
    small = interp or compute == torch.float32
    tiles = dict(block_h=16, block_n=16, num_warps=4, num_stages=1) if small else \
        dict(block_h=64, block_n=64, num_warps=8, num_stages=2)
    block_h = block_h or min(tiles["block_h"], max(16, triton.next_power_of_2(num_heads)))
    block_n = block_n or tiles["block_n"]
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _sparse_mla_kernel[grid](
        q_lat, q_pe, cache, slots, out, scale_pointer(cache, kv_scale), slots.shape[1], scale * LOG2E,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(0), cache.stride(1),
        slots.stride(0), out.stride(0), out.stride(1),
        H=num_heads, KV_LORA=kv_lora, ROPE=rope, BLOCK_H=block_h, BLOCK_C=max(16, triton.next_power_of_2(kv_lora)),
        BLOCK_R=max(16, triton.next_power_of_2(rope)), BLOCK_N=block_n, PAGE=cache.shape[1], UPCAST=interp,
        IEEE=interp or compute == torch.float32, KV_FP8=kv_fp8, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    return out
