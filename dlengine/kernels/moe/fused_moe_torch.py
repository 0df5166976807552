"""Torch reference of the fused MoE experts (the Triton kernels of this folder are tested against
it, same signature). Its numerics follow transformers' default experts path: routing weights cast
to the activation dtype, each (token, expert) output weighted in the activation dtype, and the
per-token sum taken over the k slots in routing order (a deterministic reduction, unlike
`index_add_`, whose order of duplicate-index adds is not fixed on CUDA).

Layout: x [T, H], w13 [E, 2I, H] (gate then up of each expert), w2 [E, H, I], topk_weights /
topk_ids [T, K] -> [T, H].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlengine.kernels.norm_rope.norm_rope_torch import silu_and_mul


def fused_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights/topk_ids [T, K] -> [T, H].

    The T * K (token, expert) pairs are sorted by expert so each expert runs one GEMM pair over its
    tokens; experts that received no token are skipped. Counting tokens per expert reads them on
    the host, which a CUDA graph cannot capture: while capturing, every expert runs on every token
    instead and the pairs pick their rows (the same numbers, E times the work)."""
    t, k = topk_ids.shape
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return fused_experts_dense(x, w13, w2, topk_weights, topk_ids)
    flat_ids = topk_ids.reshape(-1)
    sorted_ids, order = torch.sort(flat_ids, stable=True)  # pair order[j] is the j-th by expert
    counts = torch.bincount(sorted_ids, minlength=w13.shape[0]).tolist()
    tokens = order // k
    out = x.new_empty(t * k, x.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows, pairs = tokens[start : start + n], order[start : start + n]
        out[pairs] = F.linear(silu_and_mul(F.linear(x[rows], w13[e])), w2[e])
        start += n
    return combine_expert_outputs(out, topk_weights, t, k)


def fused_experts_dense(x, w13, w2, topk_weights, topk_ids):
    """Every expert on every token, each (token, slot) pair picking its expert's row: the numbers
    of `fused_experts_torch` without reading the routing on the host (CUDA-graph capturable)."""
    t, k = topk_ids.shape
    out = x.new_zeros(t, k, x.shape[1])
    for e in range(w13.shape[0]):
        y = F.linear(silu_and_mul(F.linear(x, w13[e])), w2[e])
        out = torch.where((topk_ids == e).unsqueeze(-1), y.unsqueeze(1), out)
    return combine_expert_outputs(out.view(t * k, -1), topk_weights, t, k)


def combine_expert_outputs(pair_out: torch.Tensor, topk_weights: torch.Tensor, t: int, k: int) -> torch.Tensor:
    """[T * K, H] per-(token, slot) outputs -> [T, H]: weighted in the activation dtype and summed
    over the k slots in routing order (deterministic, unlike index_add_ on CUDA)."""
    weighted = pair_out * topk_weights.reshape(-1, 1).to(pair_out.dtype)
    return weighted.view(t, k, -1).sum(dim=1)
