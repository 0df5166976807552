"""Block-scaled FP8 (DeepSeek-V3 / Kimi-K2 "fp8" checkpoints): torch references.

Format (e4m3, `weight_block_size` [bn, bk], 128 x 128 in every released checkpoint):

    weight            float8_e4m3fn [N, K]
    weight_scale_inv  float32 [ceil(N / bn), ceil(K / bk)]      W[n, k] ~= weight[n, k] * scale_inv[n // bn, k // bk]

Blocks at the right / bottom edge are partial (DeepSeek-V3's kv_a_proj_with_mqa has N = 576 =
4.5 blocks). Activations are quantised on the fly, per token and per bk-channel group (1 x bk),
scale = amax / 448 ("dynamic" activation scheme). The Triton kernels in `fp8_gemm_triton.py` have
the same signatures as the functions here and are tested against them.

Weight scales may also be stored one row per output row ("row_div" 1 instead of bn): a merged
GEMM (gate and up side by side) whose shard sizes are not multiples of bn cannot share bn-row
scale blocks, so each row keeps its shard's block scale. Every function takes `row_div`, the
number of weight rows one scale row covers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# activation groups that are all zero get this amax, so their scale is tiny but never zero
# (a zero scale would make x / scale NaN)
ACT_EPS = 1e-10


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quantize_weight_blockwise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (any float dtype) -> (fp8 [..., N, K], scale_inv float32 [..., ceil(N/bn), ceil(K/bk)]).

    What DeepSeek's and transformers' quantisers compute per block: amax over the block in
    float32, scale_inv = amax / 448 (1 for an all-zero block), fp8 = clamp(w / scale_inv) rounded
    to nearest even. Partial edge blocks are padded with zeros, which cannot change an amax."""
    bn, bk = block
    *lead, n, k = w.shape
    nb, kb = cdiv(n, bn), cdiv(k, bk)
    padded = torch.zeros(*lead, nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[..., :n, :k] = w.float()
    tiles = padded.view(*lead, nb, bn, kb, bk)
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(*lead, nb * bn, kb * bk)[..., :n, :k].contiguous(), scale_inv


def dequantize_weight(q: torch.Tensor, scale_inv: torch.Tensor, block_k: int, row_div: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """fp8 [..., N, K] * per-block scale -> `dtype`, the product taken in float32 and rounded once
    (as DeepSeek's `weight_dequant`). Leading dims (stacked experts) are done one matrix at a time
    and the column scales are broadcast through a view, so the only temporary is one float32
    matrix."""
    if q.dim() > 2:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        for i in range(q.shape[0]):
            out[i] = dequantize_weight(q[i], scale_inv[i], block_k, row_div, dtype)
        return out
    n, k = q.shape
    rows = scale_inv.float().repeat_interleave(row_div, dim=0)[:n]  # [N, ceil(K / bk)]: small
    w = q.to(torch.float32)
    full, rem = divmod(k, block_k)
    w[:, : full * block_k].view(n, full, block_k).mul_(rows[:, :full, None])
    if rem:
        w[:, full * block_k :].mul_(rows[:, full:])
    return w.to(dtype)


def per_token_group_quant_fp8_torch(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], scale float32 [M, ceil(K / group)]): per row and per group of
    `group` channels, scale = max(amax, ACT_EPS) / 448 and q = clamp(x / scale) in e4m3."""
    m, k = x.shape
    kb = cdiv(k, group)
    xf = torch.zeros(m, kb * group, dtype=torch.float32, device=x.device)
    xf[:, :k] = x.float()
    xg = xf.view(m, kb, group)
    # divide by a tensor, not the Python float: on CUDA torch turns `tensor / scalar` into a
    # multiplication by the rounded reciprocal (1 ulp off the IEEE quotient), while the Triton
    # kernel divides correctly rounded (div_rn); tensor / tensor is IEEE on every device
    amax = xg.abs().amax(dim=-1).clamp(min=ACT_EPS)
    scale = amax / torch.full_like(amax, FP8_MAX)
    q = (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, kb * group)[:, :k].contiguous(), scale


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """The float32 values a per-token-group quantised activation stands for."""
    return q.float() * scale.repeat_interleave(group, dim=1)[:, : q.shape[1]]


def fp8_block_gemm_torch(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                         block: tuple[int, int], row_div: int, out_dtype: torch.dtype,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """C [M, N] = dequant(a) @ dequant(w)^T in float32 (+ bias), rounded to out_dtype.
    a_q [M, K] fp8 with a_scale [M, ceil(K/bk)]; w_q [N, K] fp8 with w_scale [ceil(N/row_div), ceil(K/bk)]."""
    a = dequantize_activation(a_q, a_scale, block[1])
    w = dequantize_weight(w_q, w_scale, block[1], row_div, torch.float32)
    out = a @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_linear_torch(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int],
                     row_div: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T with W block-scaled FP8 and x quantised per token group, like the GPU path
    (W8A8), on any device: x [..., K] -> [..., N] in x's dtype."""
    lead = x.shape[:-1]
    a_q, a_s = per_token_group_quant_fp8_torch(x.reshape(-1, x.shape[-1]), block[1])
    out = fp8_block_gemm_torch(a_q, a_s, w_q, w_scale, block, row_div, x.dtype, bias)
    return out.view(*lead, w_q.shape[0])


def fused_experts_fp8_torch(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                            w2_scale: torch.Tensor, block: tuple[int, int], w13_row_div: int,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The reference: per expert, the W8A8 linears of `fp8_torch` (activations quantised per token
    group, so a row's numbers do not depend on which other rows share its expert), SiLU-and-mul in
    float32 on the rounded gate/up, rounded; weighted and summed like `fused_experts_torch`."""
    t, k = topk_ids.shape
    i = w13.shape[1] // 2
    flat = topk_ids.reshape(-1)
    out = x.new_zeros(t * k, x.shape[1])
    for e in torch.unique(flat).tolist():
        pairs = (flat == e).nonzero(as_tuple=True)[0]
        h1 = fp8_linear_torch(x[pairs // k], w13[e], w13_scale[e], block, w13_row_div)
        g, u = h1[:, :i].float(), h1[:, i:].float()
        inter = (F.silu(g) * u).to(x.dtype)
        y = fp8_linear_torch(inter, w2[e], w2_scale[e], block, block[0])
        out[pairs] = y
    weighted = out * topk_weights.reshape(-1, 1).to(out.dtype)
    return weighted.view(t, k, -1).sum(dim=1)
