"""Triton kernel of the lightning indexer's scores, and the top-k built on it (reference:
indexer_torch.py).

`_indexer_logits_kernel`, grid (query token, key tile): one program loads the token's H x D
queries once and a tile of BLOCK_N cached keys through its request's block table, computes
relu(q . k * softmax_scale) for every head (one dot, the heads are the M dimension), sums the
heads with the token's weights and writes one float32 logit per key, -inf past the token's own
position (causality: a query at position p sees keys 0..p). Tiles wholly past it only write -inf.

The top-k itself is torch.topk over those logits (one call per chunk of query rows, so a long
prefill never holds [T, context] float32 at once). Everything takes its sizes from static shapes
(the block tables' width bounds the context) and never syncs with the host, so a decode step can
be captured in a CUDA graph.

An FP8 key cache (docs/fp8_kv.md) holds k / key_scale: each key tile is converted to the query's
dtype for the dot and the scores are multiplied by key_scale before the relu (the dequantised
keys' scores, as the torch reference computes them).

Under TRITON_INTERPRET=1 loads are upcast to float32 (the interpreter's low-precision dots are
wrong), as in kernels/mla/mla_triton.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlengine.kernels.dsa.indexer_torch import select_width, topk_of_scores, token_requests
from dlengine.kernels.kv_quant import is_fp8
from dlengine.kernels.kv_quant_triton import scale_pointer
from dlengine.kernels.mla.mla_triton import interpret_mode

ROW_CHUNK = 1024  # query rows per logits buffer: [ROW_CHUNK, context] float32 at a time


@triton.jit
def _indexer_logits_kernel(q_ptr, w_ptr, cache_ptr, bt_ptr, req_ptr, pos_ptr, out_ptr, scale_ptr,
                           width, softmax_scale,
                           stride_qt, stride_qh, stride_wt, stride_cb, stride_cs, stride_bt, stride_ot,
                           H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_N: tl.constexpr, PAGE: tl.constexpr, UPCAST: tl.constexpr,
                           IEEE: tl.constexpr, KEY_FP8: tl.constexpr, CONVERT_K: tl.constexpr):
    t = tl.program_id(0)
    nb = tl.program_id(1)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    ctx = tl.load(pos_ptr + t).to(tl.int32) + 1  # keys 0..position are visible
    out_mask = offs_n < width
    if nb * BLOCK_N >= ctx:
        tl.store(out_ptr + t * stride_ot + offs_n, tl.full((BLOCK_N,), float("-inf"), tl.float32), mask=out_mask)
        return
    req = tl.load(req_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < H
    d_ok = offs_d < D
    n_ok = offs_n < ctx
    q = tl.load(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    blk = tl.load(bt_ptr + req * stride_bt + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
    k = tl.load(cache_ptr + blk[:, None] * stride_cb + (offs_n % PAGE)[:, None] * stride_cs + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    elif CONVERT_K:  # FP8 keys, or bf16 keys of a float32 model's FP8 run: the dot runs in q's dtype
        k = k.to(q.dtype)
    if IEEE:  # float32 caches: exact float32 dots, not TF32
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if KEY_FP8:
        softmax_scale = softmax_scale * tl.load(scale_ptr)  # scores of the dequantised keys
    s = s * softmax_scale  # [BLOCK_H, BLOCK_N]
    s = tl.maximum(s, 0.0)
    w = tl.load(w_ptr + t * stride_wt + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    logits = tl.sum(s * w[:, None], axis=0)
    logits = tl.where(n_ok, logits, float("-inf"))
    tl.store(out_ptr + t * stride_ot + offs_n, logits, mask=out_mask)


def indexer_logits(q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, block_tables: torch.Tensor,
                   token_req: torch.Tensor, positions: torch.Tensor, width: int, softmax_scale: float,
                   block_n: int | None = None, key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [T, width] float32 of queries q [T, H, D] (weights [T, H]) against the paged keys
    [N, page, 1, D] of each token's request (token_req [T]), -inf past each token's position.
    An FP8 key cache is read with key_scale (a float32 scalar tensor; 1.0 when None)."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(num_tokens, width, dtype=torch.float32, device=q.device)
    if num_tokens == 0:
        return out
    q = q.contiguous()
    weights = weights.float().contiguous()
    interp = interpret_mode()
    key_fp8 = is_fp8(key_cache.dtype)
    convert = key_fp8 or key_cache.dtype != q.dtype
    compute = q.dtype if convert else key_cache.dtype  # what the dot runs in
    block_n = block_n or (16 if interp else 64)
    grid = (num_tokens, triton.cdiv(width, block_n))
    _indexer_logits_kernel[grid](
        q, weights, key_cache, block_tables, token_req, positions, out, scale_pointer(key_cache, key_scale),
        width, softmax_scale,
        q.stride(0), q.stride(1), weights.stride(0), key_cache.stride(0), key_cache.stride(1),
        block_tables.stride(0), out.stride(0),
        H=num_heads, D=head_dim, BLOCK_H=max(16, triton.next_power_of_2(num_heads)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n, PAGE=key_cache.shape[1],
        UPCAST=interp, IEEE=interp or compute == torch.float32, KEY_FP8=key_fp8, CONVERT_K=convert, num_warps=4)
    return out


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, block_tables: torch.Tensor,
                 query_start_loc: torch.Tensor, positions: torch.Tensor, topk: int, softmax_scale: float,
                 max_context: int | None = None, key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k positions [T, width] int32 (-1 padded), as indexer_torch.indexer_topk_ref, from the
    Triton logits. `max_context` bounds the logits' width (default: what the block tables can
    address, the static bound CUDA graphs need); key_scale reads an FP8 key cache."""
    page = key_cache.shape[1]
    context = max_context if max_context is not None else block_tables.shape[1] * page
    width = select_width(topk, context)
    token_req = token_requests(query_start_loc, q.shape[0])
    out = torch.empty(q.shape[0], width, dtype=torch.int32, device=q.device)
    for lo in range(0, q.shape[0], ROW_CHUNK):
        hi = min(lo + ROW_CHUNK, q.shape[0])
        logits = indexer_logits(q[lo:hi], weights[lo:hi], key_cache, block_tables, token_req[lo:hi],
                                positions[lo:hi], context, softmax_scale, key_scale=key_scale)
        out[lo:hi] = topk_of_scores(logits, width)
    return out
