"""Which part of a block-scaled FP8 checkpoint tensor a layer holds, and the scales that go with it.

A weight [N, K] comes with scales [ceil(N / bn), ceil(K / bk)] (kernels/fp8_torch.py). A layer
holds some output rows and some input columns of it: all of them on one process, a shard under
tensor parallelism, one projection of several side by side in a merged GEMM.

Output rows are described by a `Shard` (parallel_linear.py: rows [start, start + size) of a
checkpoint tensor of `full` rows, placed at local row `offset`). A rank holds exactly its rows.
Their scales are the scale rows of the blocks they cover when every shard of the layer starts on
a block edge (`row_div` bn: one scale row per bn weight rows), else one scale row per weight row
holding its block's scale (`row_div` 1). Rows never interact, so either way is exact.

Input columns are described by a `KWindow`. Activations are quantised per token in groups of bk
columns that line up with the weight's blocks. A rank whose columns do not start and end on
block edges (row-parallel layers and the experts' intermediate dimension under tensor
parallelism, when K / tp is not a multiple of bk) would quantise its part of the activation in
other groups than the single-process model does: another result, not a rounding difference. So
such a rank holds the whole blocks its columns touch, the other ranks' columns zeroed: the FP8
GEMM then quantises the checkpoint's groups (given the whole-block activation) and the zeros
drop the neighbours' share from the partial sum. A dequantised layer drops the extra columns
again (`KWindow.own`). Released checkpoints (K / tp a multiple of 128) never need the padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from dlengine.kernels.fp8.fp8_torch import FP8_DTYPE, cdiv
from dlengine.models.layers.parallel_linear import Shard


def whole_rows(n: int, name: str | None = None) -> Shard:
    """All `n` rows of a checkpoint tensor, at local row 0."""
    return Shard(name, n, 0, n, 0)


def scale_row_div(shards: Iterable[Shard], bn: int) -> int:
    """bn when every shard starts on a block edge both in the checkpoint and locally (its scale
    rows can be copied as they are), else 1 (one scale row per weight row)."""
    return bn if all(s.start % bn == 0 and s.offset % bn == 0 for s in shards) else 1


@dataclass(frozen=True)
class KWindow:
    """Input columns [start, start + size) of a checkpoint tensor with `full` columns, of which
    [own_start, own_start + own_size) are this rank's and the rest are held as zeros. `start`
    is a multiple of bk, so the held columns' blocks are the checkpoint's."""

    full: int
    start: int
    size: int
    own_start: int
    own_size: int

    @staticmethod
    def whole(k: int) -> "KWindow":
        return KWindow(k, 0, k, 0, k)

    @staticmethod
    def around(full: int, own_start: int, own_size: int, bk: int) -> "KWindow":
        """The whole bk-blocks that columns [own_start, own_start + own_size) touch."""
        start = own_start // bk * bk
        end = min(full, cdiv(own_start + own_size, bk) * bk)
        return KWindow(full, start, end - start, own_start, own_size)

    @property
    def padded(self) -> bool:
        """Whether the window holds other ranks' columns (as zeros)."""
        return self.size != self.own_size

    @property
    def own(self) -> slice:
        """This rank's columns, in local (held) numbering."""
        return slice(self.own_start - self.start, self.own_start - self.start + self.own_size)

    def scale_columns(self, bk: int) -> slice:
        return slice(self.start // bk, self.start // bk + cdiv(self.size, bk))


def load_fp8_block(target: torch.Tensor, loaded: torch.Tensor, rows: Shard, cols: KWindow, what: str) -> None:
    """Copy rows `rows` and columns `cols` of the checkpoint weight `loaded` [rows.full, cols.full]
    into `target` [rows.size, cols.size], zeroing the columns other ranks own."""
    if loaded.dtype != FP8_DTYPE:
        raise ValueError(f"checkpoint {what} is {loaded.dtype}, expected float8_e4m3fn for an FP8 checkpoint")
    if tuple(loaded.shape) != (rows.full, cols.full):
        raise ValueError(f"checkpoint {what} has shape {tuple(loaded.shape)}, expected {(rows.full, cols.full)}")
    target.copy_(loaded[rows.start : rows.start + rows.size, cols.start : cols.start + cols.size])
    if cols.padded:
        own = cols.own
        target[:, : own.start].zero_()
        target[:, own.stop :].zero_()


def load_scale_block(param: torch.Tensor, loaded: torch.Tensor, rows: Shard, cols: KWindow,
                     block: tuple[int, int], row_div: int, what: str) -> None:
    """Copy the scales of weight rows `rows` and columns `cols` from the checkpoint's
    [ceil(rows.full / bn), ceil(cols.full / bk)] into their rows of `param` (the layer's whole
    scale tensor, `row_div` weight rows per scale row)."""
    bn, bk = block
    expect = (cdiv(rows.full, bn), cdiv(cols.full, bk))
    if tuple(loaded.shape) != expect:
        raise ValueError(f"checkpoint scale {what} has shape {tuple(loaded.shape)}, expected {expect}")
    loaded = loaded[:, cols.scale_columns(bk)]
    if row_div == 1:  # each weight row gets its block's scale
        first, picked = rows.offset, loaded.repeat_interleave(bn, dim=0)[rows.start : rows.start + rows.size]
    else:  # rows.start and rows.offset are multiples of bn (scale_row_div)
        first = rows.offset // bn
        picked = loaded[rows.start // bn : rows.start // bn + cdiv(rows.size, bn)]
    param[first : first + picked.shape[0]].copy_(picked)
