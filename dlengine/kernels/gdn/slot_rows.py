"""Reading and writing one state slot per batch row in torch, for the decode references
(causal_conv1d_torch.causal_conv1d_update, gated_delta_rule_torch.recurrent_gated_delta_rule_update).

A row whose slot is negative (`PAD_STATE_SLOT`, a padded row of a captured CUDA-graph batch)
reads zeros and writes nothing. Both helpers work on device tensors only, with shapes fixed by
the batch: no host sync, no data-dependent shapes (no boolean-mask indexing), so a decode step
on the references can be captured too. The Triton kernels get the same rule from a branch on the
slot inside each program.
"""

from __future__ import annotations

import torch


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] mask -> [B, 1, ...] broadcastable against `like` ([B, ...])."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def read_slots(states: torch.Tensor, slots: torch.Tensor, resume: torch.Tensor) -> torch.Tensor:
    """states[slots[i]] for each row ([B, *state]), zeros for rows that start fresh
    (`resume[i]` False) or are padding (slot < 0). A copy: writing it changes no slot."""
    rows = states.index_select(0, slots.clamp(min=0))
    keep = (slots >= 0) & resume
    return torch.where(_rows(keep, rows), rows, torch.zeros_like(rows))


def write_slots(states: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
    """states[slots[i]] = new[i] for every row with slot >= 0; padded rows leave every slot as it
    was. Without a host sync the padded rows cannot be dropped from the scatter, so each of them
    writes exactly what another write to the same slot holds: the first live row's value to that
    row's slot, or, when no row is live, slot 0's own value back to slot 0. (Duplicate indices of
    an index_put are safe only because their values are identical.)"""
    if slots.numel() == 0:
        return
    live = slots >= 0
    new = new.to(states.dtype)
    first = torch.argmax(live.to(torch.int32)).view(1)  # the first live row (0 when none is)
    first_live = live.index_select(0, first)
    fill_slot = torch.where(first_live, slots.index_select(0, first), torch.zeros_like(first))
    fill = torch.where(_rows(first_live, new[:1]), new.index_select(0, first), states.index_select(0, fill_slot))
    target = torch.where(live, slots, fill_slot)
    states.index_put_((target,), torch.where(_rows(live, new), new, fill))


def zero_padded_rows(out: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`out` with the rows of padded slots set to zero (what the Triton kernels write there)."""
    return torch.where(_rows(slots >= 0, out), out, torch.zeros_like(out))
