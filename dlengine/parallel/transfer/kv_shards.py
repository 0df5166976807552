"""KV shards of a tensor-parallel prefill engine, landing in a decode engine that holds every head.

Under tensor parallelism each prefill rank caches a slice of the KV heads (GQA: an even split, or
one replicated head per rank when there are fewer heads than ranks; MLA: the whole latent on
every rank), in its own block-major staging region. A decode engine with all heads reads each
needed rank's slice into a sub-buffer of its own staging region, then scatters it into that head
range of its cache.

The sub-buffers carve the decode engine's one registered staging region ([blocks, planes, block
bytes]) up by head range: shard i is a block-major buffer [blocks, planes, block_size, its token
bytes] starting at byte `base`. The head ranges of the shards read partition the heads, so the
sub-buffers fill the region exactly; staging block b of a pull is block b of every sub-buffer,
so one allocation (and one quarantine) of region blocks covers every shard of a request.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from dlengine.parallel.transfer.base import HandshakeError, KVLayout, Segment


def kv_head_range(tp_rank: int, num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(first head, number of heads) of the KV heads tensor-parallel rank `tp_rank` caches; the
    same split as QKVParallelLinear (models/layers/parallel_linear.py)."""
    if num_kv_heads >= tp:
        if num_kv_heads % tp:
            raise HandshakeError(f"{num_kv_heads} kv heads cannot be split over tensor-parallel size {tp}")
        per_rank = num_kv_heads // tp
        return tp_rank * per_rank, per_rank
    if tp % num_kv_heads:
        raise HandshakeError(f"tensor-parallel size {tp} is not a multiple of the {num_kv_heads} kv heads")
    return tp_rank * num_kv_heads // tp, 1


def shard_layout(full: KVLayout, heads: int, num_blocks: int | None = None, head_start: int = 0) -> KVLayout:
    """The layout of a region holding heads [head_start, head_start + heads) of `full`'s heads
    (same model, dtype, block size)."""
    elem = full.token_bytes // (full.heads * full.head_dim)
    split = heads != full.heads
    return replace(full, heads=heads, token_bytes=heads * full.head_dim * elem,
                   num_blocks=full.num_blocks if num_blocks is None else num_blocks,
                   num_kv_heads=full.num_kv_heads or full.heads if split else full.num_kv_heads,
                   head_start=head_start if split else full.head_start)


@dataclass(frozen=True)
class ShardSlice:
    """Where one prefill rank's heads land in the decode engine's staging region and cache."""

    tp_rank: int
    head_start: int
    heads: int
    layout: KVLayout  # its sub-buffer: block-major, the staging region's block count
    base: int  # byte offset of the sub-buffer inside the staging region
    whole: bool  # it holds every head: the sub-buffer is the staging region itself

    def segments(self, remote: KVLayout, remote_blocks: Sequence[int], region_blocks: Sequence[int],
                 num_tokens: int) -> list[Segment]:
        """Byte segments reading this shard's KV of `num_tokens` tokens into `region_blocks`."""
        # each slice is read from one rank only: groups every rank holds whole are copied from it
        segs = self.layout.segments_from(remote, remote_blocks, region_blocks, num_tokens, replicated=True)
        return [(r, self.base + l, n) for r, l, n in segs]


def whole_slice(region_layout: KVLayout) -> ShardSlice:
    """An unsharded prefill engine's KV: every head, straight into the staging region."""
    return ShardSlice(0, 0, region_layout.heads, region_layout, 0, True)


def rank_heads(region_layout: KVLayout, tp: int) -> list[tuple[int, int]]:
    """Per prefill tensor-parallel rank, the (first head, heads) it caches, in terms of the decode
    engine's full layout. MLA's latent is one "head" that every rank holds whole."""
    if region_layout.kind == "mla":
        return [(0, region_layout.heads)] * tp
    return [kv_head_range(r, region_layout.heads, tp) for r in range(tp)]


def plan_slices(region_layout: KVLayout, tp: int) -> dict[int, ShardSlice]:
    """tp rank -> its ShardSlice, for the ranks a pull reads from: the first rank holding each
    head range (replicated heads and MLA latents are read once)."""
    slices: dict[int, ShardSlice] = {}
    seen: set[tuple[int, int]] = set()
    base = 0
    for r, (start, heads) in enumerate(rank_heads(region_layout, tp)):
        if (start, heads) in seen:
            continue
        seen.add((start, heads))
        layout = shard_layout(region_layout, heads, head_start=start)
        slices[r] = ShardSlice(r, start, heads, layout, base, heads == region_layout.heads)
        base += layout.nbytes
    assert base == region_layout.nbytes, "the shards' head ranges must partition the heads"
    return slices


def stage_in_slice(region_tensor: torch.Tensor, sl: ShardSlice, kv_cache, region_blocks: Sequence[int],
                   cache_blocks: Sequence[int], num_tokens: int) -> None:
    """Staging sub-buffer -> this shard's head range of the cache blocks (decode side, after the
    pull landed). Positions past `num_tokens` in the last block are zeroed in that head range, as
    KVRegion.stage_in does for whole blocks: a NaN bit pattern in a masked position still poisons
    the torch attention reference."""
    if not len(cache_blocks):
        return
    lay = sl.layout
    planes = lay.num_layers * lay.parts
    run = lay.block_size * lay.token_bytes
    sub = region_tensor.view(-1)[sl.base: sl.base + lay.nbytes].view(lay.num_blocks, planes, lay.block_size,
                                                                      lay.token_bytes)
    data = sub.index_select(0, torch.as_tensor(list(region_blocks), dtype=torch.long))
    cache = kv_cache.storage.view(torch.uint8).view(planes, kv_cache.num_blocks, kv_cache.block_size, -1)
    data = data.to(cache.device).permute(1, 0, 2, 3)  # [planes, n, block_size, shard token bytes]
    lo = sl.head_start * (lay.token_bytes // sl.heads)
    hi = lo + lay.token_bytes
    assert run == cache.shape[2] * (hi - lo), "staging and cache block sizes differ"
    idx = torch.as_tensor(list(cache_blocks), dtype=torch.long, device=cache.device)
    cache[:, idx, :, lo:hi] = data
    used = num_tokens - (len(cache_blocks) - 1) * kv_cache.block_size
    if 0 < used < kv_cache.block_size:
        cache[:, cache_blocks[-1], used:, lo:hi] = 0
