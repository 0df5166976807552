"""Mixture-of-experts FFN: a router picks `top_k` experts per token, each expert is a SwiGLU MLP,
and the token's output is the routing-weighted sum of its experts' outputs.

`FusedMoE` stores every expert of a layer in two stacked tensors, as fused MoE kernels want them:

    w13_weight [E, 2 * I, H]   gate_proj then up_proj of each expert (one GEMM)
    w2_weight  [E, H, I]       down_proj of each expert

Checkpoints come in two layouts and both load (see `FusedMoE.checkpoint_mapping`): one tensor per
expert and projection (`mlp.experts.{e}.gate_proj.weight`, what released Qwen3-MoE checkpoints
hold) and fused 3-D tensors (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`
[E, H, I], transformers 5's in-memory layout).

Routing is a separate module so other families plug in their own: a router maps the gate's logits
[T, E] to (weights [T, K] in float32, expert ids [T, K]). `SoftmaxTopKRouter` is Qwen/Mixtral's;
`GroupedTopKRouter` is DeepSeek-V3's (and Kimi-K2's) grouped sigmoid router, with its
score-correction bias parameter and scaling factor.

The experts run through the fused-experts op the engine chose at build (kernels/selection.py):
the Triton kernel of kernels/moe/ on GPUs, its torch reference `fused_experts_torch`
(kernels/moe/fused_moe_torch.py) elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlengine.kernels.selection import current_kernels
from dlengine.models.layers.linear import default_weight_loader


class SoftmaxTopKRouter(nn.Module):
    """softmax over all experts (float32) -> top-k -> optionally renormalise the k weights to sum
    to 1 (`norm_topk_prob`)."""

    def __init__(self, top_k: int, renormalize: bool) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize

    def forward(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


class GroupedTopKRouter(nn.Module):
    """DeepSeek-V3 / Kimi-K2 routing ("noaux_tc"), as transformers' DeepseekV3TopkRouter computes it:

    scores = sigmoid(logits) in float32; the choice uses scores + `e_score_correction_bias` (a
    per-expert parameter the checkpoint holds, float32): experts are split into `num_groups`
    groups, a group scores the sum of its two best biased scores, only the `topk_groups` best
    groups stay eligible, and the top-k eligible experts are chosen. Their weights are the
    *unbiased* scores, renormalised to sum to 1 if `renormalize` (norm_topk_prob), then
    multiplied by `routed_scaling_factor`. One group (Kimi-K2) is plain top-k."""

    def __init__(self, num_experts: int, top_k: int, num_groups: int, topk_groups: int, renormalize: bool,
                 routed_scaling_factor: float) -> None:
        super().__init__()
        if num_groups < 1 or num_experts % num_groups:
            raise ValueError(f"n_group={num_groups} must divide the {num_experts} routed experts")
        if not 1 <= topk_groups <= num_groups:
            raise ValueError(f"topk_group={topk_groups} must be in [1, n_group={num_groups}]")
        if top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(f"top-{top_k} routing cannot pick from {topk_groups} groups of "
                             f"{num_experts // num_groups} experts")
        self.num_experts, self.top_k = num_experts, top_k
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.renormalize, self.routed_scaling_factor = renormalize, float(routed_scaling_factor)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False)
        self.e_score_correction_bias.weight_loader = default_weight_loader

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, groups={self.topk_groups}/{self.num_groups}, "
                f"renormalize={self.renormalize}, routed_scaling_factor={self.routed_scaling_factor}")

    def forward(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = router_logits.float().sigmoid()
        choice = scores + self.e_score_correction_bias
        per_group = self.num_experts // self.num_groups
        if self.topk_groups < self.num_groups:  # otherwise every group stays eligible
            group_scores = choice.view(-1, self.num_groups, per_group).topk(min(2, per_group), dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=self.topk_groups, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            expert_mask = group_mask.unsqueeze(-1).expand(-1, self.num_groups, per_group).reshape(-1, self.num_experts)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids


class FusedMoE(nn.Module):
    """All experts of one layer; `forward(x, router_logits)` routes and runs them."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 router: nn.Module) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.router = router
        e, h, i = num_experts, hidden_size, intermediate_size
        self.w13_weight = nn.Parameter(torch.empty(e, 2 * i, h), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(e, h, i), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        self.ops = current_kernels().ops  # fused_experts: Triton or the torch reference, chosen at build

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}")

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.router(router_logits)
        return self.ops.fused_experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def checkpoint_mapping(num_experts: int) -> list[tuple[str, str, object, tuple[str, ...]]]:
        """Rows for the loader's rename table: (our name, HF name, shard id, completeness keys).
        A parameter is complete when all its keys were loaded, by either layout."""
        rows: list[tuple[str, str, object, tuple[str, ...]]] = []
        for e in range(num_experts):
            for hf, ours, shard in (("gate_proj", "w13_weight", "gate"), ("up_proj", "w13_weight", "up"),
                                    ("down_proj", "w2_weight", "down")):
                rows.append((f"experts.{ours}", f"experts.{e}.{hf}.weight", (shard, e), (f"{shard}.{e}",)))
        every = range(num_experts)
        rows.append(("experts.w13_weight", "experts.gate_up_proj", None,
                     tuple(f"gate.{e}" for e in every) + tuple(f"up.{e}" for e in every)))
        rows.append(("experts.w2_weight", "experts.down_proj", None, tuple(f"down.{e}" for e in every)))
        return rows

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[str, int] | None = None) -> None:
        """shard_id None: a fused 3-D tensor holding the whole parameter; ("gate" | "up" | "down",
        e): one expert's projection, copied into its slice."""
        if shard_id is None:
            target = param.data
        else:
            shard, e = shard_id
            i = self.intermediate_size
            target = {"gate": param.data[e, :i], "up": param.data[e, i:], "down": param.data[e]}[shard]
        if loaded.shape != target.shape:
            raise ValueError(f"checkpoint tensor {shard_id or 'fused experts'} has shape {tuple(loaded.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(loaded)
