"""The gated delta rule (Gated DeltaNet, Yang et al. 2024), as Qwen3-Next and Qwen3.5 use it.

Per head, the state S is a [Dk, Dv] matrix (a fast-weight memory from keys to values). Token t
with query q_t, key k_t, value v_t, log-decay g_t <= 0 and write strength beta_t in (0, 1):

    S <- exp(g_t) * S                          forget
    S <- S + k_t (beta_t * (v_t - S^T k_t))^T  delta rule: write only what S mispredicts
    o_t = S^T q_t

q and k are L2-normalised first (`use_qk_l2norm`, eps 1e-6 as fla) and q is scaled by Dk^-0.5.
With fewer key heads than value heads, key head h serves value heads [h * r, (h + 1) * r).
Everything is computed in float32; the state is kept in its cache's dtype (float32 here).

Three forms, equal up to rounding:
- `gated_delta_rule_naive`: the loop above, token by token (the test oracle).
- `chunk_gated_delta_rule`: chunks of C tokens. Inside a chunk with cumulative log-decay
  G_i = g_1 + .. + g_i and incoming state S0, the corrected values u solve a unit lower-triangular
  system (I + A) u = beta * v - beta * exp(G) * K S0 with A_ij = beta_i exp(G_i - G_j) k_i.k_j
  (j < i); then o_i = exp(G_i) S0^T q_i + sum_{j<=i} exp(G_i - G_j) (q_i.k_j) u_j and
  S_C = exp(G_C) S0 + sum_j exp(G_C - G_j) k_j u_j^T. Matrix products instead of a length-C loop.
- `recurrent_gated_delta_rule_update`: one token for each of B requests, batched (decode).

`gated_delta_rule_varlen` runs a varlen batch through the chunk form, each request continuing
from its cache slot's state (or zeros when it starts fresh) and leaving its final state there.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dlengine.kernels.gdn.slot_rows import read_slots, write_slots, zero_padded_rows


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def prepare_qk(q: torch.Tensor, k: torch.Tensor, num_v_heads: int, use_qk_l2norm: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 q (normalised, scaled) and k (normalised), [..., Hv, Dk] each: key heads repeated
    for the value heads they serve."""
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    ratio = num_v_heads // q.shape[-2]
    if ratio > 1:
        q, k = q.repeat_interleave(ratio, dim=-2), k.repeat_interleave(ratio, dim=-2)
    return q * q.shape[-1] ** -0.5, k


def gated_delta_rule_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, token by token. q, k [L, H, Dk] (prepared: see `prepare_qk`), v [L, H, Dv],
    g, beta [L, H], initial_state [H, Dk, Dv] or None (zeros) -> (out [L, H, Dv], final state),
    float32."""
    L, H, dk = k.shape
    state = (torch.zeros(H, dk, v.shape[-1], dtype=torch.float32, device=v.device) if initial_state is None
             else initial_state.float().clone())
    out = torch.empty(L, H, v.shape[-1], dtype=torch.float32, device=v.device)
    for t in range(L):
        state = state * g[t].float().exp()[:, None, None]
        predicted = torch.einsum("hkv,hk->hv", state, k[t])
        delta = beta[t].float()[:, None] * (v[t].float() - predicted)
        state = state + k[t][:, :, None] * delta[:, None, :]
        out[t] = torch.einsum("hkv,hk->hv", state, q[t])
    return out, state


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           initial_state: torch.Tensor | None = None, chunk_size: int = 64
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `gated_delta_rule_naive`, computed chunk by chunk (see the module doc)."""
    L, H, dk = k.shape
    dv = v.shape[-1]
    # heads first: [H, L, D]
    q, k, v = (x.float().transpose(0, 1) for x in (q, k, v))
    g, beta = g.float().t(), beta.float().t()
    state = (torch.zeros(H, dk, dv, dtype=torch.float32, device=v.device) if initial_state is None
             else initial_state.float().clone())
    out = torch.empty(H, L, dv, dtype=torch.float32, device=v.device)
    for s in range(0, L, chunk_size):
        qc, kc, vc = q[:, s:s + chunk_size], k[:, s:s + chunk_size], v[:, s:s + chunk_size]
        gc, bc = g[:, s:s + chunk_size], beta[:, s:s + chunk_size]
        n = kc.shape[1]
        cum = gc.cumsum(-1)  # G_i
        lower = torch.ones(n, n, dtype=torch.bool, device=v.device).tril()
        # exp(G_i - G_j) on and below the diagonal, 0 above (masked before exp: no overflow)
        decay = (cum[:, :, None] - cum[:, None, :]).masked_fill(~lower, float("-inf")).exp()
        a = (bc[:, :, None] * (kc @ kc.transpose(1, 2)) * decay).tril(-1)
        eye = torch.eye(n, dtype=torch.float32, device=v.device)
        rhs = torch.cat([bc[..., None] * vc, (bc * cum.exp())[..., None] * kc], dim=-1)
        solved = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
        w_v, w_k = solved[..., :dv], solved[..., dv:]
        u = w_v - w_k @ state  # corrected values [H, n, Dv]
        out[:, s:s + n] = (cum.exp()[..., None] * qc) @ state + ((qc @ kc.transpose(1, 2)) * decay) @ u
        to_end = (cum[:, -1:] - cum).exp()  # exp(G_C - G_j)
        state = cum[:, -1].exp()[:, None, None] * state + (kc * to_end[..., None]).transpose(1, 2) @ u
    return out.transpose(0, 1), state


def gated_delta_rule_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                            states: torch.Tensor, query_lens: Sequence[int], state_slots: Sequence[int],
                            has_initial_state: Sequence[bool], use_qk_l2norm: bool = True,
                            chunk_size: int = 64, checkpoint_slots: Sequence[int] | None = None,
                            checkpoint_offsets: Sequence[int] | None = None) -> torch.Tensor:
    """A varlen batch: q, k [T, Hk, Dk], v [T, Hv, Dv], g, beta [T, Hv]; request i owns the next
    `query_lens[i]` tokens and the state `states[state_slots[i]]` ([num_slots, Hv, Dk, Dv],
    updated in place), resumed when `has_initial_state[i]`, else zeros -> out [T, Hv, Dv] in v's
    dtype. `checkpoint_slots[i]` >= 0 also saves the state before token `checkpoint_offsets[i]`
    of request i (0 < offset < its length) in that slot (prefix caching: the state at a block
    boundary inside this step); the request's tokens are then chunked from that boundary."""
    q, k = prepare_qk(q, k, v.shape[1], use_qk_l2norm)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    start = 0
    ckpt_slots = checkpoint_slots if checkpoint_slots is not None else [-1] * len(query_lens)
    ckpt_offs = checkpoint_offsets if checkpoint_offsets is not None else [0] * len(query_lens)
    for n, slot, resume, c_slot, c_off in zip(query_lens, state_slots, has_initial_state, ckpt_slots, ckpt_offs):
        state = states[slot] if resume else None
        bounds = [0, c_off, n] if c_slot >= 0 else [0, n]
        for a, b in zip(bounds, bounds[1:]):
            o, state = chunk_gated_delta_rule(q[start + a:start + b], k[start + a:start + b], v[start + a:start + b],
                                              g[start + a:start + b], beta[start + a:start + b], state, chunk_size)
            out[start + a:start + b] = o.to(v.dtype)
            if c_slot >= 0 and b == c_off:
                states[c_slot] = state.to(states.dtype)
        states[slot] = state.to(states.dtype)
        start += n
    return out


def recurrent_gated_delta_rule_update(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                      beta: torch.Tensor, states: torch.Tensor, state_slots: torch.Tensor,
                                      has_initial_state: torch.Tensor, use_qk_l2norm: bool = True) -> torch.Tensor:
    """One token for each of B requests: q, k [B, Hk, Dk], v [B, Hv, Dv], g, beta [B, Hv]; states
    [num_slots, Hv, Dk, Dv] read and written at `state_slots` [B] (requests whose
    `has_initial_state` is False start from zeros). Device tensors only: no host sync, capturable.
    A row with slot < 0 (PAD_STATE_SLOT: CUDA-graph padding) writes no slot and outputs zeros."""
    q, k = prepare_qk(q, k, v.shape[1], use_qk_l2norm)
    state = read_slots(states, state_slots, has_initial_state).float()
    state = state * g.float().exp()[..., None, None]
    predicted = torch.einsum("bhkv,bhk->bhv", state, k)
    delta = beta.float()[..., None] * (v.float() - predicted)
    state = state + k[..., :, None] * delta[..., None, :]
    write_slots(states, state_slots, state)
    return zero_padded_rows(torch.einsum("bhkv,bhk->bhv", state, q).to(v.dtype), state_slots)
