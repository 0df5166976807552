"""Process groups of one rank and where the model layers find them.

A rank's `ParallelState` says which tensor-parallel (TP) group, attention data-parallel (DP) rank
and expert-parallel (EP) group it belongs to. Layers read it once, when the model is constructed
(`get_parallel_state()`), to size their shards; the default state is a single process, so models
built outside any parallel setup are exactly the single-process models.

Layouts (world = tp x attention_dp ranks, see docs/parallel.md):

* tp=N: one DP group of N ranks; attention heads, MLPs, vocab and MoE experts' intermediate dim
  are sharded; every rank sees every token.
* attention_dp=N, ffn_ep=N ("wide EP"): N independent attention/dense replicas, each with its own
  requests and KV cache; MoE experts are partitioned over the same N ranks and tokens travel to
  their experts by all-to-all.
* attention_dp=N, ffn_ep=1: N full replicas (experts replicated), stepping in lockstep.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from dlengine.config import ConfigError, ParallelConfig


@dataclass
class ParallelState:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Any = None  # a torch.distributed ProcessGroup; None when tp_size == 1
    dp_size: int = 1
    dp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Any = None
    world_group: Any = None
    expert_placement: Any = "contiguous"  # a name in dlengine.parallel.ep.PLACEMENTS, or an ExpertPlacement
    dispatch_backend: str = "auto"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_output_rank(self) -> bool:
        """The rank of its DP group that reports outputs (TP ranks compute the same tokens)."""
        return self.tp_rank == 0


_STATE = ParallelState()


def get_parallel_state() -> ParallelState:
    return _STATE


def set_parallel_state(state: ParallelState) -> None:
    global _STATE
    _STATE = state


@contextlib.contextmanager
def parallel_state(state: ParallelState) -> Iterator[ParallelState]:
    """Make `state` current while a model is constructed (layers size their shards from it)."""
    prev = get_parallel_state()
    set_parallel_state(state)
    try:
        yield state
    finally:
        set_parallel_state(prev)


def in_distributed_worker() -> bool:
    """True inside a `torchrun` process or a `dlengine.parallel.launch` worker (or wherever
    torch.distributed is already initialised with more than one rank)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def default_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Initialise torch.distributed from the environment torchrun (or the launcher) sets: RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Returns (rank, world_size, local_rank).
    A no-op when already initialised. NCCL when CUDA is available, gloo otherwise."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend is None:
            backend = default_backend("cuda" if torch.cuda.is_available() else "cpu")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), local_rank


def check_layout(config: ParallelConfig, world_size: int) -> None:
    """The world must have exactly tp x attention_dp ranks (ParallelConfig.validate checked the
    layout itself)."""
    tp, dp = config.tp, config.attention_dp
    if tp * dp != world_size:
        raise ConfigError(f"parallel tp={tp} x attention_dp={dp} needs {tp * dp} processes, "
                          f"but the world has {world_size}")


def build_parallel_state(config: ParallelConfig) -> ParallelState:
    """Make the groups for `config` on an initialised torch.distributed world. Every rank must
    call this (new_group is collective), in the same order."""
    rank, world = dist.get_rank(), dist.get_world_size()
    check_layout(config, world)
    tp, dp, ep = config.tp, config.attention_dp, config.ffn_ep
    state = ParallelState(world_size=world, rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", rank)),
                          world_group=dist.group.WORLD, expert_placement=config.expert_placement,
                          dispatch_backend=config.dispatch_backend)
    # rank = dp_rank * tp + tp_rank: the TP ranks of one DP replica are neighbours (one node's GPUs)
    state.tp_size, state.tp_rank, state.dp_size, state.dp_rank = tp, rank % tp, dp, rank // tp
    for d in range(dp):
        ranks = list(range(d * tp, (d + 1) * tp))
        group = dist.group.WORLD if tp == world else (dist.new_group(ranks) if tp > 1 else None)
        if rank in ranks and tp > 1:
            state.tp_group = group
    if ep > 1:
        state.ep_size, state.ep_rank, state.ep_group = ep, rank, dist.group.WORLD  # ep == world (checked)
    return state


def destroy_distributed() -> None:
    """Tear the default process group down (and with it every subgroup)."""
    set_parallel_state(ParallelState())
    if dist.is_available() and dist.is_initialized():
        # wait for every rank first: a rank tearing down while a peer still talks to the store
        # aborts that peer (gloo: "terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
