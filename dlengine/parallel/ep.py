"""Expert parallelism: where each expert lives, and how tokens get there and back.

`ExpertPlacement` maps each logical expert to (rank, slot): the rank that holds its weights and
the row of that rank's stacked expert tensors. It is a plain table so that redundant experts
(one logical expert in several slots) or an EPLB-style rebalancer can produce another one; the
MoE layer only asks it `route(topk_ids) -> (dest_rank, dest_slot)` and `slots_of(rank)`.
Placements by name: "contiguous" (rank r holds experts [r*E/n, (r+1)*E/n)) and "round_robin"
(expert e on rank e % n); or pass an ExpertPlacement object as `parallel(expert_placement=...)`
(it is pickled to the workers). One table serves every MoE layer of the model for now.

A dispatcher moves (token, expert) pairs to the ranks owning their experts and the experts'
outputs back: `dispatch(x, dest_rank, dest_slot) -> (recv_x, recv_slot, handle)`, then
`combine(expert_out, handle) -> [T*K, H]` in the original pair order, so the caller weights and
sums a token's k outputs in routing order exactly as the single-process layer does. Every rank
calls both in every MoE layer of every step, with zero pairs if it has no tokens.

Backends: "all_to_all" (torch.distributed.all_to_all_single with uneven splits; gloo and NCCL).
DeepEP (normal kernels for prefill, low-latency for decode) fits the same two calls but is not
implemented in this version: `dispatch_backends()` lists only what exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dlengine.errors import ConfigError


@dataclass(frozen=True)
class ExpertPlacement:
    """`rank_of[e]` and `slot_of[e]` for every logical expert e; `slots[r]` lists the logical
    expert held in each slot of rank r."""

    num_experts: int
    num_ranks: int
    rank_of: tuple[int, ...]
    slot_of: tuple[int, ...]

    @property
    def slots(self) -> list[list[int]]:
        table: list[dict[int, int]] = [{} for _ in range(self.num_ranks)]
        for e, (r, s) in enumerate(zip(self.rank_of, self.slot_of)):
            table[r][s] = e
        return [[t[s] for s in sorted(t)] for t in table]

    def slots_of(self, rank: int) -> list[int]:
        return self.slots[rank]

    def route(self, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rank_of = torch.tensor(self.rank_of, dtype=torch.int64, device=topk_ids.device)
        slot_of = torch.tensor(self.slot_of, dtype=torch.int64, device=topk_ids.device)
        return rank_of[topk_ids], slot_of[topk_ids]


def contiguous_placement(num_experts: int, num_ranks: int) -> ExpertPlacement:
    per = _per_rank(num_experts, num_ranks)
    return ExpertPlacement(num_experts, num_ranks, tuple(e // per for e in range(num_experts)),
                           tuple(e % per for e in range(num_experts)))


def round_robin_placement(num_experts: int, num_ranks: int) -> ExpertPlacement:
    _per_rank(num_experts, num_ranks)
    return ExpertPlacement(num_experts, num_ranks, tuple(e % num_ranks for e in range(num_experts)),
                           tuple(e // num_ranks for e in range(num_experts)))


def _per_rank(num_experts: int, num_ranks: int) -> int:
    if num_experts % num_ranks:
        raise ConfigError(f"{num_experts} experts cannot be split evenly over ffn_ep={num_ranks} ranks")
    return num_experts // num_ranks


PLACEMENTS = {"contiguous": contiguous_placement, "round_robin": round_robin_placement}


def make_placement(name: "str | ExpertPlacement", num_experts: int, num_ranks: int) -> ExpertPlacement:
    """A placement by name, or a given ExpertPlacement checked against the layer's shape."""
    if isinstance(name, ExpertPlacement):
        if (name.num_experts, name.num_ranks) != (num_experts, num_ranks):
            raise ConfigError(f"expert placement is for {name.num_experts} experts on {name.num_ranks} ranks, "
                              f"the model has {num_experts} experts on ffn_ep={num_ranks} ranks")
        return name
    try:
        return PLACEMENTS[name](num_experts, num_ranks)
    except KeyError:
        raise ConfigError(f"unknown expert placement {name!r}; choose one of {sorted(PLACEMENTS)}") from None


@dataclass
class DispatchHandle:
    order: torch.Tensor  # pair indices sorted by destination rank
    send_splits: list[int]
    recv_splits: list[int]
    num_pairs: int


class AllToAllDispatcher:
    """Dispatch/combine with torch.distributed.all_to_all_single. Per call: one exchange of the
    per-rank pair counts, then the rows and their slots; combine sends the outputs back."""

    name = "all_to_all"

    def __init__(self, group, num_ranks: int) -> None:
        self.group, self.num_ranks = group, num_ranks

    def _exchange(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=self.group)
        return recv

    def dispatch(self, x: torch.Tensor, dest_rank: torch.Tensor, dest_slot: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """x [T, H], dest_rank/dest_slot [T, K] -> the pairs this rank must compute: rows
        [N, H] and their local slots [N]."""
        k = dest_rank.shape[1] if dest_rank.dim() == 2 else 1
        flat = dest_rank.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        send_counts = torch.bincount(flat, minlength=self.num_ranks)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        recv_x = self._exchange(x[order // k], send_splits, recv_splits)
        recv_slot = self._exchange(dest_slot.reshape(-1)[order], send_splits, recv_splits)
        return recv_x, recv_slot, DispatchHandle(order, send_splits, recv_splits, flat.numel())

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        back = self._exchange(expert_out, handle.recv_splits, handle.send_splits)
        out = back.new_empty((handle.num_pairs, back.shape[-1]))
        out[handle.order] = back
        return out


DISPATCH_BACKENDS = {"all_to_all": AllToAllDispatcher}


def dispatch_backends() -> list[str]:
    """The dispatch/combine backends this installation can run."""
    return sorted(DISPATCH_BACKENDS)


def make_dispatcher(name: str, group, num_ranks: int):
    if name == "auto":
        name = "all_to_all"
    if name == "deep_ep":
        raise ConfigError("the DeepEP dispatch backend is not implemented in this version of dlengine; "
                          "use dispatch_backend='all_to_all'")
    try:
        return DISPATCH_BACKENDS[name](group, num_ranks)
    except KeyError:
        raise ConfigError(f"unknown MoE dispatch backend {name!r}; available: {dispatch_backends()}") from None
