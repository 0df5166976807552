"""A decode engine's view of a tensor-parallel prefill engine's kv_transfer_params.

A prefill engine under tensor parallelism hands off one KV shard per rank: rank 0's params carry
`tp_size` and the other ranks' params in `shards` (dlengine.parallel.lockstep). The decode side
(one rank, every head) pulls each rank's KV as one *leg* of the pull: its own peer, handshake,
read, pin check and done slot. Ranks whose heads another rank already provides (replicated kv
heads, MLA's whole latent) are legs that read nothing but are still told when the decode side is
done, so every prefill rank frees its blocks. Unsharded params are one leg reading every head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dlengine.disagg.params import KVTransferParams, check_shards
from dlengine.parallel.transfer.base import KVLayout
from dlengine.parallel.transfer.kv_shards import ShardSlice, plan_slices, rank_heads, shard_layout, whole_slice


@dataclass
class Leg:
    """One prefill rank's part of a pull."""

    params: KVTransferParams
    expected: KVLayout  # the KV layout that rank's region must have (checked at the handshake)
    slice: ShardSlice | None  # where its heads land; None: nothing is read from it
    future: object = None  # the read (KV, then pin re-read) in flight, if any
    scratch: int = -1  # scratch slot of its pin re-read
    state: str = "idle"  # idle | pulling | verifying | verified


def plan_legs(raw: Any, p: KVTransferParams, region_layout: KVLayout) -> list[Leg]:
    """The legs of a pull into a staging region of `region_layout` (this engine's, every head).
    Raises HandshakeError when the prefill engine's tensor-parallel split does not fit our heads."""
    others = check_shards(raw, p) if isinstance(raw, dict) else []
    if not others:
        return [Leg(p, region_layout, whole_slice(region_layout))]
    tp = len(others) + 1
    slices = plan_slices(region_layout, tp)
    heads = rank_heads(region_layout, tp)
    return [Leg(sp, shard_layout(region_layout, heads[r][1], head_start=heads[r][0]), slices.get(r)) for r, sp in enumerate([p, *others])]
