"""The split-KV decode machinery the Triton GQA and MLA decode kernels share (kernels/attention/
paged_attention_triton.py, kernels/mla/mla_triton.py): how many splits a launch gets, the
per-device arrival counters, and the epilogue that stores a split's partial and lets the split
that arrives last merge them all (one launch, no second merge kernel).

Workspace layout (the Gluon MLA decode kernel writes the same one): normalised partial outputs
[rows, splits, ROW_DIM] float32, then their log2-sum-exp [rows, splits] at `lse_off`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int, num_sms: int,
                      min_keys_per_split: int = 256, max_splits: int = 64) -> int:
    """Power-of-two number of KV splits so that (requests x kv heads x splits) covers ~2 waves of
    the SMs, with at least `min_keys_per_split` keys per split. Correctness never depends on it."""
    base = max(1, num_seqs * num_kv_heads)
    want = -(-2 * num_sms // base)
    cap = max(1, max_seq_len // max(min_keys_per_split, block_n))
    splits = max(1, min(want, cap, max_splits))
    return 1 << (splits.bit_length() - 1)  # round down to a power of two (bounded recompiles)


_COUNTERS: dict = {}
_RETIRED: list = []  # outgrown counter buffers stay alive: captured CUDA graphs may point at them


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-(request, kv head) arrival counters of the split-KV decode. Zeroed once when allocated;
    the kernel resets every counter it uses, so they stay zero between launches (on one stream).
    Allocated on first use (eagerly, e.g. in a warm-up before CUDA-graph capture)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("triton decode: split counters must be allocated before CUDA-graph capture; "
                               "run one eager decode step of the largest batch first")
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


@triton.jit
def store_split_and_merge(acc, l_i, m_i, ws_ptr, lse_off, row, offs_d, num_splits, sp, n_active, cnt, o_ptrs,
                          row_ok, st_mask, ROW_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Split-KV decode epilogue shared by the GQA and MLA kernels: store this split's normalised
    partial output (ws rows `row`, columns `offs_d` of ROW_DIM) and its log-sum-exp, then the
    program that arrives last at the `cnt` counter merges all n_active splits into o_ptrs (one
    launch, no second kernel) and resets the counter for the next launch."""
    tl.store(ws_ptr + (row[:, None] * num_splits + sp) * ROW_DIM + offs_d[None, :], acc / l_i[:, None], mask=st_mask)
    tl.store(ws_ptr + lse_off + row * num_splits + sp, m_i + tl.math.log2(l_i), mask=row_ok)
    # publish: every thread's stores, then one acq_rel atomic per program
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt, 1, sem="acq_rel")
    if ticket == n_active - 1:
        tl.atomic_xchg(cnt, 0, sem="relaxed")  # ready for the next launch
        o = merge_split_partials(ws_ptr, lse_off, row, offs_d, num_splits, n_active, row_ok, st_mask,
                                 ROW_DIM, BLOCK_H, BLOCK_D)
        tl.store(o_ptrs, o.to(o_ptrs.dtype.element_ty), mask=st_mask)


@triton.jit
def merge_split_partials(ws_ptr, lse_off, row, offs_d, num_splits, n_active, row_ok, st_mask,
                         ROW_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """The first n_active split partials of workspace rows `row` ([rows, splits, ROW_DIM] normalised
    outputs, their log2-sum-exp at lse_off), merged: [BLOCK_H, BLOCK_D] float32. (The Gluon MLA
    decode kernel writes the same workspace layout and merges it with all splits loaded at once,
    kernels/mla/mla_decode_gluon.py `_merge_kernel`.)"""
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    o = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_active):
        lse_s = tl.load(ws_ptr + lse_off + row * num_splits + s, mask=row_ok, other=0.0, cache_modifier=".cg")
        o_s = tl.load(ws_ptr + (row[:, None] * num_splits + s) * ROW_DIM + offs_d[None, :],
                      mask=st_mask, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse_s)
        alpha = tl.math.exp2(m - m_new)
        w = tl.math.exp2(lse_s - m_new)
        o = o * alpha[:, None] + o_s * w[:, None]
        l = l * alpha + w
        m = m_new
    return o / l[:, None]


__all__ = ["choose_num_splits", "merge_split_partials", "split_counters", "store_split_and_merge"]
