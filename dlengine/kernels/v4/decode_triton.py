"""Triton decode attention for DeepSeek-V4 (one query token per request), same signature and
result as `reference.decode_attention`: one online softmax over the request's sliding-window ring
(positions max(0, p - W + 1) .. p at rows pos % W), then over the compressed entries it reads
(entry ids, -1 = none, gathered through the block table), then the per-head sink. A padded row
(state slot < 0) reads nothing and writes zeros.

A program handles one request and BLOCK_H heads: the single shared K=V head is loaded once per
tile for all of them (MQA). Runs on CPU under TRITON_INTERPRET=1 (tests/test_v4_kernels.py)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interpret_mode() -> bool:
    return _INTERPRET


@triton.jit
def online_update(q, k, valid, m_i, l_i, acc, scale, PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_H, BLOCK_N]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # nothing visible yet (a padded row): keep the sums at 0 instead of exp(-inf - -inf) = nan
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)
    p = tl.exp(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def attend_entry_tile(q, ids, comp_ptr, bt_row_ptr, per_block, stride_cb, stride_ce, offs_d, dmask,
                      m_i, l_i, acc, scale, PRECISION: tl.constexpr):
    """Attend one tile of compressed entries `ids` (-1 = none) of the request whose block-table
    row starts at `bt_row_ptr` (entry w: block w // per_block, row w % per_block)."""
    valid = ids >= 0
    ids = tl.where(valid, ids, 0)
    blk = tl.load(bt_row_ptr + ids // per_block, mask=valid, other=0)
    k = tl.load(comp_ptr + blk[:, None].to(tl.int64) * stride_cb + (ids % per_block)[:, None] * stride_ce
                + offs_d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0).to(q.dtype)
    return online_update(q, k, valid, m_i, l_i, acc, scale, PRECISION)


@triton.jit
def store_with_sink(m_i, l_i, acc, sinks_ptr, out_row_ptr, stride_oh, offs_h, hmask, offs_d, dmask):
    """Close the softmax with the per-head sink (a logit in the denominator only) and store."""
    sink = tl.load(sinks_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    m_new = tl.maximum(m_i, sink)
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.exp(sink - m_new)
    out = acc * alpha[:, None] / l_i[:, None]
    tl.store(out_row_ptr + offs_h[:, None] * stride_oh + offs_d[None, :], out.to(out_row_ptr.dtype.element_ty),
             mask=hmask[:, None] & dmask[None, :])


@triton.jit
def _v4_decode_kernel(q_ptr, ring_ptr, slots_ptr, pos_ptr, comp_ptr, bt_ptr, ids_ptr, sinks_ptr, out_ptr,
                      H, D, W, K, per_block, scale,
                      stride_qb, stride_qh, stride_rs, stride_rw, stride_cb, stride_ce, stride_btb, stride_idb,
                      stride_ob, stride_oh,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    hmask, dmask = offs_h < H, offs_d < D
    q = tl.load(q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    p = tl.load(pos_ptr + b)
    slot = tl.load(slots_ptr + b)
    # a padded row of a CUDA-graph batch (slot < 0) reads no ring row and no entry
    live = slot >= 0
    n_win = tl.where(live, tl.minimum(p + 1, W), 0)
    n_ids = tl.where(live, K, 0)
    slot = tl.maximum(slot, 0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(0, W, BLOCK_N):  # the window ring, newest first
        o = start + offs_n
        valid = o < n_win
        row = tl.where(valid, p - o, 0) % W
        k = tl.load(ring_ptr + slot * stride_rs + row[:, None] * stride_rw + offs_d[None, :],
                    mask=valid[:, None] & dmask[None, :], other=0.0).to(q.dtype)
        m_i, l_i, acc = online_update(q, k, valid, m_i, l_i, acc, scale, PRECISION)
    for start in range(0, K, BLOCK_N):  # the compressed entries this query reads
        o = start + offs_n
        ids = tl.load(ids_ptr + b * stride_idb + o, mask=o < n_ids, other=-1)
        m_i, l_i, acc = attend_entry_tile(q, ids, comp_ptr, bt_ptr + b * stride_btb, per_block, stride_cb, stride_ce,
                                    offs_d, dmask, m_i, l_i, acc, scale, PRECISION)
    store_with_sink(m_i, l_i, acc, sinks_ptr, out_ptr + b * stride_ob, stride_oh, offs_h, hmask, offs_d, dmask)


def decode_attention(q: torch.Tensor, window_kv: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                     window: int, compressed: torch.Tensor, block_tables: torch.Tensor, entry_ids: torch.Tensor,
                     compress_rate: int, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """See reference.decode_attention."""
    b, h, d = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    if b == 0:
        return out
    assert window_kv.stride(-1) == 1 and compressed.stride(-1) == 1
    ids = entry_ids.to(torch.int32).contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    block_h = max(16, min(64, triton.next_power_of_2(h)))
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 16 if _INTERPRET else 32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (b, triton.cdiv(h, block_h))
    _v4_decode_kernel[grid](
        q, window_kv, slots.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous(), compressed, bt, ids,
        sinks.float().contiguous(), out,
        h, d, window, ids.shape[1], compressed.shape[1], scale,
        q.stride(0), q.stride(1), window_kv.stride(0), window_kv.stride(1), compressed.stride(0), compressed.stride(1),
        bt.stride(0), ids.stride(0), out.stride(0), out.stride(1),
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n, PRECISION=precision,
        # a [64, 512] float32 accumulator over 4 warps would be 256 registers a thread (spilled):
        # 8 warps halve it, as the prefill kernel's default does (prefill_triton.default_config)
        num_warps=8 if block_h * block_d >= 64 * 256 and not _INTERPRET else 4)
    return out
