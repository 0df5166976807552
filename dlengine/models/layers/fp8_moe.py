"""FP8 routed experts: a `ParallelFusedMoE` whose stacked expert weights stay float8_e4m3fn with
`w13_weight_scale_inv` / `w2_weight_scale_inv`, run by the block-scaled fused MoE
(kernels/fused_moe_fp8_triton.py; the torch reference on CPU).

`make_experts_fp8` turns a built layer into one in place (`__class__` swap: the module keeps its
router, its parallel mode and its collectives; model files need not know about quantisation).
The parameters hold what the layer's mode gives this rank (fp8_shards.py explains the shapes):

* local: every expert, whole.
* ep: the experts of this rank's slots, whole; other ranks' per-expert tensors are never read.
* tp: every expert, the intermediate columns of this rank as a `KWindow` (whole bk-blocks): gate
  and up rows [window] stacked as w13, down's columns [window] as w2 with the other ranks'
  columns zeroed, so the FP8 activations between the two GEMMs are quantised in the checkpoint's
  groups. Dequantised, the layer keeps only its own columns.
"""

from __future__ import annotations

import torch
from torch import nn

from dlengine.config import ConfigError
from dlengine.kernels.fp8.fp8_torch import FP8_DTYPE, cdiv, dequantize_weight
from dlengine.models.layers.fp8_shards import KWindow, load_fp8_block, load_scale_block, scale_row_div, whole_rows
from dlengine.models.layers.moe import FusedMoE
from dlengine.models.layers.parallel_linear import Shard
from dlengine.models.layers.parallel_moe import ParallelFusedMoE


class Fp8FusedMoE(ParallelFusedMoE):
    """The FP8 experts (mixed in front of the layer's own class by `make_experts_fp8`)."""

    def run_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "w13_weight_scale_inv"):  # dequantised at load
            return super().run_experts(x, topk_weights, topk_ids)
        return self.ops.fused_experts_fp8(x, self.w13_weight, self.w13_weight_scale_inv, self.w2_weight,
                                          self.w2_weight_scale_inv, self.fp8_block, self.w13_row_div,
                                          topk_weights, topk_ids)

    def extra_repr(self) -> str:
        if not hasattr(self, "w13_weight_scale_inv"):
            return super().extra_repr() + ", fp8=dequantized"
        return super().extra_repr() + f", fp8_block={self.fp8_block}, intermediate_held={self.fp8_inter.size}"

    # ------------------------------------------------------------------ layout
    def _slot(self, expert: int) -> int | None:
        """Where logical expert `expert` sits in the stacked parameters (None: another EP rank's)."""
        return self.slot_of_expert.get(expert) if self.mode == "ep" else expert

    def _held_experts(self) -> list[int]:
        return list(self.local_experts) if self.mode == "ep" else list(range(self.num_experts))

    def _w13_rows(self, fused: bool) -> tuple[Shard, Shard]:
        """Gate and up rows of w13: the window of each projection ([E, I, H] tensors per expert,
        or one [E, 2I, H] with up after gate)."""
        i, win = self.intermediate_size, self.fp8_inter
        full, up_start = (2 * i, i + win.start) if fused else (i, win.start)
        return Shard("gate", full, win.start, win.size, 0), Shard("up", full, up_start, win.size, win.size)

    # ------------------------------------------------------------------ loading
    def _load_per_expert(self, param: nn.Parameter, loaded: torch.Tensor, shard_id, what: str,
                         fused_shape: tuple[int, int], load_one) -> None:
        """Route a checkpoint tensor to the experts this rank holds: a fused 3-D tensor (every
        expert, `fused_shape` each) or one expert's `(shard, expert)`; `load_one(target, tensor,
        shard, label, fused)` copies one expert."""
        if shard_id is None:
            self._check_fused(loaded, what, fused_shape)
            for slot, e in enumerate(self._held_experts()):
                load_one(param.data[slot], loaded[e], None, f"fused expert {e}", True)
            return
        shard, e = shard_id
        slot = self._slot(e)
        if slot is not None:
            load_one(param.data[slot], loaded, shard, f"expert {e} {shard}_proj", False)

    def _load_fp8_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        is_w13 = param is self.w13_weight
        i, h = self.intermediate_size, self.hidden_size
        self._load_per_expert(param, loaded, shard_id, "experts", (2 * i, h) if is_w13 else (h, i),
                              lambda t, x, shard, what, fused: self._load_expert(t, x, shard, is_w13, what, fused))

    def _load_expert(self, target: torch.Tensor, loaded: torch.Tensor, shard: str | None, is_w13: bool,
                     what: str, fused: bool) -> None:
        """One expert's tensor (`shard` gate / up / down, or None for a fused one) into `target`,
        its [2W, H] or [H, W] slice."""
        if is_w13:
            for rows in self._w13_rows(fused):
                if shard in (None, rows.name):
                    load_fp8_block(target[rows.offset : rows.offset + rows.size], loaded, rows,
                                   KWindow.whole(self.hidden_size), what)
        else:
            load_fp8_block(target, loaded, whole_rows(self.hidden_size), self.fp8_inter, what)

    def _load_fp8_scale(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        is_w13 = param is self.w13_weight_scale_inv
        (bn, bk), i, h = self.fp8_block, self.intermediate_size, self.hidden_size
        shape = (cdiv(2 * i, bn), cdiv(h, bk)) if is_w13 else (cdiv(h, bn), cdiv(i, bk))
        self._load_per_expert(param, loaded, shard_id, "expert scales", shape,
                              lambda t, x, shard, what, fused: self._load_expert_scale(t, x, shard, is_w13, what, fused))

    def _load_expert_scale(self, target: torch.Tensor, loaded: torch.Tensor, shard: str | None, is_w13: bool,
                           what: str, fused: bool) -> None:
        if is_w13:
            for rows in self._w13_rows(fused):
                if shard in (None, rows.name):
                    load_scale_block(target, loaded, rows, KWindow.whole(self.hidden_size), self.fp8_block,
                                     self.w13_row_div, what)
        else:
            load_scale_block(target, loaded, whole_rows(self.hidden_size), self.fp8_inter, self.fp8_block,
                             self.fp8_block[0], what)

    def _check_fused(self, loaded: torch.Tensor, what: str, per_expert: tuple[int, int]) -> None:
        expect = (self.num_experts, *per_expert)
        if tuple(loaded.shape) != expect:
            raise ValueError(f"checkpoint fused {what} have shape {tuple(loaded.shape)}, expected {expect}")

    # ------------------------------------------------------------------ dequant mode
    @torch.no_grad()
    def dequantize_experts_(self, dtype: torch.dtype) -> None:
        """Replace the FP8 experts by `dtype` ones (this rank's own intermediate columns only)."""
        own = self.fp8_inter.own
        for w in ("w13", "w2"):
            row_div = self.w13_row_div if w == "w13" else self.fp8_block[0]
            deq = dequantize_weight(getattr(self, f"{w}_weight").data, getattr(self, f"{w}_weight_scale_inv").data,
                                    self.fp8_block[1], row_div, dtype)
            if self.fp8_inter.padded:
                size = self.fp8_inter.size
                deq = (torch.cat([deq[:, own], deq[:, size + own.start : size + own.stop]], dim=1) if w == "w13"
                       else deq[:, :, own].contiguous())
            param = nn.Parameter(deq, requires_grad=False)
            param.weight_loader = self.weight_loader
            setattr(self, f"{w}_weight", param)
            delattr(self, f"{w}_weight_scale_inv")


_FP8_CLASSES: dict[type, type] = {ParallelFusedMoE: Fp8FusedMoE}


def _fp8_class(cls: type) -> type:
    if cls not in _FP8_CLASSES:
        _FP8_CLASSES[cls] = type(f"Fp8{cls.__name__}", (Fp8FusedMoE, cls), {})
    return _FP8_CLASSES[cls]


def make_experts_fp8(moe: FusedMoE, block: tuple[int, int], name: str) -> None:
    """Give `moe` FP8 stacked expert weights plus `w13_weight_scale_inv` / `w2_weight_scale_inv`
    of this rank's experts and intermediate columns, loaded per expert or from fused 3-D tensors."""
    if not isinstance(moe, ParallelFusedMoE):
        raise ConfigError(f"{name}: FP8 experts need a ParallelFusedMoE layer, not {type(moe).__name__}")
    if not isinstance(moe, Fp8FusedMoE):
        moe.__class__ = _fp8_class(type(moe))
    bn, bk = block
    h, i = moe.hidden_size, moe.intermediate_size
    moe.fp8_block = block
    if moe.mode == "tp":
        li = moe.local_intermediate
        moe.fp8_inter = KWindow.around(i, moe.tp_rank * li, li, bk)
    else:
        moe.fp8_inter = KWindow.whole(i)
    e, w = len(moe._held_experts()), moe.fp8_inter.size
    # both checkpoint layouts (per expert, fused gate_up) must be able to share scale rows
    moe.w13_row_div = scale_row_div(moe._w13_rows(fused=False) + moe._w13_rows(fused=True), bn)
    dev = moe.w2_weight.device
    for wname, (n, k), row_div in (("w13", (2 * w, h), moe.w13_row_div), ("w2", (h, w), bn)):
        weight = nn.Parameter(torch.empty(e, n, k, dtype=FP8_DTYPE, device=dev), requires_grad=False)
        weight.weight_loader = moe._load_fp8_weight
        scale = nn.Parameter(torch.empty(e, cdiv(n, row_div), cdiv(k, bk), dtype=torch.float32, device=dev),
                             requires_grad=False)
        scale.weight_loader = moe._load_fp8_scale
        if moe.mode == "ep":  # the loader then never reads other ranks' per-expert tensors
            weight.wants_shard = scale.wants_shard = moe._wants_shard
        setattr(moe, f"{wname}_weight", weight)
        setattr(moe, f"{wname}_weight_scale_inv", scale)


def expert_scale_rows(num_experts: int) -> list[tuple]:
    """Rename-table rows for the expert scales, beside FusedMoE.checkpoint_mapping's weight rows."""
    rows: list[tuple] = []
    for e in range(num_experts):
        for hf, ours, shard in (("gate_proj", "w13", "gate"), ("up_proj", "w13", "up"), ("down_proj", "w2", "down")):
            rows.append((f"experts.{ours}_weight_scale_inv", f"experts.{e}.{hf}.weight_scale_inv", (shard, e),
                         (f"{shard}.{e}",)))
    every = range(num_experts)
    rows.append(("experts.w13_weight_scale_inv", "experts.gate_up_proj_scale_inv", None,
                 tuple(f"gate.{e}" for e in every) + tuple(f"up.{e}" for e in every)))
    rows.append(("experts.w2_weight_scale_inv", "experts.down_proj_scale_inv", None,
                 tuple(f"down.{e}" for e in every)))
    return rows
