"""Block-scaled FP8 GEMM and per-token-group activation quantisation in Triton (DeepGEMM when it
imports). Torch references with the same signatures: `dlengine.kernels.fp8.fp8_torch`.

    per_token_group_quant_fp8(x [M, K], group) -> (fp8 [M, K], scale float32 [M, ceil(K/group)])
    fp8_block_gemm(a_q, a_scale, w_q, w_scale, block, row_div, out_dtype, bias) -> [M, N]
    fp8_linear(x, w_q, w_scale, block, row_div, bias)   quantise x, then one of the GEMMs

GEMM: one program per (BLOCK_M x BLOCK_N) output tile; BLOCK_K is the scale group (128), so each
K step is one fp8 x fp8 `tl.dot` into a float32 partial sum that is scaled by the activation
scales of its rows and the weight scales of its columns and added to the accumulator: exactly
sum_kb (a_q . w_q)_kb * a_scale[m, kb] * w_scale[n // row_div, kb], the reference's numbers up to
the float32 summation order.

Interpreter (TRITON_INTERPRET=1, CPU tests): triton 3.9's interpreter computes fp8 `tl.dot`
exactly, but its float32 -> float8e4nv cast is wrong (e.g. -7.9 -> -4, 500 -> 256, subnormals
flushed to 0). In interpreter mode the quant kernel therefore stores the scaled, clamped float32
values and the host rounds them to e4m3 with torch (round-to-nearest-even, what the GPU's
`cvt.rn.satfinite` does); the amax / scale / clamp logic is still the kernel's. The fp8 cast
itself is checked on the GPU (scripts/gpu_check_fp8.py).
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from dlengine.kernels.fp8.fp8_torch import ACT_EPS, FP8_DTYPE, FP8_MAX, cdiv

logger = logging.getLogger("dlengine")

try:  # DeepSeek's FP8 GEMM library: optional, used when it imports and the shapes suit it
    import deep_gemm  # type: ignore

    HAS_DEEP_GEMM = True
except Exception:  # noqa: BLE001 - any import failure means "not here"
    deep_gemm = None
    HAS_DEEP_GEMM = False


@triton.jit
def _per_token_group_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, eps,
                                  GROUP: tl.constexpr, FP8_MAX_C: tl.constexpr, STORE_FP8: tl.constexpr):
    """One program per (row, group): scale = max(amax, eps) / 448, q = clamp(x / scale)."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, GROUP)
    ok = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=ok, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), eps)
    # IEEE divisions (plain `/` is an approximate div.full.f32 on NVIDIA GPUs), so scales and
    # values on an e4m3 rounding boundary come out as torch's reference computes them; div_rn
    # neither broadcasts nor takes Python floats, hence the explicit full-shape operands
    scale = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX_C, tl.float32))
    y = tl.clamp(tl.math.div_rn(x, tl.zeros_like(x) + scale), -FP8_MAX_C, FP8_MAX_C)
    if STORE_FP8:
        y = y.to(tl.float8e4nv)
    tl.store(q_ptr + row * stride_qm + offs, y, mask=ok)
    tl.store(s_ptr + row * stride_sm + g, scale)


@triton.jit
def _fp8_block_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, bias_ptr, M, N, K,
                           stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                           ROW_DIV: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
    """C[m, n] = sum_kb dot(A[m, kb], B[n, kb]) * As[m, kb] * Bs[n // ROW_DIV, kb] (+ bias[n])."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles share each weight column-tile while it is in L2
    width = GROUP_M * grid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
    bs_ptrs = bs_ptr + (offs_n // ROW_DIV).to(tl.int64) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptrs + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_INTERPRET = type(_fp8_block_gemm_kernel).__name__ == "InterpretedFunction"


def per_token_group_quant_fp8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (last dim contiguous) -> (fp8 [M, K], scale float32 [M, ceil(K/group)])."""
    assert x.dim() == 2 and x.stride(-1) == 1, (x.shape, x.stride())
    m, k = x.shape
    kb = cdiv(k, group)
    scale = torch.empty(m, kb, dtype=torch.float32, device=x.device)
    q = torch.empty(m, k, dtype=torch.float32 if _INTERPRET else FP8_DTYPE, device=x.device)
    if m:
        _per_token_group_quant_kernel[(m, kb)](
            x, q, scale, k, x.stride(0), q.stride(0), scale.stride(0), ACT_EPS,
            GROUP=group, FP8_MAX_C=FP8_MAX, STORE_FP8=not _INTERPRET, num_warps=1 if group <= 128 else 4,
        )
    if _INTERPRET:  # the interpreter's fp8 cast is wrong; see the module docstring
        q = q.to(FP8_DTYPE)
    return q, scale


@functools.lru_cache(maxsize=None)
def _default_config(m_bucket: int, interpret: bool) -> dict:
    """Tiles by the number of token rows: small M is weight-bandwidth-bound (narrow N tiles, more
    programs); large M is compute-bound (128 x 128 tiles, 8 warps)."""
    if interpret:
        return dict(block_m=16, block_n=32, group_m=4, num_warps=4, num_stages=1)
    if m_bucket <= 16:
        return dict(block_m=16, block_n=64, group_m=1, num_warps=4, num_stages=4)
    if m_bucket <= 64:
        return dict(block_m=64, block_n=64, group_m=8, num_warps=4, num_stages=4)
    if m_bucket <= 256:
        return dict(block_m=64, block_n=128, group_m=8, num_warps=4, num_stages=4)
    return dict(block_m=128, block_n=128, group_m=8, num_warps=8, num_stages=3)


def get_config(m: int, config: dict | None = None) -> dict:
    bucket = next((b for b in (16, 64, 256) if m <= b), 1 << 30)
    cfg = dict(_default_config(bucket, _INTERPRET))
    if config:
        cfg.update(config)
    return cfg


def fp8_block_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   block: tuple[int, int], row_div: int, out_dtype: torch.dtype,
                   bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """The Triton GEMM; semantics of `fp8_torch.fp8_block_gemm_torch`. `config` overrides tiles
    (keys of `_default_config`); BLOCK_K is always the scale group block[1]."""
    m, k = a_q.shape
    n = w_q.shape[0]
    bk = block[1]
    assert w_q.shape[1] == k and a_scale.shape == (m, cdiv(k, bk)), (a_q.shape, a_scale.shape, w_q.shape)
    assert w_scale.shape == (cdiv(n, row_div), cdiv(k, bk)), (w_scale.shape, n, k, row_div)
    assert a_q.stride(-1) == 1 and w_q.stride(-1) == 1
    out = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    if m == 0:
        return out
    cfg = get_config(m, config)
    bm, bn = cfg["block_m"], cfg["block_n"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_block_gemm_kernel[grid](
        a_q, a_scale, w_q, w_scale, out, bias if bias is not None else out, m, n, k,
        a_q.stride(0), a_scale.stride(0), w_q.stride(0), w_scale.stride(0), out.stride(0),
        ROW_DIV=row_div, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["group_m"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# ---------------------------------------------------------------------------------- DeepGEMM
def deep_gemm_supports(n: int, k: int, block: tuple[int, int], row_div: int, out_dtype: torch.dtype) -> bool:
    """DeepGEMM's NT FP8 GEMM: 128 x 128 weight blocks (row_div 128), bf16 output, K a multiple
    of 128 and N of 64 (its TMA / tile requirements)."""
    return (HAS_DEEP_GEMM and tuple(block) == (128, 128) and row_div == 128 and out_dtype == torch.bfloat16
            and k % 128 == 0 and n % 64 == 0)


def fp8_block_gemm_deep_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor,
                             w_scale: torch.Tensor) -> torch.Tensor:
    """bf16 [M, N] through DeepGEMM. 2.x (`fp8_gemm_nt`) takes the [M, K/128] float32 activation
    scales as they are and lays them out itself; 1.x (`gemm_fp8_fp8_bf16_nt`) needs them MN-major
    (column-major) and TMA-aligned, which its `get_col_major_tma_aligned_tensor` makes."""
    m, n = a_q.shape[0], w_q.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=a_q.device)
    if hasattr(deep_gemm, "fp8_gemm_nt"):
        deep_gemm.fp8_gemm_nt((a_q, a_scale), (w_q, w_scale), out)
    else:
        deep_gemm.gemm_fp8_fp8_bf16_nt((a_q, deep_gemm.get_col_major_tma_aligned_tensor(a_scale)), (w_q, w_scale), out)
    return out


_DEEP_GEMM_FAILED: set = set()


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int], row_div: int,
               bias: torch.Tensor | None = None, use_deep_gemm: bool = True) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., K] in bf16/fp16/fp32 and W block-scaled FP8: x is quantised
    per token group, then DeepGEMM (when importable and the shape suits it) or the Triton GEMM."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    a_q, a_s = per_token_group_quant_fp8(x2, block[1])
    n = w_q.shape[0]
    out = None
    key = (n, k)
    if use_deep_gemm and key not in _DEEP_GEMM_FAILED and deep_gemm_supports(n, k, block, row_div, x.dtype):
        try:
            out = fp8_block_gemm_deep_gemm(a_q, a_s, w_q, w_scale)
            if bias is not None:
                out = out + bias
        except Exception as e:  # noqa: BLE001 - an unsupported shape/version: Triton computes the same thing
            _DEEP_GEMM_FAILED.add(key)
            logger.warning("DeepGEMM failed on an (N=%d, K=%d) FP8 GEMM (%s); using the Triton kernel", n, k, e)
            out = None
    if out is None:
        out = fp8_block_gemm(a_q, a_s, w_q, w_scale, block, row_div, x.dtype, bias)
    return out.view(*lead, n)


def interpret_mode() -> bool:
    return _INTERPRET


__all__ = ["per_token_group_quant_fp8", "fp8_block_gemm", "fp8_linear", "fp8_block_gemm_deep_gemm",
           "deep_gemm_supports", "get_config", "HAS_DEEP_GEMM", "interpret_mode"]
