"""A request's recurrent state, read from a tensor-parallel prefill engine's ranks into a decode rank's slot.

The state travels like the KV heads (kv_shards.py): one leg per prefill rank, each reading from
that rank's staging state slot. Each side's slot holds the state of its own heads (layout.py,
StateGroupLayout), and the split is by head within every tensor part:

    slot = layer 0 | layer 1 | ...                      (layer_bytes apart)
    layer = conv [q | k | v channels] | ssm [value heads] (each tensor aligned, cache/specs.py)
    part  = head h0's rows | head h0+1's rows | ...     (bytes per head fixed by the model)

so a rank's conv channels are three ranges of the full conv (its q, its k and its v channels),
not one. A decode rank holding heads [d0, d1) reads, for each range [a, b) of them a prefill rank
holds, heads [a, b) of every (layer, part) of that rank's slot into the same heads of its own
staging slot: one byte segment per (layer, part), merged where both sides are contiguous (the
whole slot in one when both hold the same heads). The staging slot then has exactly the decode
cache's layout and is copied in whole (KVRegion.stage_state_in).

A state group that every rank keeps whole (not split: heads == 0) is read from one prefill rank,
picked by the decode rank to spread the load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dlengine.parallel.transfer.layout import KVLayout, Segment, StateGroupLayout, _coalesce
from dlengine.parallel.transfer.errors import HandshakeError, TransferError


@dataclass(frozen=True)
class StateRead:
    """What one prefill rank's slot gives a decode rank's: per state group, byte runs (offset in
    the remote slot, offset in the local slot, length)."""

    runs: tuple[tuple[tuple[int, int, int], ...], ...]  # [group] -> runs

    @property
    def nbytes(self) -> int:
        return sum(n for group in self.runs for _, _, n in group)

    def segments(self, remote: KVLayout, remote_slot: int, local: KVLayout, local_slot: int) -> list[Segment]:
        """Byte segments from `remote_slot` of the remote region into `local_slot` of ours."""
        for slot, layout, side in ((remote_slot, remote, "remote"), (local_slot, local, "local")):
            if not 0 <= slot < layout.num_state_slots:
                raise TransferError(f"{side} state slot {slot} is outside [0, {layout.num_state_slots})")
        out = []
        for runs, rg, lg, roff, loff in zip(self.runs, remote.state_groups, local.state_groups, remote.state_offsets,
                                            local.state_offsets):
            rbase, lbase = roff + remote_slot * rg.slot_bytes, loff + local_slot * lg.slot_bytes
            out += [(rbase + r, lbase + l, n) for r, l, n in runs]
        return _coalesce(out)


def head_runs(remote: StateGroupLayout, local: StateGroupLayout, heads: tuple[int, int]) -> list[tuple[int, int, int]]:
    """Runs copying heads [a, b) (model numbering, held by both slots) of every layer and part of
    a `remote` slot into a `local` one."""
    a, b = heads
    if remote.head_range == local.head_range:
        return [(0, 0, local.slot_bytes)]  # the same heads: the same bytes
    out = []
    for layer in range(local.num_layers):
        for (roff, per_head), (loff, _) in zip(remote.runs, local.runs):
            out.append((layer * remote.layer_bytes + roff + (a - remote.head_start) * per_head,
                        layer * local.layer_bytes + loff + (a - local.head_start) * per_head, (b - a) * per_head))
    return _coalesce(out)


def plan_state_reads(local: KVLayout, remotes: Sequence[KVLayout], decode_rank: int = 0) -> dict[int, StateRead]:
    """prefill rank -> what to read from its state slot, for a decode rank (or engine) whose
    region layout is `local`, from prefill ranks whose region layouts are `remotes` (in rank
    order): every head of the local slots exactly once. {} when the model keeps no state.
    Raises HandshakeError when the ranks' slots do not hold this model's state or do not cover
    our heads."""
    if not local.state_groups:
        return {}
    ranks = len(remotes)
    per_rank: list[list[list[tuple[int, int, int]]]] = [[[] for _ in local.state_groups] for _ in range(ranks)]
    for g, mine in enumerate(local.state_groups):
        theirs = []
        for r, remote in enumerate(remotes):
            if len(remote.state_groups) != len(local.state_groups) or not mine.same_state(remote.state_groups[g]):
                raise HandshakeError(f"prefill rank {r}'s state group {g} does not hold this model's state "
                                     f"({remote.state_groups[g:g + 1]} vs {mine})")
            theirs.append(remote.state_groups[g])
        if not mine.heads:  # every rank holds it whole
            per_rank[decode_rank % ranks][g] = [(0, 0, mine.slot_bytes)]
            continue
        d0, d1 = mine.head_range
        nxt = d0
        # heads in order: the first rank (by head start) holding the next head not read yet
        for r in sorted(range(ranks), key=lambda r: theirs[r].head_start):
            r0, r1 = theirs[r].head_range
            if r0 <= nxt < r1 and nxt < d1:
                end = min(d1, r1)
                per_rank[r][g] = head_runs(theirs[r], mine, (nxt, end))
                nxt = end
        if nxt < d1:
            raise HandshakeError(f"the prefill ranks' state slots hold heads "
                                 f"{[t.head_range for t in theirs]}, which do not cover this engine's "
                                 f"state heads [{d0}, {d1})")
    return {r: StateRead(tuple(tuple(g) for g in groups)) for r, groups in enumerate(per_rank)
            if any(groups)}


__all__ = ["StateRead", "head_runs", "plan_state_reads"]
