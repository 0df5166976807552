"""Fused mixture-of-experts in Triton: token-sorted grouped GEMMs. Torch reference:
`dlengine.models.layers.moe.fused_experts_torch` (same signature, same rounding points).

    fused_experts_triton(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, K], topk_ids [T, K]) -> [T, H]

1. `moe_align_block_size` sorts the T * K (token, expert) pairs by expert (stable, so pairs of one
   expert keep token order) and pads every expert's run to a multiple of BLOCK_M, so each block of
   BLOCK_M sorted pairs belongs to exactly one expert. Pair id p = token * K + slot; padding
   entries hold T * K (masked out by the kernels).
2. GEMM 1 (`_moe_gemm_kernel`, FUSE_SILU): grid (m-blocks, n-blocks over I); each program gathers
   the x rows of its pairs (token = p // K), multiplies them by the gate and the up tile of its
   expert's w13 (two fp32 accumulators), rounds both to the activation dtype (what F.linear
   returns in the reference) and writes silu(gate) * up to an intermediate [T * K, I] at row p.
3. GEMM 2 (same kernel, MUL_ROUTED): intermediate rows p @ w2[e]^T, rounded to the activation
   dtype, times the routing weight cast to the activation dtype (the reference's `_combine`),
   written to [T * K, H] at row p.
4. `.view(T, K, H).sum(1)` in torch: the same per-token reduction over the K slots, in routing
   order, as the reference, so float32 results match it to a few ulps.

No host synchronisation: every buffer is sized by an upper bound known on the host (at most
cdiv(T*K, BLOCK_M) + min(E, T*K) blocks), the true padded length stays on the device and programs
past it exit at once. The whole path can therefore be captured in a CUDA graph (the launch grid
depends on T only), unlike the torch reference, which counts tokens per expert on the host.

float32 inputs use IEEE fp32 dots (no TF32). Under TRITON_INTERPRET=1 (CPU tests) operands are
upcast to float32 right after loading, because the triton 3.x interpreter gets bf16 arithmetic and
bf16 `tl.dot` wrong (it also truncates fp32 -> bf16 casts instead of rounding: bf16 results under
the interpreter can differ from the reference by an ulp at each rounding point).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def moe_block_rows(pid_m, expert_ids_ptr, sorted_ids_ptr, num_valid, A_DIV: tl.constexpr, BLOCK_M: tl.constexpr):
    """The expert of sorted block pid_m, its pair ids, which of them are real (not padding) and
    the activation row each reads (token = pair // A_DIV). Shared with the FP8 kernel."""
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    sid = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = sid < num_valid
    return e, sid, row_ok, tl.where(row_ok, sid // A_DIV, 0).to(tl.int64)


@triton.jit
def moe_gemm_epilogue(acc, acc_u, c_ptr, topk_w_ptr, sid, row_ok, offs_n, n_ok, stride_cm,
                      FUSE_SILU: tl.constexpr, MUL_ROUTED: tl.constexpr, CLAMP: tl.constexpr, limit):
    """Store a tile of sorted pairs `sid`: silu(gate) * up (FUSE_SILU) or the plain product, times
    the routing weight (MUL_ROUTED), with the reference's rounding points. CLAMP: the clamped
    SwiGLU of DeepSeek-V4, silu(min(gate, limit)) * clamp(up, -limit, limit). Shared with the FP8
    kernel (fused_moe_fp8_triton.py)."""
    dt = c_ptr.dtype.element_ty
    if FUSE_SILU:
        # round like F.linear's output, then silu_and_mul in fp32 (as norm_rope_triton.silu_and_mul)
        g = acc.to(dt).to(tl.float32)
        u = acc_u.to(dt).to(tl.float32)
        if CLAMP:
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
        y = g / (1.0 + tl.exp(-g)) * u
    else:
        y = acc
    if MUL_ROUTED:
        # the reference weights the rounded expert output by the weight cast to the activation dtype
        rw = tl.load(topk_w_ptr + sid, mask=row_ok, other=0.0)
        y = y.to(dt).to(tl.float32) * rw.to(dt).to(tl.float32)[:, None]
    c_ptrs = c_ptr + sid.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(dt), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_valid"])
def _moe_gemm_kernel(
    a_ptr, w_ptr, c_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    num_valid, N, K,
    stride_am, stride_we, stride_wn, stride_wk, stride_cm, up_off,
    A_DIV: tl.constexpr, FUSE_SILU: tl.constexpr, MUL_ROUTED: tl.constexpr, CLAMP: tl.constexpr, limit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """C[p, n] = sum_k A[p // A_DIV, k] * W[e, n, k] for the BLOCK_M sorted pairs p of this block
    (all of expert e). FUSE_SILU: also the up half (rows n + up_off/stride_wn of W), and
    C = silu(gate) * up. MUL_ROUTED: C *= topk_weight[p]. Rows p >= num_valid are padding."""
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
    w_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # K % BLOCK_K == 0 (real model dims): no K masks
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if FUSE_SILU:
            if EVEN_K:
                bu = tl.load(w_ptrs + up_off, mask=n_ok[None, :], other=0.0)
            else:
                bu = tl.load(w_ptrs + up_off, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                bu = bu.to(tl.float32)
            if IEEE:
                acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(a, bu, acc_u)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    moe_gemm_epilogue(acc, acc_u, c_ptr, topk_w_ptr, sid, row_ok, offs_n, n_ok, stride_cm, FUSE_SILU, MUL_ROUTED,
                      CLAMP, limit)


_INTERPRET = type(_moe_gemm_kernel).__name__ == "InterpretedFunction"


def interpret_mode() -> bool:
    return _INTERPRET


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T * K (token, expert) pairs by expert and pad each expert's run to a multiple of
    block_m, with torch ops on topk_ids' device and no host sync.

    Returns
      sorted_token_ids [cap] int32: pair ids (token * K + slot) grouped by expert, each expert's run
          starting at a multiple of block_m; padding entries (inside runs and after the end) hold
          T * K. cap = max_blocks * block_m, a host-side upper bound (see below);
      expert_ids [max_blocks] int32: the expert of each block of block_m entries, -1 past the end;
      num_tokens_post_padded [1] int32: the padded length actually used (stays on the device).

    max_blocks = cdiv(T*K, block_m) + min(E, T*K) bounds sum_e cdiv(count_e, block_m): sizing the
    buffers by it instead of reading the padded total back is what keeps this free of host syncs
    (CUDA-graph capturable); the GEMMs launch max_blocks programs and the extra ones exit at once.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    numel = flat.numel()
    dev = flat.device
    max_blocks = triton.cdiv(numel, block_m) + min(num_experts, numel)
    sorted_e, order = torch.sort(flat, stable=True)  # no bincount: on CUDA it syncs for its size
    bounds = torch.searchsorted(sorted_e, torch.arange(num_experts + 1, device=dev))
    counts = bounds[1:] - bounds[:-1]
    padded = (counts + block_m - 1) // block_m * block_m
    pend = torch.cumsum(padded, 0)
    pstart = pend - padded
    dest = pstart[sorted_e] + (torch.arange(numel, device=dev) - bounds[sorted_e])
    sorted_ids = torch.full((max_blocks * block_m,), numel, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(max_blocks, device=dev) * block_m
    expert_ids = torch.searchsorted(pend, block_start, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, pend[-1:].to(torch.int32)


@functools.lru_cache(maxsize=None)
def _default_config(avg_pairs_per_expert_bucket: int, itemsize: int, interpret: bool) -> dict:
    """Tiles for GEMM 1 (x @ w13^T with fused silu; N = I, two accumulators) and GEMM 2
    (@ w2^T; N = H). block_m is shared (both GEMMs walk the same aligned pair list)."""
    if interpret:
        return dict(block_m=16, n1=32, k1=32, warps1=4, stages1=1, n2=32, k2=32, warps2=4, stages2=1)
    if itemsize >= 4:  # float32: IEEE FMA dots, small tiles
        return dict(block_m=16 if avg_pairs_per_expert_bucket <= 16 else 32, n1=32, k1=32, warps1=4, stages1=2,
                    n2=64, k2=32, warps2=4, stages2=2)
    # bf16/fp16: the best tiles of scripts/tune_moe.py on an H100 at DeepSeek-V3 dims (H 7168,
    # I 2048, 256 experts, top-8; docs/performance.md). Few pairs per expert: weight-streaming,
    # wide N/K tiles; many: BLOCK_M 128 with K 64 to stay in shared memory.
    b = avg_pairs_per_expert_bucket
    if b <= 4:
        return dict(block_m=16, n1=128, k1=128, warps1=8, stages1=3, n2=256, k2=128, warps2=4, stages2=3)
    if b <= 32:
        return dict(block_m=32, n1=128, k1=128, warps1=8, stages1=3, n2=256, k2=128, warps2=8, stages2=3)
    return dict(block_m=128, n1=128, k1=64, warps1=8, stages1=3, n2=256, k2=64, warps2=8, stages2=3)


def get_config(num_pairs: int, num_experts: int, dtype: torch.dtype, config: dict | None = None) -> dict:
    avg = num_pairs / max(1, num_experts)
    bucket = next((b for b in (4, 32) if avg <= b), 1 << 30)
    cfg = dict(_default_config(bucket, torch.empty((), dtype=dtype).element_size(), _INTERPRET))
    if config:
        cfg.update(config)
    return cfg


def launch_gate_up(x: torch.Tensor, w13: torch.Tensor, topk_w: torch.Tensor, aligned, top_k: int,
                   cfg: dict, swiglu_limit: float | None = None) -> torch.Tensor:
    """GEMM 1: silu(x @ gate^T) * (x @ up^T) for every sorted (token, expert) pair -> [T * K, I]
    (row = pair id); with `swiglu_limit` the clamped SwiGLU (gate <= limit, |up| <= limit).
    `aligned` = moe_align_block_size(topk_ids, E, cfg["block_m"])."""
    sorted_ids, expert_ids, num_post = aligned
    num_pairs, (_, two_i, h) = topk_w.numel(), w13.shape
    i = two_i // 2
    inter = torch.empty(num_pairs, i, dtype=x.dtype, device=x.device)
    _moe_gemm_kernel[(expert_ids.numel(), triton.cdiv(i, cfg["n1"]))](
        x, w13, inter, topk_w, sorted_ids, expert_ids, num_post,
        num_pairs, i, h,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), inter.stride(0), i * w13.stride(1),
        A_DIV=top_k, FUSE_SILU=True, MUL_ROUTED=False, CLAMP=swiglu_limit is not None,
        limit=float(swiglu_limit or 0.0),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["n1"], BLOCK_K=cfg["k1"], EVEN_K=h % cfg["k1"] == 0,
        UPCAST=_INTERPRET, IEEE=_INTERPRET or x.dtype == torch.float32,
        num_warps=cfg["warps1"], num_stages=cfg["stages1"],
    )
    return inter


def launch_down(inter: torch.Tensor, w2: torch.Tensor, topk_w: torch.Tensor, aligned, cfg: dict) -> torch.Tensor:
    """GEMM 2: inter @ w2[e]^T times the pair's routing weight -> [T * K, H] (row = pair id)."""
    sorted_ids, expert_ids, num_post = aligned
    num_pairs, (_, h, i) = topk_w.numel(), w2.shape
    out = torch.empty(num_pairs, h, dtype=inter.dtype, device=inter.device)
    _moe_gemm_kernel[(expert_ids.numel(), triton.cdiv(h, cfg["n2"]))](
        inter, w2, out, topk_w, sorted_ids, expert_ids, num_post,
        num_pairs, h, i,
        inter.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0), 0,
        A_DIV=1, FUSE_SILU=False, MUL_ROUTED=True, CLAMP=False, limit=0.0,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["n2"], BLOCK_K=cfg["k2"], EVEN_K=i % cfg["k2"] == 0,
        UPCAST=_INTERPRET, IEEE=_INTERPRET or inter.dtype == torch.float32,
        num_warps=cfg["warps2"], num_stages=cfg["stages2"],
    )
    return out


def fused_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, config: dict | None = None,
                         swiglu_limit: float | None = None) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I], topk_weights/topk_ids
    [T, K] -> [T, H] in x's dtype; the semantics of `fused_experts_torch` (with `swiglu_limit`:
    of kernels/v4/reference.py `clamped_swiglu_experts`, DeepSeek-V4's clamped experts).
    `config` overrides tile sizes (keys of `_default_config`). Never reads the routing on the
    host, so a decode step through it can be captured in a CUDA graph."""
    t, k = topk_ids.shape
    e, two_i, h = w13.shape
    i = two_i // 2
    assert x.shape == (t, h) and w2.shape == (e, h, i), (x.shape, w13.shape, w2.shape, topk_ids.shape)
    if t == 0:
        return x.new_zeros(0, h)
    x = x if x.stride(-1) == 1 else x.contiguous()
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1
    num_pairs = t * k
    cfg = get_config(num_pairs, e, x.dtype, config)
    bm = cfg["block_m"]
    topk_w = topk_weights.reshape(-1)
    topk_w = topk_w if topk_w.is_contiguous() else topk_w.contiguous()
    aligned = moe_align_block_size(topk_ids, e, bm)
    inter = launch_gate_up(x, w13, topk_w, aligned, k, cfg, swiglu_limit)
    out = launch_down(inter, w2, topk_w, aligned, cfg)
    # the reference's reduction: over the K slots of each token, in routing order
    return out.view(t, k, h).sum(dim=1)


def fused_experts_clamped_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                                 topk_ids: torch.Tensor, limit: float) -> torch.Tensor:
    """DeepSeek-V4's routed experts (clamped SwiGLU): the Ops.fused_experts_clamped signature."""
    return fused_experts_triton(x, w13, w2, topk_weights, topk_ids, swiglu_limit=limit)


__all__ = ["fused_experts_triton", "fused_experts_clamped_triton", "moe_align_block_size", "get_config",
           "interpret_mode", "launch_gate_up", "launch_down"]
