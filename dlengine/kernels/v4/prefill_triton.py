"""Triton prompt-step (prefill, chunked prefill, extend) attention for DeepSeek-V4, same signature
and result as `reference.prefill_attention`: for every query token of every request in the step,
one online softmax over

  (a) its sliding window, positions max(0, p - W + 1) .. p, read from this step's new keys (at and
      after the request's first new position s) or from the window ring (before s: the ring must
      not hold this step's keys yet, the layer writes them after the attention);
  (b) the compressed entries it reads, through the request's block table: the listed entry ids
      (CSA: the indexer's top-k, valid ids first, -1 padded), or every finished entry
      w < (p + 1) // m (HCA, no ids: the kernel derives them from the position);
  (c) the per-head attention sink (a logit with no value).

A program handles one query token and BLOCK_H of its heads: the single shared K = V head is
loaded once per key tile for all of them (MQA), the same tiling as the decode kernel
(decode_triton.py, whose online-softmax step it shares). One query per program (not a block of
consecutive queries) because each CSA query reads its own set of entries; consecutive queries'
windows overlap, so those key tiles come from L2. Requests are found on the device from
query_start_loc, so one launch serves the whole step, with no host sync.

Runs on CPU under TRITON_INTERPRET=1 (tests/test_v4_kernels.py; bf16 inputs are upcast to float32
there, because the interpreter's bf16 dots are wrong); tests/test_gpu_v4.py checks and times it
at V4-Flash's dimensions on an H100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dlengine.kernels.v4.decode_triton import _INTERPRET, attend_entry_tile, online_update, store_with_sink


@triton.jit
def _v4_prefill_kernel(q_ptr, kv_ptr, ring_ptr, pos_ptr, req_ptr, qsl_ptr, slots_ptr, comp_ptr, bt_ptr, ids_ptr,
                       sinks_ptr, out_ptr,
                       H, D, W, K, m, per_block, scale,
                       stride_qt, stride_qh, stride_kvt, stride_rs, stride_rw, stride_cb, stride_ce, stride_btb,
                       stride_idt, stride_ot, stride_oh,
                       ALL_ENTRIES: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # the query row (int64: T * H * D can pass 2^31)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    hmask, dmask = offs_h < H, offs_d < D
    q = tl.load(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 dots are wrong: every key follows q's dtype, float32 here
        q = q.to(tl.float32)
    p = tl.load(pos_ptr + t)
    b = tl.load(req_ptr + t)
    first_row = tl.load(qsl_ptr + b).to(tl.int64)  # the request's first row in this step
    s = tl.load(pos_ptr + first_row)  # ... and its position: keys before it live in the ring
    slot = tl.load(slots_ptr + b).to(tl.int64)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)

    n_win = tl.minimum(p + 1, W)
    for start in range(0, n_win, BLOCK_N):  # (a) the window, newest first
        o = start + offs_n
        valid = o < n_win
        j = tl.where(valid, p - o, s)  # key positions (>= 0 where valid)
        new, old = valid & (j >= s), valid & (j < s)
        k_new = tl.load(kv_ptr + (first_row + j - s)[:, None] * stride_kvt + offs_d[None, :],
                        mask=new[:, None] & dmask[None, :], other=0.0)
        k_old = tl.load(ring_ptr + slot * stride_rs + (j % W)[:, None] * stride_rw + offs_d[None, :],
                        mask=old[:, None] & dmask[None, :], other=0.0)
        k = tl.where(new[:, None], k_new.to(q.dtype), k_old.to(q.dtype))
        m_i, l_i, acc = online_update(q, k, valid, m_i, l_i, acc, scale, PRECISION)

    # (b) the compressed entries: never more than the finished ones, (p + 1) // m (CSA lists its
    # valid ids first, so the ids past that are all -1 and need no reading)
    n_ent = (p + 1) // m
    if not ALL_ENTRIES:
        n_ent = tl.minimum(n_ent, K)
    for start in range(0, n_ent, BLOCK_N):
        o = start + offs_n
        inside = o < n_ent
        if ALL_ENTRIES:
            ids = tl.where(inside, o, -1)
        else:
            ids = tl.load(ids_ptr + t * stride_idt + o, mask=inside, other=-1)
        m_i, l_i, acc = attend_entry_tile(q, ids, comp_ptr, bt_ptr + b * stride_btb, per_block, stride_cb, stride_ce,
                                    offs_d, dmask, m_i, l_i, acc, scale, PRECISION)

    # (c) the sink: in the denominator only
    store_with_sink(m_i, l_i, acc, sinks_ptr, out_ptr + t * stride_ot, stride_oh, offs_h, hmask, offs_d, dmask)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one launch: heads per program, keys per tile, warps, pipeline stages."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int


def default_config(num_heads: int, head_dim: int) -> LaunchConfig:
    """The tiles used unless a caller passes its own (tests/test_gpu_v4.py times alternatives).

    Up to 64 heads per program, the M of one Hopper warpgroup MMA: at V4-Flash's 64 heads one
    program per query reads each key tile once. Its [64, 512] float32 accumulator needs 8 warps
    (128 registers a thread); 32-key tiles of 512 dims are 32 KiB a stage."""
    block_h = max(16, min(64, triton.next_power_of_2(num_heads)))
    if _INTERPRET:
        return LaunchConfig(block_h, 16, 4, 1)
    return LaunchConfig(block_h, 32, 8 if head_dim >= 256 else 4, 2)


def prefill_attention(q: torch.Tensor, kv: torch.Tensor, window_kv: torch.Tensor, positions: torch.Tensor,
                      query_start_loc: torch.Tensor, slots: torch.Tensor, window: int, compressed: torch.Tensor,
                      block_tables: torch.Tensor, entry_ids: torch.Tensor | None, compress_rate: int,
                      sinks: torch.Tensor, scale: float, config: LaunchConfig | None = None) -> torch.Tensor:
    """See reference.prefill_attention. `config`: the tiles (default_config when None)."""
    t, h, d = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    if t == 0:
        return out
    kv = kv.contiguous()
    assert window_kv.stride(-1) == 1 and compressed.stride(-1) == 1
    qsl = query_start_loc.to(torch.int32).contiguous()
    # each row's request: how many requests end at or before it (no host sync)
    rows = torch.arange(t, device=q.device, dtype=torch.int32)
    req = torch.searchsorted(qsl[1:], rows, right=True).to(torch.int32)
    all_entries = entry_ids is None
    ids = qsl[None, :] if all_entries else entry_ids.to(torch.int32).contiguous()  # HCA: never read
    bt = block_tables.to(torch.int32).contiguous()
    cfg = config or default_config(h, d)
    grid = (t, triton.cdiv(h, cfg.block_h))
    _v4_prefill_kernel[grid](
        q, kv, window_kv, positions.to(torch.int64).contiguous(), req, qsl, slots.to(torch.int64).contiguous(),
        compressed, bt, ids, sinks.float().contiguous(), out,
        h, d, window, 0 if all_entries else ids.shape[1], compress_rate, compressed.shape[1], scale,
        q.stride(0), q.stride(1), kv.stride(0), window_kv.stride(0), window_kv.stride(1), compressed.stride(0),
        compressed.stride(1), bt.stride(0), 0 if all_entries else ids.stride(0), out.stride(0), out.stride(1),
        ALL_ENTRIES=all_entries, BLOCK_H=cfg.block_h, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_N=cfg.block_n, PRECISION="ieee" if q.dtype == torch.float32 or _INTERPRET else "tf32",
        UPCAST=_INTERPRET and q.dtype != torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
