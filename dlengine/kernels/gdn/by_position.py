"""The Gated DeltaNet state ops of a speculative verify step (kernels/context.py StatePositions).

A request verifying d drafts feeds 1 + d tokens. Their conv window and delta-rule state are
advanced one position at a time with the one-token decode ops (`causal_conv1d_update`,
`gated_delta_rule_update` of the kernel table: Triton or the torch references), which update the
slot in place, and after position j < d the slot's state is copied to a snapshot slot, so the core
can make the slot hold the state after any accepted prefix (cache/state_rollback.py). Requests
feeding a prompt chunk in the same step run the varlen ops on their own rows.

Why position by position rather than the chunk kernel with a checkpoint per draft: the drafts are
few (k <= a handful), the one-token ops are exactly what plain decoding runs (the state follows
the same arithmetic token for token), and a position group needs only device tensors of fixed
shapes, so a verify step is captured in a CUDA graph like a decode step.
"""

from __future__ import annotations

import torch

from dlengine.kernels.context import PositionGroup, StatePositions
from dlengine.kernels.gdn.slot_rows import write_slots


def copy_slots(states: torch.Tensor, group: PositionGroup) -> None:
    """states[dst[i]] = states[src[i]] for the group's snapshot rows with dst >= 0 (device tensors,
    no host sync: capturable)."""
    if group.snapshot_dst is None:
        return
    rows = states.index_select(0, group.snapshot_src.clamp(min=0))
    write_slots(states, group.snapshot_dst, rows)


def _checkpoints(plan: StatePositions) -> dict:
    if plan.varlen_checkpoint_slots is None:
        return {}
    return dict(checkpoint_slots=plan.varlen_checkpoint_slots, checkpoint_offsets=plan.varlen_checkpoint_offsets)


def causal_conv1d_by_position(ops, x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor,
                              plan: StatePositions) -> torch.Tensor:
    """The conv1d of a verify step: x [T, D] -> [T, D], conv windows updated (and snapshotted)."""
    out = torch.empty_like(x)
    if plan.varlen_rows is not None:
        r = plan.varlen_rows
        out[r] = ops.causal_conv1d_varlen(x[r], weight, conv_states, plan.varlen_query_lens, plan.varlen_state_slots,
                                          plan.varlen_has_initial_state, **_checkpoints(plan))
    for group in plan.groups:
        out[group.rows] = ops.causal_conv1d_update(x[group.rows], weight, conv_states, group.slots,
                                                   group.has_initial_state)
        copy_slots(conv_states, group)
    return out


def gated_delta_rule_by_position(ops, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                 beta: torch.Tensor, states: torch.Tensor, plan: StatePositions) -> torch.Tensor:
    """The gated delta rule of a verify step: q, k [T, Hk, Dk], v [T, Hv, Dv], g, beta [T, Hv] ->
    [T, Hv, Dv] in v's dtype, states updated (and snapshotted)."""
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if plan.varlen_rows is not None:
        r = plan.varlen_rows
        out[r] = ops.gated_delta_rule_varlen(q[r], k[r], v[r], g[r], beta[r], states, plan.varlen_query_lens,
                                             plan.varlen_state_slots, plan.varlen_has_initial_state,
                                             **_checkpoints(plan))
    for group in plan.groups:
        r = group.rows
        out[r] = ops.gated_delta_rule_update(q[r], k[r], v[r], g[r], beta[r], states, group.slots,
                                             group.has_initial_state)
        copy_slots(states, group)
    return out
