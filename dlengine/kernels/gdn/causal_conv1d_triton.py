"""Triton causal depthwise conv1d with a saved window. Torch reference and contract:
causal_conv1d_torch.py (same signatures).

- `causal_conv1d_varlen`: one program per (request, block of channels) walks the request's tokens
  in tiles; the K - 1 inputs before its first token come from its conv state slot (or zeros when it
  starts fresh), and the program rewrites that slot with the last K - 1 inputs at the end (it owns
  those channels of the slot, so the in-place update needs no other program to wait). A request
  may also ask for a checkpoint: the window before its token `offset` copied into another slot
  (prefix caching: the state at a block boundary inside this step).
- `causal_conv1d_update`: one token per request for decode. Slots and flags are device tensors
  read by the kernel, so the step never syncs with the host and can be captured in a CUDA graph;
  slot < 0 (PAD_STATE_SLOT, a padded row of a captured batch) touches no slot and outputs zeros.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

BLOCK_D = 64


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _conv_varlen_kernel(x_ptr, w_ptr, b_ptr, state_ptr, out_ptr, starts_ptr, lens_ptr, slots_ptr, resume_ptr,
                        ckpt_slot_ptr, ckpt_off_ptr, D, x_stride, s_slot_stride, s_d_stride,
                        K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    req = tl.program_id(0)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    dmask = d < D
    start = tl.load(starts_ptr + req)
    n = tl.load(lens_ptr + req)
    slot = tl.load(slots_ptr + req)
    resume = tl.load(resume_ptr + req) != 0
    cols = tl.arange(0, KP)  # window columns 0..K-2 hold positions -(K-1)..-1
    cmask = cols < K - 1
    state_row = state_ptr + slot * s_slot_stride + d[:, None] * s_d_stride + cols[None, :]
    prev = tl.load(state_row, mask=dmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    prev = tl.where(resume, prev, 0.0)  # a fresh request starts from zeros, whatever its slot holds
    bias = tl.zeros([BLOCK], tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    t_off = tl.arange(0, BLOCK_T)
    for t0 in range(0, n, BLOCK_T):
        t = t0 + t_off
        acc = tl.zeros([BLOCK_T, BLOCK], tl.float32) + bias[None, :]
        for j in tl.static_range(K):
            p = t - (K - 1) + j  # input position read by tap j, relative to the request's first token
            from_x = tl.load(x_ptr + (start + p)[:, None] * x_stride + d[None, :],
                             mask=(p >= 0)[:, None] & (t < n)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            # positions before the first token: column p + K - 1 of the saved window
            sel = (cols[None, :] == (p + K - 1)[:, None]).to(tl.float32)  # [BLOCK_T, KP]
            from_state = tl.sum(sel[:, None, :] * prev[None, :, :], axis=2)  # [BLOCK_T, BLOCK]
            xv = tl.where((p >= 0)[:, None], from_x, from_state)
            wj = tl.load(w_ptr + d * K + j, mask=dmask, other=0.0).to(tl.float32)
            acc += xv * wj[None, :]
        if SILU:
            acc = _silu(acc)
        tl.store(out_ptr + (start + t)[:, None] * x_stride + d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(t < n)[:, None] & dmask[None, :])
    # the window before position `e` (e = n: the new state; e = the checkpoint offset)
    ckpt_slot = tl.load(ckpt_slot_ptr + req)
    ckpt_off = tl.load(ckpt_off_ptr + req)
    for which in tl.static_range(2):
        if which == 0:
            e = ckpt_off
            dst = ckpt_slot
        else:
            e = n
            dst = slot
        if dst >= 0:
            p = e - (K - 1) + cols  # positions of the window's columns
            from_x = tl.load(x_ptr + (start + p)[None, :] * x_stride + d[:, None],
                             mask=dmask[:, None] & (cmask & (p >= 0))[None, :], other=0.0).to(tl.float32)
            src_col = p + K - 1  # the old window's column for positions < 0 (shift left by e)
            sel = (cols[None, :, None] == src_col[None, None, :]).to(tl.float32)  # [1, KP, KP]
            from_state = tl.sum(prev[:, :, None] * sel, axis=1)
            new = tl.where((p >= 0)[None, :], from_x, from_state)
            tl.store(state_ptr + dst * s_slot_stride + d[:, None] * s_d_stride + cols[None, :],
                     new.to(state_ptr.dtype.element_ty), mask=dmask[:, None] & cmask[None, :])


def _int_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64, device=device)


def causal_conv1d_varlen(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor, query_lens: Sequence[int],
                         state_slots: Sequence[int], has_initial_state: Sequence[bool], bias: torch.Tensor | None = None,
                         activation: str | None = "silu", checkpoint_slots: Sequence[int] | None = None,
                         checkpoint_offsets: Sequence[int] | None = None) -> torch.Tensor:
    """x [T, D], weight [D, K], conv_states [num_slots, D, K - 1] (updated in place) -> [T, D].
    `checkpoint_slots[i]` >= 0 also writes the window before token `checkpoint_offsets[i]` of
    request i (0 < offset < its length) into that slot."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal conv1d activation {activation!r} is not supported (silu or None)")
    x = x.contiguous()
    weight = weight.contiguous()
    num_reqs = len(query_lens)
    T, D = x.shape
    K = weight.shape[1]
    out = torch.empty_like(x)
    if num_reqs == 0 or T == 0:
        return out
    dev = x.device
    starts = [0]
    for n in query_lens[:-1]:
        starts.append(starts[-1] + n)
    ckpt_slots = checkpoint_slots if checkpoint_slots is not None else [-1] * num_reqs
    ckpt_offs = checkpoint_offsets if checkpoint_offsets is not None else [0] * num_reqs
    assert conv_states.stride(2) == 1, "conv state rows must be contiguous along the window"
    grid = (num_reqs, triton.cdiv(D, BLOCK_D))
    _conv_varlen_kernel[grid](
        x, weight, bias if bias is not None else weight, conv_states, out, _int_tensor(starts, dev),
        _int_tensor(query_lens, dev), _int_tensor(state_slots, dev), _int_tensor([int(r) for r in has_initial_state], dev),
        _int_tensor(ckpt_slots, dev), _int_tensor(ckpt_offs, dev), D, x.stride(0), conv_states.stride(0),
        conv_states.stride(1), K=K, KP=triton.next_power_of_2(max(K - 1, 1)), HAS_BIAS=bias is not None,
        SILU=activation is not None, BLOCK_T=16, BLOCK=BLOCK_D)
    return out


@triton.jit
def _conv_update_kernel(x_ptr, w_ptr, b_ptr, state_ptr, out_ptr, slots_ptr, resume_ptr, D, x_stride,
                        s_slot_stride, s_d_stride, K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SILU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    dmask = d < D
    slot = tl.load(slots_ptr + row)
    if slot >= 0:
        resume = tl.load(resume_ptr + row) != 0
        cols = tl.arange(0, KP)
        cmask = cols < K - 1
        ptrs = state_ptr + slot * s_slot_stride + d[:, None] * s_d_stride + cols[None, :]
        prev = tl.load(ptrs, mask=dmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        prev = tl.where(resume, prev, 0.0)
        x = tl.load(x_ptr + row * x_stride + d, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + d[:, None] * K + cols[None, :], mask=dmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.sum(prev * w.to(tl.float32), axis=1)
        acc += x * tl.load(w_ptr + d * K + (K - 1), mask=dmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        if SILU:
            acc = _silu(acc)
        tl.store(out_ptr + row * x_stride + d, acc.to(out_ptr.dtype.element_ty), mask=dmask)
        # shift the window left by one and append x
        sel = (cols[None, :, None] == (cols + 1)[None, None, :]).to(tl.float32)  # new col c <- old col c + 1
        shifted = tl.sum(prev[:, :, None] * sel, axis=1)
        new = tl.where((cols == K - 2)[None, :], x[:, None], shifted)
        tl.store(ptrs, new.to(state_ptr.dtype.element_ty), mask=dmask[:, None] & cmask[None, :])
    else:  # a padded row: no slot is read or written, and its output is defined (zeros)
        tl.store(out_ptr + row * x_stride + d, tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty), mask=dmask)


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor,
                         state_slots: torch.Tensor, has_initial_state: torch.Tensor, bias: torch.Tensor | None = None,
                         activation: str | None = "silu") -> torch.Tensor:
    """One token per request: x [B, D], conv_states [num_slots, D, K - 1] at `state_slots` [B]
    (device tensors: no host sync; slot < 0 skips the row's state and outputs zeros) -> [B, D]."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal conv1d activation {activation!r} is not supported (silu or None)")
    x = x.contiguous()
    weight = weight.contiguous()
    B, D = x.shape
    K = weight.shape[1]
    out = torch.empty_like(x)
    if B == 0:
        return out
    assert conv_states.stride(2) == 1, "conv state rows must be contiguous along the window"
    _conv_update_kernel[(B, triton.cdiv(D, BLOCK_D))](
        x, weight, bias if bias is not None else weight, conv_states, out, state_slots, has_initial_state, D,
        x.stride(0), conv_states.stride(0), conv_states.stride(1), K=K, KP=triton.next_power_of_2(max(K - 1, 1)),
        HAS_BIAS=bias is not None, SILU=activation is not None, BLOCK=BLOCK_D)
    return out
