"""Block-scaled FP8 checkpoints (DeepSeek-V3 / Kimi-K2 `quant_method: "fp8"`): which layers hold
FP8 weights, how their scales load, and the two ways to run them.

Which modules: every linear projection (our `Linear` / `MergedLinear` and the tensor-parallel
column / row layers) and the routed experts (fp8_moe.py), as transformers' `replace_with_fp8_linear`
converts every `nn.Linear` and the `.experts` modules. Not converted: embeddings, lm_head
(transformers skips the output embeddings), norms, and the MoE router (its gate is not an nn.Linear
in transformers, here a `RouterGate`, kept float32 with its e_score_correction_bias); nor any module
matched by the config's `modules_to_not_convert`.

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

Tensor parallelism: a converted layer holds this rank's shard of the weight and the scales of
its blocks; fp8_shards.py says how a shard boundary inside a 128-block is handled (output rows:
per-row scales; input columns: whole blocks with the other ranks' columns zeroed, so the FP8
GEMM quantises activations in the checkpoint's groups and the result is the single-process one).

Scale layout: a weight of N rows has ceil(N / bn) scale rows (`row_div` = bn). A merged GEMM
(gate and up projections side by side, or stacked expert gate/up) whose shard offsets are not
multiples of bn cannot share bn-row blocks between shards: it keeps one scale row per weight row
(`row_div` 1), each row holding its own shard's block scale. Released checkpoints (intermediate
sizes multiples of 128) never need it; the tiny test checkpoints do."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlengine.config import ConfigError, QuantizationConfig
from dlengine.kernels.fp8.fp8_torch import FP8_DTYPE, cdiv, dequantize_weight
from dlengine.kernels.selection import HAS_FP8_GEMM, Ops, current_kernels
from dlengine.models.layers.fp8_moe import Fp8FusedMoE, expert_scale_rows, make_experts_fp8
from dlengine.models.layers.fp8_shards import KWindow, load_fp8_block, load_scale_block, scale_row_div, whole_rows
from dlengine.models.layers.linear import Linear
from dlengine.models.layers.moe import FusedMoE
from dlengine.models.layers.parallel_linear import ColumnParallelLinear, RowParallelLinear, Shard

FP8_MODES = ("auto", "fp8", "dequant")
# read as matrices outside forward() (MLA's attention expands the latent through kv_b_proj's
# weight), so they need real-valued weights in every mode
_DEQUANT_ALWAYS = ("kv_b_proj",)


def should_convert(name: str, skip: Iterable[str]) -> bool:
    """transformers' `should_convert_module`: a pattern skips `name` when it matches from the start
    up to a module boundary (also as a regex) or is a suffix of it."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in skip)


class Fp8Linear(nn.Module):
    """A linear layer whose weight is float8_e4m3fn [N, K] with `weight_scale_inv`
    [ceil(N / row_div), ceil(K / bk)]: output rows `rows` (one `Shard` per projection of a merged
    GEMM, or the rank's shard), input columns `cols` (fp8_shards.py). After `dequantize_()` it is a
    plain linear layer over its own columns."""

    def __init__(self, src: nn.Module, block: tuple[int, int], rows: Sequence[Shard] | None = None,
                 cols: KWindow | None = None, ops: Ops | None = None) -> None:
        super().__init__()
        self.ops = ops or current_kernels().ops  # fp8_linear: Triton / DeepGEMM or the torch W8A8 reference
        if rows is None:  # a Linear / MergedLinear: its projections side by side, unsharded
            offsets = getattr(src, "shard_offsets", None) or {None: (0, src.out_features)}
            rows = [Shard(name, size, 0, size, off) for name, (off, size) in offsets.items()]
        self.rows = {s.name: s for s in rows}
        self.cols = cols or KWindow.whole(src.in_features)
        bn, bk = block
        n, k = sum(s.size for s in rows), self.cols.size
        self.in_features, self.out_features, self.block = k, n, (bn, bk)
        self.row_div = scale_row_div(rows, bn)
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

    def _shard(self, shard_id) -> Shard:
        if shard_id not in self.rows:
            raise ValueError(f"unknown shard {shard_id!r}; this layer has {list(self.rows)}")
        return self.rows[shard_id]

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        s = self._shard(shard_id)
        what = "weight" if shard_id is None else f"shard {shard_id!r}"
        load_fp8_block(param.data[s.offset : s.offset + s.size], loaded, s, self.cols, what)

    def _load_scale(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        what = "weight_scale_inv" if shard_id is None else f"shard {shard_id!r}"
        load_scale_block(param.data, loaded, self._shard(shard_id), self.cols, self.block, self.row_div, what)

    @torch.no_grad()
    def dequantize_(self, dtype: torch.dtype) -> None:
        w = dequantize_weight(self.weight.data, self.weight_scale_inv.data, self.block[1], self.row_div, dtype)
        if self.cols.padded:  # the zero columns were only there for the FP8 activation groups
            w = w[:, self.cols.own].contiguous()
            self.in_features = self.cols.own_size
        self.weight = nn.Parameter(w, requires_grad=False)
        del self.weight_scale_inv
        self.dequantized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dequantized:
            return F.linear(x, self.weight, self.bias)
        return self.ops.fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.row_div, self.bias)


class Fp8RowParallelLinear(Fp8Linear):
    """RowParallelLinear with FP8 weights: this rank's input columns (as a `KWindow`: whole
    blocks, see fp8_shards.py), partial outputs summed over the TP group, the bias added once.
    When the window holds other ranks' columns, the FP8 GEMM needs their activations too (to
    quantise whole groups): the input is all-gathered over the group and the window cut out."""

    def __init__(self, src: RowParallelLinear, block: tuple[int, int], ops: Ops | None = None) -> None:
        k_local = src.in_features
        cols = KWindow.around(k_local * src.tp_size, src.tp_rank * k_local, k_local, block[1])
        super().__init__(src, block, [whole_rows(src.out_features)], cols, ops)
        self.tp_size, self.tp_group, self.reduce = src.tp_size, src.tp_group, src.reduce

    def _window_input(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)[..., self.cols.start : self.cols.start + self.cols.size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dequantized:
            y = F.linear(x, self.weight)
        else:
            if self.cols.padded:
                x = self._window_input(x)
            y = self.ops.fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.row_div)
        if self.reduce:
            dist.all_reduce(y, group=self.tp_group)
        return y + self.bias if self.bias is not None else y


def _to_fp8_linear(module: nn.Module, block: tuple[int, int], ops: Ops) -> nn.Module | None:
    """The FP8 replacement of a linear layer, None for modules FP8 does not replace. LMHead,
    Embedding and RouterGate are not linear layers here, so they stay unquantised as in
    transformers."""
    if isinstance(module, Linear):
        return Fp8Linear(module, block, ops=ops)
    if isinstance(module, ColumnParallelLinear):  # also merged / QKV: its shards, this rank's rows
        return Fp8Linear(module, block, list(module.shards.values()), ops=ops)
    if isinstance(module, RowParallelLinear):
        return Fp8Linear(module, block, ops=ops) if module.tp_group is None else Fp8RowParallelLinear(module, block, ops)
    return None


def prepare_fp8_model(model: nn.Module, quant: QuantizationConfig, ops: Ops | None = None) -> int:
    """Before loading: swap every convertible linear layer for an FP8 one (this rank's shard of
    it under tensor parallelism; running `ops`, the engine's, default `current_kernels().ops`) and
    give the MoE layers FP8 expert parameters with scales (they keep the ops they were built with).
    Returns how many modules were converted."""
    ops = ops or current_kernels().ops
    skip = ("lm_head",) + quant.modules_to_not_convert
    converted = 0
    experts = 0
    for name, module in list(model.named_modules()):
        if not should_convert(name, skip):
            continue
        fp8 = _to_fp8_linear(module, quant.weight_block_size, ops)
        if fp8 is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, fp8)
            converted += 1
        elif isinstance(module, FusedMoE):
            make_experts_fp8(module, quant.weight_block_size, name)
            experts = max(experts, module.num_experts)
            converted += 1
    if experts:
        model.expert_params = list(getattr(model, "expert_params", [])) + expert_scale_rows(experts)
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
        elif isinstance(module, Fp8FusedMoE) and mode == "dequant":
            module.dequantize_experts_(dtype)


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
