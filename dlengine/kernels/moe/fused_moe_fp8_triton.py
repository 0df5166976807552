"""Fused MoE with block-scaled FP8 expert weights (DeepSeek-V3 / Kimi-K2 checkpoints), in Triton.
The bf16 path (`fused_moe_triton.py`) with the GEMMs made W8A8; torch reference:
`fp8_torch.fused_experts_fp8_torch` (same signature, same rounding points).

    x [T, H] --per-token-group quant--> fp8 [T, H] + scales [T, H/128]
      GEMM 1 (sorted pairs, gate and up of w13 [E, 2I, H] fp8, scales [E, 2I/row_div, H/128]),
             silu(gate) * up rounded to x's dtype -> [T*K, I]
      --per-token-group quant--> fp8 [T*K, I] + scales
      GEMM 2 (w2 [E, H, I] fp8, scales [E, H/128, I/128]) * routing weight -> [T*K, H]
      sum over the K slots of each token (routing order)

Each K step of a GEMM is one fp8 `tl.dot` (BLOCK_K = the 128-channel scale group) whose float32
result is scaled by the activation scales of its rows and the weight scales of its columns, as in
`fp8_gemm_triton`. The pair sorting / padding is `moe_align_block_size`, so this path has no host
syncs either (CUDA-graph capturable). Interpreter notes: see fp8_gemm_triton.py (fp8 dots are
exact there; the activation quantisation rounds on the host in interpreter mode).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlengine.kernels.fp8.fp8_gemm_triton import per_token_group_quant_fp8
from dlengine.kernels.fp8.fp8_torch import cdiv
from dlengine.kernels.moe.fused_moe_triton import moe_align_block_size, moe_block_rows, moe_gemm_epilogue


@triton.jit(do_not_specialize=["num_valid"])
def _moe_fp8_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    num_valid, N, K,
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm, up_off,
    A_DIV: tl.constexpr, ROW_DIV: tl.constexpr, FUSE_SILU: tl.constexpr, MUL_ROUTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """C[p, n] = sum_kb dot(A[p // A_DIV, kb], W[e, n, kb]) * As[p // A_DIV, kb] * Ws[e, n // ROW_DIV, kb]
    for the BLOCK_M sorted pairs p of this block (all of expert e). FUSE_SILU: also the up half
    (rows n + up_off), C = silu(gate) * up. MUL_ROUTED: C *= topk_weight[p]. Rows p >= num_valid are padding."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_post = tl.load(num_post_ptr)
    if pid_m * BLOCK_M >= num_post:
        return
    e, sid, row_ok, a_row = moe_block_rows(pid_m, expert_ids_ptr, sorted_ids_ptr, num_valid, A_DIV, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]
    as_ptrs = as_ptr + a_row * stride_asm
    w_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    ws_ptrs = ws_ptr + e * stride_wse + (offs_n // ROW_DIV).to(tl.int64) * stride_wsn
    wsu_ptrs = ws_ptr + e * stride_wse + ((offs_n + up_off) // ROW_DIV).to(tl.int64) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb, mask=row_ok, other=0.0)
        b_s = tl.load(ws_ptrs + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        if FUSE_SILU:
            up_ptrs = w_ptrs + up_off * stride_wn
            if EVEN_K:
                bu = tl.load(up_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                bu = tl.load(up_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            bu_s = tl.load(wsu_ptrs + kb, mask=n_ok, other=0.0)
            acc_u += tl.dot(a, bu) * a_s[:, None] * bu_s[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    moe_gemm_epilogue(acc, acc_u, c_ptr, topk_w_ptr, sid, row_ok, offs_n, n_ok, stride_cm, FUSE_SILU, MUL_ROUTED,
                      False, 0.0)


_INTERPRET = type(_moe_fp8_gemm_kernel).__name__ == "InterpretedFunction"


def _config(num_pairs: int, num_experts: int) -> dict:
    if _INTERPRET:
        return dict(block_m=16, n1=32, n2=32, warps=4, stages=1)
    avg = num_pairs / max(1, num_experts)
    if avg <= 16:  # decode: weight-bandwidth-bound
        return dict(block_m=16, n1=64, n2=64, warps=4, stages=3)
    if avg <= 64:
        return dict(block_m=32, n1=64, n2=128, warps=4, stages=3)
    return dict(block_m=64, n1=64, n2=128, warps=4, stages=3)


def fused_experts_fp8_triton(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                             w2_scale: torch.Tensor, block: tuple[int, int], w13_row_div: int,
                             topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                             config: dict | None = None) -> torch.Tensor:
    """x [T, H]; w13 fp8 [E, 2I, H] with w13_scale [E, ceil(2I / w13_row_div), ceil(H / bk)];
    w2 fp8 [E, H, I] with w2_scale [E, ceil(H / bn), ceil(I / bk)]; topk [T, K] -> [T, H] in x's dtype."""
    t, k = topk_ids.shape
    e, two_i, h = w13.shape
    i = two_i // 2
    bn, bk = block
    assert w2.shape == (e, h, i) and w13_scale.shape == (e, cdiv(two_i, w13_row_div), cdiv(h, bk))
    assert w2_scale.shape == (e, cdiv(h, bn), cdiv(i, bk)) and w13.stride(-1) == 1 and w2.stride(-1) == 1
    if t == 0:
        return x.new_zeros(0, h)
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_pairs = t * k
    cfg = {**_config(num_pairs, e), **(config or {})}
    bm = cfg["block_m"]
    sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, e, bm)
    grid_m = expert_ids.numel()
    topk_w = topk_weights.reshape(-1).contiguous()

    x_q, x_s = per_token_group_quant_fp8(x, bk)
    inter = torch.empty(num_pairs, i, dtype=x.dtype, device=x.device)
    _moe_fp8_gemm_kernel[(grid_m, triton.cdiv(i, cfg["n1"]))](
        x_q, x_s, w13, w13_scale, inter, topk_w, sorted_ids, expert_ids, num_post,
        num_pairs, i, h,
        x_q.stride(0), x_s.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), w13_scale.stride(1),
        inter.stride(0), i,
        A_DIV=k, ROW_DIV=w13_row_div, FUSE_SILU=True, MUL_ROUTED=False,
        BLOCK_M=bm, BLOCK_N=cfg["n1"], BLOCK_K=bk, EVEN_K=h % bk == 0,
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    inter_q, inter_s = per_token_group_quant_fp8(inter, bk)
    out = torch.empty(num_pairs, h, dtype=x.dtype, device=x.device)
    _moe_fp8_gemm_kernel[(grid_m, triton.cdiv(h, cfg["n2"]))](
        inter_q, inter_s, w2, w2_scale, out, topk_w, sorted_ids, expert_ids, num_post,
        num_pairs, h, i,
        inter_q.stride(0), inter_s.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), w2_scale.stride(1),
        out.stride(0), 0,
        A_DIV=1, ROW_DIV=bn, FUSE_SILU=False, MUL_ROUTED=True,
        BLOCK_M=bm, BLOCK_N=cfg["n2"], BLOCK_K=bk, EVEN_K=i % bk == 0,
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return out.view(t, k, h).sum(dim=1)


__all__ = ["fused_experts_fp8_triton"]
