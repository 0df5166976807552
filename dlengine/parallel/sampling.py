"""Sampling under tensor parallelism."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dlengine.parallel.state import ParallelState


class TPLeaderSampler:
    """Sample on the first TP rank of the group and broadcast its tokens to the others.

    TP ranks hold identical logits (all-gathered) and identically seeded samplers, so they would
    draw the same tokens anyway; the broadcast makes that a guarantee rather than an assumption
    (a single differing token would make the ranks' schedulers, and so their collectives, part
    ways). Built around the engine's sampler at assembly (dlengine.assemble)."""

    def __init__(self, sampler, state: ParallelState) -> None:
        self.sampler, self.group = sampler, state.tp_group
        self.src = state.dp_rank * state.tp_size  # global rank of this group's first TP rank

    def __call__(self, logits: torch.Tensor, tensors) -> Any:
        out = self.sampler(logits, tensors)
        dist.broadcast(out.token_ids, src=self.src, group=self.group)
        return out
