"""Block-scaled FP8 checkpoints (DeepSeek-V3 / Kimi-K2 `quant_method: "fp8"`): which layers hold
FP8 weights, how their scales load, and the two ways to run them.

Which modules: every linear projection (our `Linear` / `MergedLinear`) and the routed experts,
as transformers' `replace_with_fp8_linear` converts every `nn.Linear` and the `.experts` modules.
Not converted: embeddings, lm_head (transformers skips the output embeddings), norms, and the
MoE router (its gate is not an nn.Linear in transformers, here a `RouterGate`, kept float32 with
its e_score_correction_bias); nor any module matched by the config's `modules_to_not_convert`.

Modes (EngineBuilder.quantization):
  "fp8"      weights stay FP8 with their scales; `Fp8Linear` quantises activations per token and
             128-channel group and runs the block-scaled GEMM (Triton / DeepGEMM on CUDA, the torch
             reference elsewhere); the routed experts stay FP8 too and run the block-scaled fused
             MoE (kernels/fused_moe_fp8_triton.py). One exception is dequantised at load: MLA's
             kv_b_proj (its weight is read as a matrix by the attention, not through forward()).
  "dequant"  every FP8 weight is dequantised to the model dtype right after loading, one tensor at
             a time (a float32 temporary of one matrix), so the model is a plain bf16/fp32 one.

Loading: conversion happens before `load_weights`, so each FP8 tensor is copied straight into
an FP8 parameter and each `weight_scale_inv` into a float32 one; nothing is dequantised until
every tensor is in, so the loader never needs a weight and its scale at the same moment.

Scale layout: a weight of N rows has ceil(N / bn) scale rows (`row_div` = bn). A merged GEMM
(gate and up projections side by side, or stacked expert gate/up) whose shard offsets are not
multiples of bn cannot share bn-row blocks between shards: it keeps one scale row per weight row
(`row_div` 1), each row holding its own shard's block scale. Released checkpoints (intermediate
sizes multiples of 128) never need it; the tiny test checkpoints do.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dlengine.config import ConfigError, QuantizationConfig
from dlengine.kernels.selection import HAS_FP8_GEMM, Ops, current_kernels
from dlengine.kernels.fp8.fp8_torch import FP8_DTYPE, cdiv, dequantize_weight
from dlengine.models.layers.linear import Linear
from dlengine.models.layers.moe import FusedMoE
from dlengine.models.layers.parallel_linear import ColumnParallelLinear, RowParallelLinear

FP8_MODES = ("auto", "fp8", "dequant")
# read as matrices outside forward() (MLA's attention expands the latent through kv_b_proj's
# weight), so they need real-valued weights in every mode
_DEQUANT_ALWAYS = ("kv_b_proj",)


def should_convert(name: str, skip: Iterable[str]) -> bool:
    """transformers' `should_convert_module`: a pattern skips `name` when it matches from the start
    up to a module boundary (also as a regex) or is a suffix of it."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in skip)


def _scale_rows(out_features: int, shard_offsets: Iterable[int], bn: int) -> int:
    """bn when every shard starts on a block boundary (blocks can be shared), else 1."""
    return bn if all(off % bn == 0 for off in shard_offsets) else 1


def _load_scale_rows(target: torch.Tensor, loaded: torch.Tensor, size: int, bn: int, row_div: int,
                     what: str) -> None:
    """Copy a shard's checkpoint scales [ceil(size/bn), Kb] into `target` (its rows of the
    parameter, in the parameter's layout)."""
    expect = (cdiv(size, bn), target.shape[-1])
    if tuple(loaded.shape) != expect:
        raise ValueError(f"checkpoint scale {what} has shape {tuple(loaded.shape)}, expected {expect}")
    if row_div != 1:
        target.copy_(loaded)
    else:
        target.copy_(loaded.repeat_interleave(bn, dim=0)[:size])


class Fp8Linear(nn.Module):
    """A `Linear` / `MergedLinear` whose weight is float8_e4m3fn [N, K] with `weight_scale_inv`
    [ceil(N / row_div), ceil(K / bk)]. After `dequantize_()` it is a plain linear layer."""

    def __init__(self, src: nn.Module, block: tuple[int, int], shard_offsets: dict | None = None,
                 ops: Ops | None = None) -> None:
        super().__init__()
        self.ops = ops or current_kernels().ops  # fp8_linear: Triton / DeepGEMM or the torch W8A8 reference
        n, k = src.out_features, src.in_features
        bn, bk = block
        self.in_features, self.out_features, self.block = k, n, (bn, bk)
        self.shard_offsets: dict = dict(getattr(src, "shard_offsets", {}) if shard_offsets is None else shard_offsets)
        self.row_div = _scale_rows(n, (off for off, _ in self.shard_offsets.values()), bn)
        dev = src.weight.device
        self.weight = nn.Parameter(torch.empty(n, k, dtype=FP8_DTYPE, device=dev), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(cdiv(n, self.row_div), cdiv(k, bk), dtype=torch.float32, device=dev), requires_grad=False)
        self.weight.weight_loader = self._load_weight
        self.weight_scale_inv.weight_loader = self._load_scale
        self.bias = src.bias  # biases stay in the model dtype (keeps its loader)
        self.dequantized = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"scale_row_div={self.row_div}, dequantized={self.dequantized}")

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        target, what = param.data, "weight"
        if shard_id is not None:
            off, size = self.shard_offsets[shard_id]
            target, what = param.data[off : off + size], f"shard {shard_id!r}"
        if loaded.dtype != FP8_DTYPE:
            raise ValueError(f"checkpoint {what} is {loaded.dtype}, expected float8_e4m3fn for an FP8 checkpoint")
        if loaded.shape != target.shape:
            raise ValueError(f"checkpoint {what} has shape {tuple(loaded.shape)}, expected {tuple(target.shape)}")
        target.copy_(loaded)

    def _load_scale(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        bn = self.block[0]
        if shard_id is None:
            _load_scale_rows(param.data, loaded, self.out_features, bn, self.row_div, "weight_scale_inv")
            return
        off, size = self.shard_offsets[shard_id]
        rows = slice(off // bn, off // bn + cdiv(size, bn)) if self.row_div != 1 else slice(off, off + size)
        _load_scale_rows(param.data[rows], loaded, size, bn, self.row_div, f"shard {shard_id!r}")

    @torch.no_grad()
    def dequantize_(self, dtype: torch.dtype) -> None:
        w = dequantize_weight(self.weight.data, self.weight_scale_inv.data, self.block[1], self.row_div, dtype)
        self.weight = nn.Parameter(w, requires_grad=False)
        del self.weight_scale_inv
        self.dequantized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dequantized:
            return F.linear(x, self.weight, self.bias)
        return self.ops.fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.row_div, self.bias)


class Fp8FusedMoE(FusedMoE):
    """FusedMoE whose stacked expert weights are FP8 with `w13_weight_scale_inv` /
    `w2_weight_scale_inv`, run by the block-scaled fused MoE (kernels/fused_moe_fp8_triton.py).
    `prepare_fp8_model` turns a built FusedMoE into one in place (`__class__` swap: the module
    keeps its router and settings, and model files need not know about quantisation)."""

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "w13_weight_scale_inv"):  # dequantised at load
            return super().forward(x, router_logits)
        topk_weights, topk_ids = self.router(router_logits)
        return self.ops.fused_experts_fp8(x, self.w13_weight, self.w13_weight_scale_inv, self.w2_weight,
                                          self.w2_weight_scale_inv, self.fp8_block, self.w13_row_div,
                                          topk_weights, topk_ids)


_FP8_CLASSES: dict[type, type] = {}


def _fp8_class(cls: type) -> type:
    if cls is FusedMoE:
        return Fp8FusedMoE
    if cls not in _FP8_CLASSES:
        _FP8_CLASSES[cls] = type(f"Fp8{cls.__name__}", (Fp8FusedMoE, cls), {})
    return _FP8_CLASSES[cls]


def _make_experts_fp8(moe: FusedMoE, block: tuple[int, int]) -> None:
    """FP8 stacked expert weights plus `w13_weight_scale_inv` / `w2_weight_scale_inv`, loaded per
    expert (or from fused 3-D tensors)."""
    # mix Fp8FusedMoE in front of the module's own class (e.g. ParallelFusedMoE, whose layer
    # bookkeeping stays), so its forward runs the FP8 experts
    if not isinstance(moe, Fp8FusedMoE):
        moe.__class__ = _fp8_class(type(moe))
    bn, bk = block
    e, h, i = moe.num_experts, moe.hidden_size, moe.intermediate_size
    dev = moe.w13_weight.device
    moe.fp8_block = block
    moe.w13_row_div = _scale_rows(2 * i, (0, i), bn)
    for name, (n, k), row_div in (("w13", (2 * i, h), moe.w13_row_div), ("w2", (h, i), bn)):
        w = nn.Parameter(torch.empty(e, n, k, dtype=FP8_DTYPE, device=dev), requires_grad=False)
        w.weight_loader = moe.weight_loader  # copies into the right slice whatever the dtype
        s = nn.Parameter(torch.empty(e, cdiv(n, row_div), cdiv(k, bk), dtype=torch.float32, device=dev),
                         requires_grad=False)
        s.weight_loader = lambda p, t, shard=None, _m=moe: _load_expert_scale(_m, p, t, shard)
        setattr(moe, f"{name}_weight", w)
        setattr(moe, f"{name}_weight_scale_inv", s)


def _load_expert_scale(moe: FusedMoE, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
    bn = moe.fp8_block[0]
    i, h = moe.intermediate_size, moe.hidden_size
    is_w13 = param is moe.w13_weight_scale_inv
    row_div = moe.w13_row_div if is_w13 else bn
    if shard_id is None:  # fused 3-D tensor [E, ceil(rows / bn), Kb]: gate and up are one shard on disk
        n = 2 * i if is_w13 else h
        expect = (moe.num_experts, cdiv(n, bn), param.shape[-1])
        if tuple(loaded.shape) != expect:
            raise ValueError(f"checkpoint fused expert scales have shape {tuple(loaded.shape)}, expected {expect}")
        param.data.copy_(loaded if row_div != 1 else loaded.repeat_interleave(bn, dim=1)[:, :n])
        return
    shard, e = shard_id
    off, size = {"gate": (0, i), "up": (i, i), "down": (0, h)}[shard]
    rows = slice(off // bn, off // bn + cdiv(size, bn)) if row_div != 1 else slice(off, off + size)
    _load_scale_rows(param.data[e, rows], loaded, size, bn, row_div, f"expert {e} {shard}_proj")


def _expert_scale_rows(num_experts: int) -> list[tuple]:
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


def _linear_shards(module: nn.Module) -> dict | None:
    """{shard name: (offset, size)} of a linear layer FP8 can replace, None for other modules.
    `Linear` / `MergedLinear`, and the tensor-parallel layers when they are not sharded (one
    process: the builder refuses FP8 with parallel(...)). LMHead, Embedding and RouterGate are
    none of these, so they stay unquantised as in transformers."""
    if isinstance(module, Linear):
        return dict(getattr(module, "shard_offsets", {}))
    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module.tp_group is None:
        shards = getattr(module, "shards", {})
        return {k: (v.offset, v.size) for k, v in shards.items() if k is not None}
    return None


def prepare_fp8_model(model: nn.Module, quant: QuantizationConfig, ops: Ops | None = None) -> int:
    """Before loading: swap every convertible linear layer for an `Fp8Linear` (running `ops`, the
    engine's: default `current_kernels().ops`) and give FusedMoE FP8 expert parameters with
    scales (the experts keep the ops they were built with). Returns how many modules were converted."""
    ops = ops or current_kernels().ops
    skip = ("lm_head",) + quant.modules_to_not_convert
    converted = 0
    experts = 0
    for name, module in list(model.named_modules()):
        if not should_convert(name, skip):
            continue
        shards = _linear_shards(module)
        if shards is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, Fp8Linear(module, quant.weight_block_size, shards, ops))
            converted += 1
        elif isinstance(module, FusedMoE):
            _make_experts_fp8(module, quant.weight_block_size)
            experts = max(experts, module.num_experts)
            converted += 1
    if experts:
        model.expert_params = list(getattr(model, "expert_params", [])) + _expert_scale_rows(experts)
    if not converted:
        raise ConfigError(f"{type(model).__name__}: the checkpoint is FP8-quantised but no linear layer of the model "
                          "could hold FP8 weights")
    return converted


@torch.no_grad()
def finish_fp8_load(model: nn.Module, mode: str, dtype: torch.dtype) -> None:
    """After loading: dequantise what the mode (or the layer's use) needs in `dtype`, one tensor at
    a time, freeing each FP8 tensor as its replacement is made."""
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear) and not module.dequantized:
            if mode == "dequant" or name.rsplit(".", 1)[-1] in _DEQUANT_ALWAYS:
                module.dequantize_(dtype)
        elif isinstance(module, FusedMoE) and hasattr(module, "w13_weight_scale_inv") and mode == "dequant":
            for w in ("w13", "w2"):
                row_div = module.w13_row_div if w == "w13" else module.fp8_block[0]
                deq = dequantize_weight(getattr(module, f"{w}_weight").data, getattr(module, f"{w}_weight_scale_inv").data,
                                        module.fp8_block[1], row_div, dtype)
                param = nn.Parameter(deq, requires_grad=False)
                param.weight_loader = module.weight_loader
                setattr(module, f"{w}_weight", param)
                delattr(module, f"{w}_weight_scale_inv")


def resolve_fp8_mode(requested: str, device: torch.device, quant: QuantizationConfig | None = None) -> str:
    """"auto": "fp8" on CUDA devices with FP8 tensor cores (compute capability >= 8.9) and Triton,
    "dequant" elsewhere. "fp8" on a CPU runs the torch W8A8 reference (slow; for checking).
    The Triton kernels take one scale group per K step, so on CUDA the block's K size must be a
    power of two >= 32 (fp8 tensor-core dots need K >= 32; released checkpoints use 128)."""
    if requested not in FP8_MODES:
        raise ConfigError(f"unknown quantization mode {requested!r}; choose one of {FP8_MODES}")
    bk = quant.weight_block_size[1] if quant is not None else 128
    block_ok = bk >= 32 and bk & (bk - 1) == 0
    gpu_ok = (device.type == "cuda" and HAS_FP8_GEMM and block_ok
              and torch.cuda.get_device_capability(device) >= (8, 9))
    if requested == "auto":
        return "fp8" if gpu_ok else "dequant"
    if requested == "fp8" and device.type == "cuda" and not gpu_ok:
        raise ConfigError(f"quantization('fp8') needs Triton, a GPU with FP8 tensor cores (compute capability "
                          f">= 8.9, e.g. H100) and a weight block K size that is a power of two >= 32 (this "
                          f"checkpoint: {bk}); use quantization('dequant')")
    return requested
