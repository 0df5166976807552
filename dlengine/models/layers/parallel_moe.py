"""FusedMoE over several ranks: tensor-parallel experts (tp > 1) or expert parallelism (ffn_ep > 1).

* TP: every rank holds every expert with its intermediate dim split (gate/up rows, down columns),
  computes its partial output for all tokens, and one all-reduce sums the partials.
* EP: rank r holds the experts its `ExpertPlacement` gives it, stacked by slot. A forward routes
  the rank's own tokens, dispatches the (token, expert) pairs to the owning ranks, runs the local
  experts on what arrived, and combines the outputs back; the rank then weights and sums each
  token's k outputs in routing order, as the single-process layer does. A rank with no tokens
  still joins both exchanges (`forward_idle`).

Without parallelism (the default state) the layer is plain FusedMoE. Every forward adds the
number of routed (token, expert) pairs per logical expert to `expert_token_counts` (the load
metric an EPLB rebalancer would read; steps replayed from CUDA graphs are not counted).
The expert GEMMs themselves are `run_experts`, which FP8 layers (fp8_moe.py) override; routing,
dispatch and the collectives stay here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dlengine.kernels.moe.fused_moe_torch import combine_expert_outputs
from dlengine.kernels.selection import current_kernels
from dlengine.models.layers.moe import FusedMoE
from dlengine.parallel.ep import make_dispatcher, make_placement
from dlengine.parallel.state import get_parallel_state
from dlengine.models.layers.parallel_linear import divide


class ParallelFusedMoE(FusedMoE):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 router: nn.Module) -> None:
        # FusedMoE's attributes, but parameters of this rank's shape only (never the full set of
        # experts: a real model's would not fit on one device)
        nn.Module.__init__(self)
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.router = router
        self.ops = current_kernels().ops  # fused_experts: Triton or the torch reference, chosen at build
        state = get_parallel_state()
        # by group, not size: a one-rank group still runs the collectives (1-GPU NCCL checks)
        self.mode = "ep" if state.ep_group is not None else "tp" if state.tp_group is not None else "local"
        self.register_buffer("expert_token_counts", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.num_forwards = 0  # the lockstep loop checks that every step reached the MoE layers
        h, i = hidden_size, intermediate_size
        if self.mode == "tp":
            self.tp_rank, self.tp_size, self.tp_group = state.tp_rank, state.tp_size, state.tp_group
            self.local_intermediate = divide(i, state.tp_size, "moe_intermediate_size")
            shape13, shape2 = (num_experts, 2 * self.local_intermediate, h), (num_experts, h, self.local_intermediate)
        elif self.mode == "ep":
            self.placement = make_placement(state.expert_placement, num_experts, state.ep_size)
            self.local_experts = self.placement.slots_of(state.ep_rank)  # slot -> logical expert
            self.slot_of_expert = {e: s for s, e in enumerate(self.local_experts)}
            self.dispatcher = make_dispatcher(state.dispatch_backend, state.ep_group, state.ep_size)
            # the placement as device tables, so routing a step is two gathers (no host copy)
            self.register_buffer("rank_of_expert", torch.tensor(self.placement.rank_of, dtype=torch.int64),
                                 persistent=False)
            self.register_buffer("slot_of_expert_table", torch.tensor(self.placement.slot_of, dtype=torch.int64),
                                 persistent=False)
            n = len(self.local_experts)
            shape13, shape2 = (n, 2 * i, h), (n, h, i)
        else:
            shape13, shape2 = (num_experts, 2 * i, h), (num_experts, h, i)
        self.w13_weight = nn.Parameter(torch.empty(shape13), requires_grad=False)
        # the model dtype (the weights may be FP8): the dtype of an idle rank's empty batch
        self.activation_dtype = self.w13_weight.dtype
        self.w2_weight = nn.Parameter(torch.empty(shape2), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        if self.mode == "ep":  # the loader then never reads other ranks' per-expert tensors
            self.w13_weight.wants_shard = self.w2_weight.wants_shard = self._wants_shard

    def _wants_shard(self, shard_id: tuple[str, int] | None) -> bool:
        return shard_id is None or shard_id[1] in self.slot_of_expert

    def extra_repr(self) -> str:
        extra = {"tp": lambda: f", tp_shard={self.local_intermediate}",
                 "ep": lambda: f", local_experts={self.local_experts}"}.get(self.mode, lambda: "")()
        return super().extra_repr() + f", mode={self.mode}" + extra

    # ------------------------------------------------------------------ loading
    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[str, int] | None = None) -> None:
        if self.mode == "local":
            return super().weight_loader(param, loaded, shard_id)
        is_w13 = param is self.w13_weight
        if self.mode == "tp":
            full_i, li, r = self.intermediate_size, self.local_intermediate, self.tp_rank
            if shard_id is None:  # fused [E, 2I, H] / [E, H, I]
                if is_w13:
                    loaded = torch.cat([loaded[:, :full_i].narrow(1, r * li, li),
                                        loaded[:, full_i:].narrow(1, r * li, li)], dim=1)
                else:
                    loaded = loaded.narrow(2, r * li, li)
            else:
                shard, e = shard_id
                loaded = loaded.narrow(1 if shard == "down" else 0, r * li, li)
            return self._copy(param, loaded, shard_id, self.local_intermediate)
        # ep: keep the experts this rank owns; the others are read and dropped
        if shard_id is None:
            loaded = loaded[self.local_experts]
            return self._copy(param, loaded, None, self.intermediate_size)
        shard, e = shard_id
        slot = self.slot_of_expert.get(e)
        if slot is not None:
            self._copy(param, loaded, (shard, slot), self.intermediate_size)

    @staticmethod
    def _copy(param, loaded, shard_id, i):
        if shard_id is None:
            target = param.data
        else:
            shard, e = shard_id
            target = {"gate": param.data[e, :i], "up": param.data[e, i:], "down": param.data[e]}[shard]
        if loaded.shape != target.shape:
            raise ValueError(f"checkpoint tensor {shard_id or 'fused experts'} has shape {tuple(loaded.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(loaded)

    # ------------------------------------------------------------------ forward
    def run_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's expert GEMMs on the (token, expert) pairs it runs (FP8 layers override it)."""
        return self.ops.fused_experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.forward_routed(x, *self.router(router_logits))

    def forward_routed(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       reduce: bool = True) -> torch.Tensor:
        """The experts on routing decided by the caller (a model whose router needs more than the
        logits, e.g. DeepSeek-V4's hash routing by token id). `reduce=False` under TP returns this
        rank's partial sum, for a caller that adds other partials (a row-parallel shared expert)
        before one all-reduce of its own; the other modes ignore it."""
        self.num_forwards += 1
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            # index_add_, not bincount: bincount sizes its output from the data (a host sync).
            # Not while capturing a CUDA graph (single-process decode graphs): replays would
            # count their padding rows, so graph-replayed steps go uncounted
            flat = topk_ids.reshape(-1)
            self.expert_token_counts.index_add_(0, flat, torch.ones_like(flat))
        if self.mode == "local":
            return self.run_experts(x, topk_weights, topk_ids)
        if self.mode == "tp":
            out = self.run_experts(x, topk_weights, topk_ids)
            if reduce:
                dist.all_reduce(out, group=self.tp_group)
            return out
        pair_out = self._expert_parallel(x, topk_ids)
        return combine_expert_outputs(pair_out, topk_weights, x.shape[0], self.top_k)

    def _expert_parallel(self, x: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        dest_rank, dest_slot = self.rank_of_expert[topk_ids], self.slot_of_expert_table[topk_ids]
        recv_x, recv_slot, handle = self.dispatcher.dispatch(x, dest_rank, dest_slot)
        if recv_x.shape[0]:
            # one (token, expert) pair per row, weight 1 (exact): the caller weights after combine
            ones = torch.ones(recv_x.shape[0], 1, dtype=torch.float32, device=recv_x.device)
            y = self.run_experts(recv_x, ones, recv_slot.unsqueeze(1))
        else:
            y = recv_x
        return self.dispatcher.combine(y, handle)

    def forward_idle(self) -> None:
        """Join this layer's dispatch and combine with no tokens (an EP rank with nothing to run
        this step), so the ranks that do have tokens are not left waiting."""
        if self.mode != "ep":
            return
        self.num_forwards += 1
        x = torch.empty(0, self.hidden_size, dtype=self.activation_dtype, device=self.w2_weight.device)
        self._expert_parallel(x, torch.empty(0, self.top_k, dtype=torch.int64, device=x.device))


def moe_layers(model: nn.Module) -> list[ParallelFusedMoE]:
    """The model's MoE layers in forward order."""
    return [m for m in model.modules() if isinstance(m, ParallelFusedMoE)]


def expert_token_counts(model: nn.Module) -> dict[str, list[int]]:
    """Routed (token, expert) pairs per logical expert, per MoE layer, since the model was built."""
    return {name: m.expert_token_counts.tolist() for name, m in model.named_modules() if isinstance(m, ParallelFusedMoE)}
