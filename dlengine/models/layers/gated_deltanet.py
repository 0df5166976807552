"""Gated DeltaNet linear attention (the "linear_attention" layers of Qwen3-Next and Qwen3.5).

Per token: project to q, k, v (Hk key heads of Dk, Hv value heads of Dv), an output gate z, a
write strength b and a decay input a; run q|k|v through a short causal depthwise conv1d (K taps,
SiLU) that continues from the request's saved window; then the gated delta rule
(kernels/gdn/gated_delta_rule_torch.py) with beta = sigmoid(b) and log-decay
g = -exp(A_log) * softplus(a + dt_bias), continuing from the request's saved [Hv, Dk, Dv] state;
finally a per-head RMSNorm gated by silu(z) and the output projection.

The layer keeps no state itself: its conv window and delta-rule state live in the cache's state
group (cache spec `GatedDeltaNetSpec` below, one slot per running request), found in
`ctx.layer_caches[layer_idx]["state"]` and indexed by the metadata's `state_slots`. A step of
single tokens runs the batched recurrent update; any other step runs the varlen chunk form,
except a speculative verify step, whose drafting requests run position by position through the
one-token ops with a snapshot of the state after each position (kernels/gdn/by_position.py: the
core rolls the slot back to the accepted length). The decode branch reads only device tensors
of the metadata (no host lists, no data-dependent shapes), so it is captured in the engine's CUDA
graphs, and so are verify steps; padded graph rows carry PAD_STATE_SLOT, which the conv and
recurrent kernels skip.

Checkpoint layouts: Qwen3.5 stores in_proj_qkv, in_proj_z, in_proj_b, in_proj_a (loaded into two
stacked GEMMs by the model's stacked_params); Qwen3-Next stores in_proj_qkvz and in_proj_ba with
rows grouped per key head ([q_h | k_h | v_h... | z_h...] for each key head h), which
`grouped_layout=True` reorders at load into the same [q | k | v | z] and [b | a] rows.

Tensor parallelism splits the heads: a rank keeps Hk / tp key heads and the Hv / tp value heads
they serve (value head h reads key head h // (Hv / Hk), so contiguous ranges stay consistent).
in_proj_qkvz / in_proj_ba are column-parallel with one shard per projection (q, k, v, z, b, a:
each cut to the rank's heads), the conv1d keeps the rank's q, k and v channels, dt_bias / A_log
the rank's value heads, out_proj is row-parallel (one all-reduce). The rank's state slots hold
only its heads (`GatedDeltaNetShape.for_rank`), and the head-wise kernels need nothing else.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dlengine.cache.specs import StateSpec, StateTensor
from dlengine.config import ConfigError
from dlengine.kernels.context import ForwardContext
from dlengine.kernels.gdn.by_position import causal_conv1d_by_position, gated_delta_rule_by_position
from dlengine.kernels.selection import current_kernels
from dlengine.models.layers.linear import default_weight_loader
from dlengine.models.layers.norm import GatedRMSNorm
from dlengine.models.layers.parallel_linear import ColumnParallelLinear, RowParallelLinear, Shard
from dlengine.parallel.state import get_parallel_state

STATE_GROUP = "state"  # the cache group name of the layers' recurrent state (StateSpec.kind)


class GatedDeltaNetShape:
    """The linear-attention fields of a Qwen3-Next / Qwen3.5 config (hf_config)."""

    def __init__(self, hf: dict, where: str) -> None:
        try:
            self.num_k_heads = int(hf["linear_num_key_heads"])
            self.num_v_heads = int(hf["linear_num_value_heads"])
            self.head_k_dim = int(hf["linear_key_head_dim"])
            self.head_v_dim = int(hf["linear_value_head_dim"])
            self.conv_kernel = int(hf["linear_conv_kernel_dim"])
        except KeyError as e:
            raise ConfigError(f"{where}: the linear-attention field {e.args[0]!r} is missing") from None
        if self.num_v_heads % self.num_k_heads:
            raise ConfigError(f"{where}: linear_num_value_heads={self.num_v_heads} must be a multiple of "
                              f"linear_num_key_heads={self.num_k_heads}")
        if self.conv_kernel < 2:
            raise ConfigError(f"{where}: linear_conv_kernel_dim={self.conv_kernel} must be at least 2")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{where}: hidden_act={act!r} is not supported (Gated DeltaNet uses 'silu')")
        self.where = where
        self._derive()

    def _derive(self) -> None:
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim

    def for_rank(self, tp_size: int) -> "GatedDeltaNetShape":
        """The heads one of `tp_size` tensor-parallel ranks keeps (an even split of the key heads,
        and with them of the value heads)."""
        if tp_size == 1:
            return self
        if self.num_k_heads % tp_size:
            raise ConfigError(f"{self.where}: linear_num_key_heads={self.num_k_heads} is not divisible by "
                              f"tensor-parallel size {tp_size} (Gated DeltaNet heads are split across ranks)")
        local = copy.copy(self)
        local.num_k_heads //= tp_size
        local.num_v_heads //= tp_size
        local._derive()
        return local

    def state_spec(self, layers: tuple[int, ...], dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1) -> StateSpec:
        """One slot per running request and layer: the conv window (the last K - 1 q|k|v inputs,
        channels first, in the cache dtype) and the delta-rule state (float32, as transformers
        and fla keep it: it integrates every token of the sequence). Called on a rank's shape
        (`for_rank`): the slot holds key heads [tp_rank * Hk, (tp_rank + 1) * Hk) of Hk * tp_size,
        with their q, k, v channels (three parts of the conv's channels) and value heads."""
        return StateSpec(layers, tensors=(
            StateTensor("conv", (self.conv_dim, self.conv_kernel - 1), dtype,
                        parts=(self.key_dim, self.key_dim, self.value_dim)),
            StateTensor("ssm", (self.num_v_heads, self.head_k_dim, self.head_v_dim), torch.float32)),
            heads=self.num_k_heads, total_heads=self.num_k_heads * tp_size, head_start=tp_rank * self.num_k_heads)


class DepthwiseConv1dWeight(nn.Module):
    """The conv1d's parameter as transformers names and shapes it (`conv1d.weight` [D, 1, K])."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel), requires_grad=False)
        self.weight.weight_loader = default_weight_loader


class GatedDeltaNet(nn.Module):
    def __init__(self, shape: GatedDeltaNetShape, hidden_size: int, layer_idx: int, eps: float,
                 grouped_layout: bool = False) -> None:
        super().__init__()
        ps = get_parallel_state()
        self.full_shape, self.layer_idx = shape, layer_idx
        self.shape = s = shape.for_rank(ps.tp_size)  # this rank's heads
        self.tp_rank = ps.tp_rank
        f, r = shape, ps.tp_rank
        # one shard per projection, each cut to the rank's heads (checkpoint rows -> local rows)
        self.in_proj_qkvz = ColumnParallelLinear(hidden_size, shards=[
            Shard("q", f.key_dim, r * s.key_dim, s.key_dim), Shard("k", f.key_dim, r * s.key_dim, s.key_dim),
            Shard("v", f.value_dim, r * s.value_dim, s.value_dim), Shard("z", f.value_dim, r * s.value_dim, s.value_dim)])
        self.in_proj_ba = ColumnParallelLinear(hidden_size, shards=[
            Shard("b", f.num_v_heads, r * s.num_v_heads, s.num_v_heads),
            Shard("a", f.num_v_heads, r * s.num_v_heads, s.num_v_heads)])
        # the layers' own loaders cut one named shard out of its full tensor; ours split the
        # checkpoint's stacked tensors into those shards first
        self._load_qkvz_shard = self.in_proj_qkvz.weight.weight_loader
        self._load_ba_shard = self.in_proj_ba.weight.weight_loader
        self.in_proj_qkvz.weight.weight_loader = self._load_grouped_qkvz if grouped_layout else self._load_qkvz
        if grouped_layout:
            self.in_proj_ba.weight.weight_loader = self._load_grouped_ba
        self.conv1d = DepthwiseConv1dWeight(s.conv_dim, s.conv_kernel)
        self.conv1d.weight.weight_loader = self._load_conv
        self.dt_bias = nn.Parameter(torch.ones(s.num_v_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(s.num_v_heads), requires_grad=False)
        self.dt_bias.weight_loader = self._load_per_value_head
        self.A_log.weight_loader = self._load_per_value_head
        self.norm = GatedRMSNorm(s.head_v_dim, eps)
        self.out_proj = RowParallelLinear(f.value_dim, hidden_size)  # the rank's value heads' columns
        self.ops = current_kernels().ops

    # ------------------------------------------------------------------ loading (any tp)
    def _load_qkvz(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Qwen3.5: in_proj_qkv ([q | k | v] rows, shard "qkv") and in_proj_z (shard "z")."""
        f, load = self.full_shape, self._load_qkvz_shard
        if shard_id == "qkv":
            if loaded.shape[0] != f.conv_dim:
                raise ValueError(f"in_proj_qkv has {loaded.shape[0]} rows, expected {f.conv_dim}")
            for name, part in zip("qkv", loaded.split([f.key_dim, f.key_dim, f.value_dim])):
                load(param, part, name)
        else:
            load(param, loaded, shard_id)

    def _load_conv(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """The conv's channels are q | k | v: keep the rank's channels of each."""
        f, s, r = self.full_shape, self.shape, self.tp_rank
        if loaded.shape != (f.conv_dim, *param.shape[1:]):
            raise ValueError(f"conv1d.weight has shape {tuple(loaded.shape)}, expected {(f.conv_dim, *param.shape[1:])}")
        q, k, v = loaded.split([f.key_dim, f.key_dim, f.value_dim])
        param.data.copy_(torch.cat([q.narrow(0, r * s.key_dim, s.key_dim), k.narrow(0, r * s.key_dim, s.key_dim),
                                    v.narrow(0, r * s.value_dim, s.value_dim)]))

    def _load_per_value_head(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        f, s = self.full_shape, self.shape
        if loaded.shape != (f.num_v_heads,):
            raise ValueError(f"per-head tensor has shape {tuple(loaded.shape)}, expected {(f.num_v_heads,)}")
        param.data.copy_(loaded.narrow(0, self.tp_rank * s.num_v_heads, s.num_v_heads))

    # ------------------------------------------------------------------ Qwen3-Next's layout
    def _load_grouped_qkvz(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        s = self.full_shape
        r = s.num_v_heads // s.num_k_heads
        per_group = [s.head_k_dim, s.head_k_dim, r * s.head_v_dim, r * s.head_v_dim]
        if loaded.shape != (s.conv_dim + s.value_dim, param.shape[1]):
            raise ValueError(f"in_proj_qkvz has shape {tuple(loaded.shape)}, expected "
                             f"{(s.conv_dim + s.value_dim, param.shape[1])}")
        parts = loaded.view(s.num_k_heads, sum(per_group), -1).split(per_group, dim=1)
        for name, x in zip("qkvz", parts):
            self._load_qkvz_shard(param, x.reshape(-1, loaded.shape[1]), name)

    def _load_grouped_ba(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        s = self.full_shape
        r = s.num_v_heads // s.num_k_heads
        if loaded.shape != (2 * s.num_v_heads, param.shape[1]):
            raise ValueError(f"in_proj_ba has shape {tuple(loaded.shape)}, expected {(2 * s.num_v_heads, param.shape[1])}")
        b, a = loaded.view(s.num_k_heads, 2 * r, -1).split([r, r], dim=1)
        self._load_ba_shard(param, b.reshape(-1, loaded.shape[1]), "b")
        self._load_ba_shard(param, a.reshape(-1, loaded.shape[1]), "a")

    # ------------------------------------------------------------------ forward
    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        s, meta, ops = self.shape, ctx.meta, self.ops
        state = ctx.layer_caches[self.layer_idx][STATE_GROUP]
        t = hidden.shape[0]
        mixed, z = self.in_proj_qkvz(hidden).split([s.conv_dim, s.value_dim], dim=-1)
        b, a = self.in_proj_ba(hidden).split([s.num_v_heads, s.num_v_heads], dim=-1)
        weight = self.conv1d.weight.squeeze(1)
        decode = meta.is_decode_only
        by_position = meta.state_positions  # a verify step: drafts run position by position, snapshotted
        # prefix caching: states to save at block boundaries inside this step (runner._state_checkpoints)
        checkpoints = ({} if meta.state_checkpoint_slots_cpu is None else
                       dict(checkpoint_slots=meta.state_checkpoint_slots_cpu,
                            checkpoint_offsets=meta.state_checkpoint_offsets_cpu))
        if by_position is not None:
            mixed = causal_conv1d_by_position(ops, mixed, weight, state["conv"], by_position)
        elif decode:
            mixed = ops.causal_conv1d_update(mixed, weight, state["conv"], meta.state_slots, meta.has_initial_state)
        else:
            mixed = ops.causal_conv1d_varlen(mixed, weight, state["conv"], meta.query_lens_cpu, meta.state_slots_cpu,
                                             meta.has_initial_state_cpu, **checkpoints)
        q, k, v = mixed.split([s.key_dim, s.key_dim, s.value_dim], dim=-1)
        q = q.view(t, s.num_k_heads, s.head_k_dim)
        k = k.view(t, s.num_k_heads, s.head_k_dim)
        v = v.view(t, s.num_v_heads, s.head_v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # float32: exp(A_log) may overflow fp16
        if by_position is not None:
            core = gated_delta_rule_by_position(ops, q, k, v, g, beta, state["ssm"], by_position)
        elif decode:
            core = ops.gated_delta_rule_update(q, k, v, g, beta, state["ssm"], meta.state_slots, meta.has_initial_state)
        else:
            core = ops.gated_delta_rule_varlen(q, k, v, g, beta, state["ssm"], meta.query_lens_cpu,
                                               meta.state_slots_cpu, meta.has_initial_state_cpu, **checkpoints)
        core = self.norm(core.reshape(-1, s.head_v_dim), z.reshape(-1, s.head_v_dim))
        return self.out_proj(core.reshape(t, s.value_dim))
