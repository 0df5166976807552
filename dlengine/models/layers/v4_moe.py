"""DeepSeek-V4's MoE block (transformers 5.25: DeepseekV4SparseMoeBlock): routed experts plus one
shared expert, every SwiGLU clamped (gate <= swiglu_limit, |up| <= swiglu_limit).

Routing ("sqrtsoftplus"): scores = sqrt(softplus(gate(x))). A learned layer (`moe`) picks the
top-k of scores + `bias` (the checkpoint's e_score_correction_bias; no expert groups); a hash
layer (`hash_moe`) takes the experts `tid2eid[token id]` from a frozen table. Either way the
weights are the chosen scores, renormalised to sum to 1, times routed_scaling_factor.

The experts keep FusedMoE's stacked layout and loader (w13 = w1 (gate) then w3 (up), w2 =
down); they run through the op chosen at build (kernels/selection.py Ops.fused_experts_clamped):
the fused Triton MoE with its clamped epilogue on CUDA (no host sync: capturable), else the
per-expert reference in kernels/v4/reference.py.

Parallel layouts are ParallelFusedMoE's (docs/parallel.md): under tp every rank holds every
expert with its intermediate dim split (the clamps act element by element on the intermediate
activations, so a split is exact) and the shared expert split the same way (w1 / w3 column-,
w2 row-parallel); the routed and shared partial sums share one all-reduce. Under attention-DP x
expert parallelism each rank routes its own tokens (hash layers look up its own token ids)
before they travel to their experts; the shared expert is replicated. The gate and `tid2eid`
are replicated everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlengine.kernels.v4.reference import clamped_swiglu
from dlengine.models.layers.linear import default_weight_loader
from dlengine.models.layers.parallel_linear import ColumnParallelLinear, RowParallelLinear
from dlengine.models.layers.parallel_moe import ParallelFusedMoE
from dlengine.parallel.state import get_parallel_state


class V4Gate(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, routed_scaling_factor: float, hashed: bool,
                 vocab_size: int) -> None:
        super().__init__()
        self.top_k, self.scaling, self.hashed = top_k, routed_scaling_factor, hashed
        self.weight = nn.Parameter(torch.empty(num_experts, hidden), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if hashed:
            # a valid table until the checkpoint's is loaded (dummy weights keep it): token t -> experts
            # (t * top_k + j) % num_experts, j < top_k, spread evenly
            spread = torch.arange(vocab_size * top_k, dtype=torch.long).view(vocab_size, top_k) % num_experts
            self.tid2eid = nn.Parameter(spread, requires_grad=False)
            self.tid2eid.weight_loader = default_weight_loader
        else:
            self.bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.softplus(F.linear(x, self.weight)).sqrt()
        if self.hashed:
            ids = self.tid2eid[input_ids].long()
        else:
            ids = torch.topk(scores + self.bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


class ClampedSwiGLU(nn.Module):
    """The shared expert: w2(silu(clamp(w1 x)) * clamp(w3 x)). Under tp, w1 / w3 hold this rank's
    rows of the intermediate dim and w2 its columns; the output is this rank's partial sum (the
    caller reduces it together with the routed experts')."""

    def __init__(self, hidden: int, intermediate: int, limit: float) -> None:
        super().__init__()
        self.w1, self.w3 = ColumnParallelLinear(hidden, intermediate), ColumnParallelLinear(hidden, intermediate)
        self.w2 = RowParallelLinear(intermediate, hidden, reduce=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit))


class ClampedExperts(ParallelFusedMoE):
    """The routed experts: ParallelFusedMoE's shards, loading and dispatch, with the clamped
    SwiGLU of Ops.fused_experts_clamped as the expert GEMMs. Routing is V4Gate's, passed in."""

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, limit: float) -> None:
        super().__init__(num_experts, top_k, hidden, intermediate, router=nn.Identity())
        self.limit = limit

    def run_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.ops.fused_experts_clamped(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids,
                                              self.limit)


class V4MoE(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, routed_scaling_factor: float,
                 limit: float, hashed: bool, vocab_size: int) -> None:
        super().__init__()
        self.gate = V4Gate(hidden, num_experts, top_k, routed_scaling_factor, hashed, vocab_size)
        self.experts = ClampedExperts(num_experts, top_k, hidden, intermediate, limit)
        self.shared_experts = ClampedSwiGLU(hidden, intermediate, limit)
        self.tp_group = get_parallel_state().tp_group

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x, input_ids)
        # under tp both are this rank's partial sums: one all-reduce for the two
        out = self.experts.forward_routed(x, weights, ids, reduce=False) + self.shared_experts(x)
        if self.tp_group is not None:
            dist.all_reduce(out, group=self.tp_group)
        return out

    @staticmethod
    def checkpoint_mapping(num_experts: int) -> list[tuple[str, str, object, tuple[str, ...]]]:
        """Released names: experts.{e}.w1 / w3 / w2 -> the stacked w13 (gate, up) and w2."""
        rows = []
        for e in range(num_experts):
            for hf, ours, shard in (("w1", "w13_weight", "gate"), ("w3", "w13_weight", "up"),
                                    ("w2", "w2_weight", "down")):
                rows.append((f"experts.{ours}", f"experts.{e}.{hf}.weight", (shard, e), (f"{shard}.{e}",)))
        return rows
