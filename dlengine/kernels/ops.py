"""The fused ops a decoder layer calls, routed to Triton on CUDA tensors when Triton imports and
to the torch references otherwise (CPU, or a GPU box without Triton). The route depends only on
the device and what is installed, both fixed for an engine's life, so it is effectively chosen
once; `DLENGINE_DISABLE_TRITON_OPS=1` forces the references (for A/B checks)."""

from __future__ import annotations

import os

import torch

from dlengine.kernels import ops_torch

try:  # triton is optional: CPU-only installs run the torch references
    from dlengine.kernels import triton_ops

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no triton here"
    triton_ops = None
    HAS_TRITON = False

try:
    from dlengine.kernels import fused_moe_triton

    HAS_FUSED_MOE = True
except Exception:  # noqa: BLE001
    fused_moe_triton = None
    HAS_FUSED_MOE = False

try:
    from dlengine.kernels import fp8_gemm_triton, fused_moe_fp8_triton

    HAS_FP8_GEMM = True
except Exception:  # noqa: BLE001
    fp8_gemm_triton = fused_moe_fp8_triton = None
    HAS_FP8_GEMM = False

_DISABLED = os.environ.get("DLENGINE_DISABLE_TRITON_OPS") == "1"


def use_triton(x: torch.Tensor) -> bool:
    return HAS_TRITON and not _DISABLED and x.is_cuda


def rms_norm(x, weight, eps, residual=None):
    impl = triton_ops if use_triton(x) else ops_torch
    return impl.rms_norm(x, weight, eps, residual)


def silu_and_mul(x):
    impl = triton_ops if use_triton(x) else ops_torch
    return impl.silu_and_mul(x)


def rope(q, k, positions, cos, sin):
    """Returns rotated (q, k); on the Triton path q and k are rotated in place."""
    if use_triton(q):
        triton_ops.rope_write_kv(q, k, None, positions, cos, sin)
        return q, k
    return ops_torch.rope(q, k, positions, cos, sin)


def fused_experts(x, w13, w2, topk_weights, topk_ids):
    """MoE experts: x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights/ids [T, K] -> [T, H].
    The Triton path has no host syncs, so it also runs inside CUDA-graph captures; the torch
    reference falls back to a dense all-experts computation while capturing."""
    if HAS_FUSED_MOE and use_triton(x):
        return fused_moe_triton.fused_experts_triton(x, w13, w2, topk_weights, topk_ids)
    from dlengine.models.layers.moe import fused_experts_torch  # moe imports this module

    return fused_experts_torch(x, w13, w2, topk_weights, topk_ids)


def fp8_linear(x, w_q, w_scale, block, row_div, bias=None):
    """y = x @ W^T for a block-scaled FP8 weight (kernels/fp8_torch.py describes the format):
    Triton (or DeepGEMM) on CUDA, the torch W8A8 reference elsewhere."""
    if HAS_FP8_GEMM and use_triton(x):
        return fp8_gemm_triton.fp8_linear(x, w_q, w_scale, block, row_div, bias)
    from dlengine.kernels.fp8_torch import fp8_linear_torch

    return fp8_linear_torch(x, w_q, w_scale, block, row_div, bias)


def fused_experts_fp8(x, w13, w13_scale, w2, w2_scale, block, w13_row_div, topk_weights, topk_ids):
    """MoE experts with block-scaled FP8 weights (W8A8): Triton on CUDA (no host syncs), the torch
    reference elsewhere."""
    if HAS_FP8_GEMM and use_triton(x):
        return fused_moe_fp8_triton.fused_experts_fp8_triton(x, w13, w13_scale, w2, w2_scale, block, w13_row_div,
                                                             topk_weights, topk_ids)
    from dlengine.kernels.fp8_torch import fused_experts_fp8_torch

    return fused_experts_fp8_torch(x, w13, w13_scale, w2, w2_scale, block, w13_row_div, topk_weights, topk_ids)
