"""Triton gated delta rule: the chunk form for prompts and the one-token recurrent update for
decode. The math, the contract and the torch references: gated_delta_rule_torch.py (same
signatures). q / k normalisation, q scaling and the key-head repetition happen in the kernels.

`gated_delta_rule_varlen`: one program per (request, value head, block of BV value columns). It
keeps the [Dk, BV] slice of the state in registers and walks the request's tokens in chunks of BT:
per chunk the WY-form corrected values come from the inverse of the unit lower-triangular
(I + A), built by forward substitution over the chunk's rows (BT steps of a [BT, BT] update),
and then everything is a matrix product. Sequential only over chunks of one request; requests,
heads and value blocks run in parallel. With a checkpoint asked for, the request's tokens are
chunked from that boundary (two segments) and the state at it is written to the checkpoint slot.

`recurrent_gated_delta_rule_update`: one token for each of B requests; slots and flags are device
tensors read by the kernel (no host sync, fixed shapes: capturable in a CUDA graph); slot < 0
(PAD_STATE_SLOT, a padded row of a captured batch) reads and writes no slot and outputs zeros.

Products use IEEE float32 (`input_precision="ieee"`): the state integrates every token of the
sequence, and TF32's 10-bit mantissa would drift from the reference beyond the tests' tolerance.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

CHUNK = 32  # tokens per chunk: a [BT, BT] inverse and [BT, Dk] tiles in registers


@triton.jit
def _l2norm_rows(x, L2NORM: tl.constexpr):
    if L2NORM:
        x = x * tl.rsqrt(tl.sum(x * x, axis=1) + 1e-6)[:, None]
    return x


@triton.jit
def _chunk_gdr_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, out_ptr, state_ptr, starts_ptr, lens_ptr, slots_ptr,
                      resume_ptr, ckpt_slot_ptr, ckpt_off_ptr, q_st, q_sh, k_st, k_sh, v_st, v_sh, g_st, b_st, o_st,
                      o_sh, s_slot, s_h, s_k, scale, DK, DV, RATIO: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, BT: tl.constexpr, L2NORM: tl.constexpr):
    req = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // RATIO
    start = tl.load(starts_ptr + req).to(tl.int64)
    n = tl.load(lens_ptr + req)
    slot = tl.load(slots_ptr + req)
    resume = tl.load(resume_ptr + req) != 0
    ckpt_slot = tl.load(ckpt_slot_ptr + req)
    ckpt_off = tl.load(ckpt_off_ptr + req)
    kk = tl.arange(0, BK)
    vv = tl.program_id(2) * BV + tl.arange(0, BV)
    kmask = kk < DK
    vmask = vv < DV
    s_tile = kk[:, None] * s_k + vv[None, :]
    smask = kmask[:, None] & vmask[None, :]
    S = tl.load(state_ptr + slot * s_slot + h * s_h + s_tile, mask=smask, other=0.0).to(tl.float32)
    S = tl.where(resume, S, 0.0)  # a fresh request starts from zeros, whatever its slot holds
    rows = tl.arange(0, BT)
    lower = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    eye = (rows[:, None] == rows[None, :]).to(tl.float32)
    split = tl.where(ckpt_slot >= 0, ckpt_off, 0)
    for seg in tl.static_range(2):
        if seg == 0:
            a = 0
            b = split
        else:
            a = split
            b = n
        for c0 in range(a, b, BT):
            t = c0 + rows
            tm = t < b
            tok = start + t
            q = tl.load(q_ptr + tok[:, None] * q_st + hk * q_sh + kk[None, :], mask=tm[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)
            k = tl.load(k_ptr + tok[:, None] * k_st + hk * k_sh + kk[None, :], mask=tm[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)
            q = _l2norm_rows(q, L2NORM) * scale
            k = _l2norm_rows(k, L2NORM)
            v = tl.load(v_ptr + tok[:, None] * v_st + h * v_sh + vv[None, :], mask=tm[:, None] & vmask[None, :],
                        other=0.0).to(tl.float32)
            g = tl.load(g_ptr + tok * g_st + h, mask=tm, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + tok * b_st + h, mask=tm, other=0.0).to(tl.float32)
            G = tl.cumsum(g, axis=0)
            G_last = tl.sum(g, axis=0)
            decay = tl.exp(tl.where(lower, G[:, None] - G[None, :], float("-inf")))
            kkt = tl.dot(k, tl.trans(k), input_precision="ieee")
            A = tl.where(strict, beta[:, None] * kkt * decay, 0.0)
            # (I + A)^-1 by forward substitution: row i = e_i - sum_j A_ij row_j (j < i)
            Ai = eye
            for i in range(1, BT):
                a_row = tl.sum(tl.where(rows[:, None] == i, A, 0.0), axis=0)  # A[i, :]
                upd = tl.sum(a_row[:, None] * Ai, axis=0)
                Ai = tl.where(rows[:, None] == i, Ai - upd[None, :], Ai)
            w_k = tl.dot(Ai, (beta * tl.exp(G))[:, None] * k, input_precision="ieee")
            w_v = tl.dot(Ai, beta[:, None] * v, input_precision="ieee")
            u = w_v - tl.dot(w_k, S, input_precision="ieee")  # corrected values [BT, BV]
            qk = tl.where(lower, tl.dot(q, tl.trans(k), input_precision="ieee") * decay, 0.0)
            o = tl.dot(tl.exp(G)[:, None] * q, S, input_precision="ieee") + tl.dot(qk, u, input_precision="ieee")
            tl.store(out_ptr + tok[:, None] * o_st + h * o_sh + vv[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=tm[:, None] & vmask[None, :])
            k_to_end = k * tl.exp(G_last - G)[:, None]
            S = tl.exp(G_last) * S + tl.dot(tl.trans(k_to_end), u, input_precision="ieee")
        if seg == 0:
            if ckpt_slot >= 0:
                tl.store(state_ptr + ckpt_slot * s_slot + h * s_h + s_tile, S.to(state_ptr.dtype.element_ty),
                         mask=smask)
    tl.store(state_ptr + slot * s_slot + h * s_h + s_tile, S.to(state_ptr.dtype.element_ty), mask=smask)


def _int_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([int(x) for x in values], dtype=torch.int64, device=device)


def _check_state(states: torch.Tensor) -> None:
    if states.stride(3) != 1:
        raise ValueError("gated delta rule states must be contiguous along Dv")


def _block_sizes(dk: int, dv: int) -> tuple[int, int]:
    bk = max(16, triton.next_power_of_2(dk))
    bv = max(16, min(64, triton.next_power_of_2(dv)))
    return bk, bv


def gated_delta_rule_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                            states: torch.Tensor, query_lens: Sequence[int], state_slots: Sequence[int],
                            has_initial_state: Sequence[bool], use_qk_l2norm: bool = True,
                            chunk_size: int = CHUNK, checkpoint_slots: Sequence[int] | None = None,
                            checkpoint_offsets: Sequence[int] | None = None) -> torch.Tensor:
    """Same contract as gated_delta_rule_torch.gated_delta_rule_varlen (`chunk_size` is a power
    of two >= 16 here: it is a tile dimension)."""
    T, hk, dk = k.shape
    hv, dv = v.shape[1], v.shape[2]
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    num_reqs = len(query_lens)
    if num_reqs == 0 or T == 0:
        return out
    _check_state(states)
    bt = max(16, triton.next_power_of_2(chunk_size))
    bk, bv = _block_sizes(dk, dv)
    dev = v.device
    starts = [0]
    for n in query_lens[:-1]:
        starts.append(starts[-1] + n)
    ckpt_slots = checkpoint_slots if checkpoint_slots is not None else [-1] * num_reqs
    ckpt_offs = checkpoint_offsets if checkpoint_offsets is not None else [0] * num_reqs
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g, beta = g.contiguous(), beta.contiguous()
    grid = (num_reqs, hv, triton.cdiv(dv, bv))
    _chunk_gdr_kernel[grid](
        q, k, v, g, beta, out, states, _int_tensor(starts, dev), _int_tensor(query_lens, dev),
        _int_tensor(state_slots, dev), _int_tensor(has_initial_state, dev), _int_tensor(ckpt_slots, dev),
        _int_tensor(ckpt_offs, dev), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), beta.stride(0), out.stride(0), out.stride(1), states.stride(0), states.stride(1),
        states.stride(2), dk ** -0.5, dk, dv, RATIO=hv // hk, BK=bk, BV=bv, BT=bt, L2NORM=use_qk_l2norm,
        num_warps=4)
    return out


@triton.jit
def _recurrent_update_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, out_ptr, state_ptr, slots_ptr, resume_ptr,
                             q_st, q_sh, k_st, k_sh, v_st, v_sh, g_st, b_st, o_st, o_sh, s_slot, s_h, s_k, scale,
                             DK, DV, RATIO: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                             L2NORM: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // RATIO
    slot = tl.load(slots_ptr + row)
    if slot >= 0:
        resume = tl.load(resume_ptr + row) != 0
        kk = tl.arange(0, BK)
        vv = tl.program_id(2) * BV + tl.arange(0, BV)
        kmask = kk < DK
        vmask = vv < DV
        ptrs = state_ptr + slot * s_slot + h * s_h + kk[:, None] * s_k + vv[None, :]
        smask = kmask[:, None] & vmask[None, :]
        S = tl.load(ptrs, mask=smask, other=0.0).to(tl.float32)
        S = tl.where(resume, S, 0.0)
        q = tl.load(q_ptr + row * q_st + hk * q_sh + kk, mask=kmask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row * k_st + hk * k_sh + kk, mask=kmask, other=0.0).to(tl.float32)
        if L2NORM:
            q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6)
            k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
        q = q * scale
        v = tl.load(v_ptr + row * v_st + h * v_sh + vv, mask=vmask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * g_st + h).to(tl.float32)
        beta = tl.load(beta_ptr + row * b_st + h).to(tl.float32)
        S = S * tl.exp(g)
        delta = beta * (v - tl.sum(S * k[:, None], axis=0))
        S = S + k[:, None] * delta[None, :]
        o = tl.sum(S * q[:, None], axis=0)
        tl.store(ptrs, S.to(state_ptr.dtype.element_ty), mask=smask)
        tl.store(out_ptr + row * o_st + h * o_sh + vv, o.to(out_ptr.dtype.element_ty), mask=vmask)
    else:  # a padded row: no slot is read or written, and its output is defined (zeros)
        vv = tl.program_id(2) * BV + tl.arange(0, BV)
        tl.store(out_ptr + row * o_st + h * o_sh + vv, tl.zeros([BV], dtype=out_ptr.dtype.element_ty), mask=vv < DV)


def recurrent_gated_delta_rule_update(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                      beta: torch.Tensor, states: torch.Tensor, state_slots: torch.Tensor,
                                      has_initial_state: torch.Tensor, use_qk_l2norm: bool = True) -> torch.Tensor:
    """Same contract as gated_delta_rule_torch.recurrent_gated_delta_rule_update (slot < 0 skips
    the row's state; its output is zeros)."""
    B, hk, dk = k.shape
    hv, dv = v.shape[1], v.shape[2]
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if B == 0:
        return out
    _check_state(states)
    bk, bv = _block_sizes(dk, dv)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g, beta = g.contiguous(), beta.contiguous()
    _recurrent_update_kernel[(B, hv, triton.cdiv(dv, bv))](
        q, k, v, g, beta, out, states, state_slots, has_initial_state, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), g.stride(0), beta.stride(0), out.stride(0), out.stride(1),
        states.stride(0), states.stride(1), states.stride(2), dk ** -0.5, dk, dv, RATIO=hv // hk, BK=bk, BV=bv,
        L2NORM=use_qk_l2norm, num_warps=4)
    return out
