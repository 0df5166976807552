"""A decode rank's view of a (possibly tensor-parallel) prefill engine's kv_transfer_params.

A prefill engine under tensor parallelism hands off one KV shard per rank: rank 0's params carry
`tp_size` and the other ranks' params in `shards` (dlengine.parallel.lockstep). A decode rank
(the only one of a tp=1 decode engine, or one of a tensor-parallel decode engine, each keeping
its own heads) pulls each prefill rank's KV as one *leg* of the pull: its own peer, handshake,
read, pin check and done slot. Which ranks it reads, and which of their heads it keeps, is
kv_shards.plan_slices: per distinct head range of the prefill split overlapping its own heads,
one rank holding it. The other ranks (replicated kv heads, MLA's whole latent read from another
rank, heads of other decode ranks) are legs that read nothing but are still handshaken and told
when the decode side is done, so every prefill rank frees its blocks. Unsharded params are a
prefill engine of tp=1: one leg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dlengine.disagg.params import KVTransferParams, check_shards
from dlengine.parallel.transfer.base import KVLayout
from dlengine.parallel.transfer.kv_shards import ShardSlice, full_layout, plan_slices, rank_heads, shard_layout


@dataclass
class Leg:
    """One prefill rank's part of a pull."""

    params: KVTransferParams
    expected: KVLayout  # the KV layout that rank's region must have (checked at the handshake)
    slice: ShardSlice | None  # where its heads land; None: nothing is read from it
    future: object = None  # the read (KV, then pin re-read) in flight, if any
    scratch: int = -1  # scratch slot of its pin re-read
    state: str = "idle"  # idle | pulling | verifying | verified


def plan_legs(raw: Any, p: KVTransferParams, region_layout: KVLayout, decode_rank: int = 0) -> list[Leg]:
    """The legs of a pull into a staging region of `region_layout` (this rank's cache layout:
    every head, or its tensor-parallel shard of them). Raises HandshakeError when the prefill
    engine's tensor-parallel split does not fit the model's heads."""
    ranks = [p, *(check_shards(raw, p) if isinstance(raw, dict) else [])]
    tp = len(ranks)
    slices = plan_slices(region_layout, tp, decode_rank)
    full = full_layout(region_layout)
    legs = []
    for r, (start, heads) in enumerate(rank_heads(region_layout, tp)):
        if not region_layout.groups[0].head_split:
            expected = region_layout  # MLA: the latent (and any per-token extras) whole on every rank
        else:
            expected = shard_layout(full, heads, head_start=start)
        legs.append(Leg(ranks[r], expected, slices.get(r)))
    return legs
