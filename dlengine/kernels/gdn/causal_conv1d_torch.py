"""Causal depthwise conv1d over a varlen batch, continuing from each request's saved window.

A Gated DeltaNet layer convolves its q/k/v channels along time with a short kernel (K = 4 in the
released models): out[t, c] = act(sum_j w[c, j] * x[t - K + 1 + j, c]). The K - 1 inputs before a
request's first token of this step come from its conv state (the last K - 1 inputs it has seen,
channels-first [D, K - 1] as fla / causal-conv1d keep it), or are zeros when the request starts
fresh. After the step the state holds the last K - 1 inputs again (prompt chunks shorter than
K - 1 keep part of the old window).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from dlengine.kernels.gdn.slot_rows import read_slots, write_slots, zero_padded_rows


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"causal conv1d activation {activation!r} is not supported (silu or None)")


def causal_conv1d_varlen(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor, query_lens: Sequence[int],
                         state_slots: Sequence[int], has_initial_state: Sequence[bool], bias: torch.Tensor | None = None,
                         activation: str | None = "silu", checkpoint_slots: Sequence[int] | None = None,
                         checkpoint_offsets: Sequence[int] | None = None) -> torch.Tensor:
    """x [T, D] (requests' tokens one after another, `query_lens` each), weight [D, K],
    conv_states [num_slots, D, K - 1] (updated in place at `state_slots`) -> [T, D].
    `checkpoint_slots[i]` >= 0 also saves the window before token `checkpoint_offsets[i]` of
    request i (0 < offset < its length) in that slot: the state at a block boundary inside this
    step, for prefix caching."""
    k = weight.shape[1]
    out = torch.empty_like(x)
    start = 0
    ckpt_slots = checkpoint_slots if checkpoint_slots is not None else [-1] * len(query_lens)
    ckpt_offs = checkpoint_offsets if checkpoint_offsets is not None else [0] * len(query_lens)
    for n, slot, resume, c_slot, c_off in zip(query_lens, state_slots, has_initial_state, ckpt_slots, ckpt_offs):
        seg = x[start:start + n].t()  # [D, n]
        prev = conv_states[slot].to(x.dtype) if resume else x.new_zeros(x.shape[1], k - 1)
        window = torch.cat([prev, seg], dim=1)  # [D, K - 1 + n]; column j is position j - (K - 1)
        y = F.conv1d(window.unsqueeze(0).to(weight.dtype), weight.unsqueeze(1), bias, groups=x.shape[1])[0]
        out[start:start + n] = _activate(y, activation).t().to(x.dtype)
        if c_slot >= 0:
            conv_states[c_slot] = window[:, c_off:c_off + k - 1].to(conv_states.dtype)
        conv_states[slot] = window[:, -(k - 1):].to(conv_states.dtype)
        start += n
    return out


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor,
                         state_slots: torch.Tensor, has_initial_state: torch.Tensor, bias: torch.Tensor | None = None,
                         activation: str | None = "silu") -> torch.Tensor:
    """One new token per request: x [B, D], conv_states [num_slots, D, K - 1] read and written at
    `state_slots` [B] (device tensors throughout: no host sync, capturable). Requests whose
    `has_initial_state` [B] is False (a one-token prompt) start from a zero window -> [B, D].
    A row with slot < 0 (PAD_STATE_SLOT: CUDA-graph padding) writes no slot and outputs zeros."""
    prev = read_slots(conv_states, state_slots, has_initial_state).to(x.dtype)
    window = torch.cat([prev, x.unsqueeze(-1)], dim=-1)  # [B, D, K]
    y = (window.to(weight.dtype) * weight).sum(-1)
    if bias is not None:
        y = y + bias
    write_slots(conv_states, state_slots, window[..., 1:])
    return zero_padded_rows(_activate(y, activation).to(x.dtype), state_slots)
