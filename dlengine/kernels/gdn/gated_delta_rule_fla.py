"""The chunk gated delta rule through fla-core (flash-linear-attention's kernels, an optional
extra: `pip install flash-linear-attention`), when it imports. Same contract as
gated_delta_rule_torch.gated_delta_rule_varlen.

fla runs a varlen batch through `cu_seqlens` with per-sequence initial and final states
([N, H, Dk, Dv], float32, the layout of our state slots), so the wrapper gathers the requests'
slots (zeros for fresh ones), calls fla once and scatters the final states back. fla has no way to
return the state at a position inside a sequence, so a step that asks for a prefix-cache
checkpoint runs our Triton kernel instead (gated_delta_rule_triton.py).
"""

from __future__ import annotations

from typing import Sequence

import torch

from dlengine.kernels.gdn import gated_delta_rule_triton

from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk  # noqa: E402  (ImportError: no fla)


def gated_delta_rule_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                            states: torch.Tensor, query_lens: Sequence[int], state_slots: Sequence[int],
                            has_initial_state: Sequence[bool], use_qk_l2norm: bool = True,
                            chunk_size: int = 64, checkpoint_slots: Sequence[int] | None = None,
                            checkpoint_offsets: Sequence[int] | None = None) -> torch.Tensor:
    if checkpoint_slots is not None and any(s >= 0 for s in checkpoint_slots):
        return gated_delta_rule_triton.gated_delta_rule_varlen(
            q, k, v, g, beta, states, query_lens, state_slots, has_initial_state, use_qk_l2norm,
            checkpoint_slots=checkpoint_slots, checkpoint_offsets=checkpoint_offsets)
    hv = v.shape[1]
    ratio = hv // k.shape[1]
    if ratio > 1:  # value heads sharing a key head: fla takes one q / k per value head
        q, k = q.repeat_interleave(ratio, dim=1), k.repeat_interleave(ratio, dim=1)
    dev = v.device
    cu = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(list(query_lens), dtype=torch.int64).cumsum(0)
    slots = torch.tensor(list(state_slots), dtype=torch.int64, device=dev)
    resume = torch.tensor([bool(r) for r in has_initial_state], dtype=torch.bool, device=dev)
    init = states[slots].float()
    init = torch.where(resume.view(-1, 1, 1, 1), init, torch.zeros_like(init))
    out, final = _fla_chunk(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), g.float().unsqueeze(0),
                            beta.unsqueeze(0).to(v.dtype), scale=q.shape[-1] ** -0.5, initial_state=init,
                            output_final_state=True, cu_seqlens=cu.to(dev), use_qk_l2norm_in_kernel=use_qk_l2norm)
    states[slots] = final.to(states.dtype)
    return out[0].to(v.dtype)
