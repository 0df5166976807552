"""KV shards of a tensor-parallel prefill engine, landing in a decode engine's cache shard.

Under tensor parallelism each rank caches a slice of the KV heads (GQA: an even split, or one
replicated head per rank when there are fewer heads than ranks; MLA: the whole latent on every
rank), in its own block-major staging region. A decode rank (of a decode engine at any
tensor-parallel size, 1 included) keeps heads C = [c0, c1) of its own; for each distinct head
range P of the prefill split that overlaps C it reads one prefill rank holding P, whole blocks
of it, into a sub-buffer of its staging, then scatters the heads of P inside C into its cache.
P may lie inside C (prefill tp >= decode tp: several shards fill the cache's heads), contain it
(prefill tp < decode tp: a shard holds more heads than the cache keeps, the rest is read and
dropped), or overlap it partly (splits that do not nest, e.g. 6 heads over 2 and over 3 ranks).
Reading whole prefill blocks keeps a shard's read one contiguous range (a head range of a
block-major row is strided by token); the price, when prefill tp < decode tp, is reading
decode-tp / prefill-tp times the bytes the cache keeps.

Staging of one pull: the decode side's staging region has rows of its own cache block's bytes.
A pull of n blocks takes ceil(n * S / row) region rows, S being the bytes per block of every
shard it reads, and sees them as one virtual buffer (rows in allocation order): shard i's
sub-buffer is the block-major buffer [n, planes, block_size, its token bytes] at n * base_i,
base_i being the bytes per block of the shards before it. Consecutive rows (first-fit usually
finds them) make each shard's read one segment; every pull, whatever prefill engine it comes
from, owns whole rows, so pulls of different shapes never overlap. A shard holding exactly the
cache's heads (or an MLA latent, every group whole) is `whole`: its rows are cache blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from dlengine.parallel.transfer.base import HandshakeError, KVLayout, Segment
from dlengine.parallel.transfer.layout import _coalesce


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


def full_layout(cache_layout: KVLayout) -> KVLayout:
    """`cache_layout` (one rank's shard of the heads, or all of them) widened to every kv head of
    the model: what an unsharded engine holds."""
    first = cache_layout.groups[0]
    if not first.head_split or first.heads == first.total_heads:
        return cache_layout
    return shard_layout(cache_layout, first.total_heads, head_start=0)


@dataclass(frozen=True)
class ShardSlice:
    """One prefill rank's KV as this side reads it: where it sits in a pull's staging, and which
    of its heads land in the cache."""

    tp_rank: int  # the prefill rank read from
    head_start: int  # the heads it holds: [head_start, head_start + heads) of the model's
    heads: int
    layout: KVLayout  # its sub-buffer: block-major, the prefill rank's heads (num_blocks: set per pull)
    base: int  # bytes per block of the shards before it in a pull's staging (its sub-buffer is at n * base)
    whole: bool  # it holds exactly the cache's heads (every group): staging rows are cache blocks
    row_bytes: int = 0  # bytes of one staging row (the cache's block bytes); 0: the sub-buffer's block bytes
    cache_head_start: int = 0  # the heads the cache keeps: [cache_head_start, cache_head_start + cache_heads)
    cache_heads: int = 0  # 0: the same as this shard's

    @property
    def row(self) -> int:
        return self.row_bytes or self.layout.block_bytes

    @property
    def kept_heads(self) -> tuple[int, int]:
        """The heads of this shard that the cache keeps, [first, end) in model head numbers."""
        c0 = self.cache_head_start if self.cache_heads else self.head_start
        c1 = c0 + (self.cache_heads or self.heads)
        return max(self.head_start, c0), min(self.head_start + self.heads, c1)

    def num_blocks(self, num_tokens: int) -> int:
        """Blocks (of this side's block size) a pull of `num_tokens` tokens stages per shard."""
        return -(-num_tokens // self.layout.block_size)

    def segments(self, remote: KVLayout, remote_blocks: Sequence[int], region_blocks: Sequence[int],
                 num_tokens: int) -> list[Segment]:
        """Byte segments reading this shard's KV of `num_tokens` tokens into a pull's staging rows
        `region_blocks` (`region_rows` of them for the whole pull)."""
        n = self.num_blocks(num_tokens)
        sub = replace(self.layout, num_blocks=n)
        # the sub-buffer holds the same heads as the remote rank: every group is copied whole
        segs = sub.segments_from(remote, remote_blocks, range(n), num_tokens, replicated=True)
        return _into_rows(segs, n * self.base, region_blocks, self.row)

    def staged(self, region_tensor: torch.Tensor, region_blocks: Sequence[int], num_tokens: int) -> torch.Tensor:
        """This shard's sub-buffer of a landed pull, [n, planes, block_size, token bytes] (uint8)."""
        lay, row = self.layout, self.row
        n = self.num_blocks(num_tokens)
        flat = region_tensor.view(-1)
        rows = flat[: flat.numel() // row * row].view(-1, row)
        blocks = list(region_blocks)
        if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
            virtual = rows[blocks[0]: blocks[0] + len(blocks)].reshape(-1)
        else:
            virtual = rows.index_select(0, torch.as_tensor(blocks, dtype=torch.long)).view(-1)
        start = n * self.base
        return virtual[start: start + n * lay.block_bytes].view(n, lay.num_planes, lay.block_size, lay.token_bytes)


def _into_rows(segs: list[Segment], offset: int, rows: Sequence[int], row: int) -> list[Segment]:
    """Segments into a virtual buffer (the pull's rows back to back) -> segments into the region,
    cut at row boundaries, merged where rows are consecutive."""
    if offset == 0 and all(b == rows[0] + i for i, b in enumerate(rows)):
        return [(r, rows[0] * row + v, n) for r, v, n in segs]  # consecutive rows: the virtual buffer is real
    out = []
    for r, v, n in segs:
        v += offset
        while n:
            i, o = divmod(v, row)
            k = min(n, row - o)
            out.append((r, rows[i] * row + o, k))
            r, v, n = r + k, v + k, n - k
    return _coalesce(out)


def region_rows(slices: Sequence[ShardSlice], num_tokens: int) -> int:
    """Staging rows a pull reading `slices` takes (module docstring)."""
    if not slices:
        return 0
    n = slices[0].num_blocks(num_tokens)
    return -(-n * sum(s.layout.block_bytes for s in slices) // slices[0].row)


def rank_heads(region_layout: KVLayout, tp: int) -> list[tuple[int, int]]:
    """Per prefill tensor-parallel rank, the (first head, heads) it caches, for a model whose
    cache shard (or whole cache) is `region_layout`. MLA's latent is one "head" every rank holds
    whole."""
    first = region_layout.groups[0]
    if not first.head_split:
        return [(0, region_layout.heads)] * tp
    return [kv_head_range(r, first.total_heads, tp) for r in range(tp)]


def plan_slices(region_layout: KVLayout, tp: int, decode_rank: int = 0) -> dict[int, ShardSlice]:
    """prefill rank -> its ShardSlice, for the ranks of a tensor-parallel size `tp` prefill
    engine that a decode rank whose cache (shard) is `region_layout` reads from: per distinct
    head range of the prefill split overlapping the cache's heads, one rank holding it
    (`decode_rank` spreads replicated ranges and MLA latents over the prefill ranks)."""
    first = region_layout.groups[0]
    c0, c1 = first.kv_head_range
    full = full_layout(region_layout)
    ranges = rank_heads(region_layout, tp)
    slices: dict[int, ShardSlice] = {}
    base = 0
    for start, heads in sorted(set(ranges)):
        if start >= c1 or start + heads <= c0:
            continue  # none of the cache's heads
        holders = [r for r, rng in enumerate(ranges) if rng == (start, heads)]
        rank = holders[decode_rank % len(holders)]
        whole = (start, start + heads) == (c0, c1)
        if not whole and len(region_layout.groups) > 1:
            raise HandshakeError(f"the cache keeps paged groups beside its kv heads "
                                 f"({', '.join(g.kind for g in region_layout.groups[1:])}); they cannot be "
                                 "gathered from prefill shards of another tensor-parallel split")
        layout = region_layout if whole else shard_layout(full, heads, head_start=start)
        slices[rank] = ShardSlice(rank, start, heads, layout, base, whole, region_layout.block_bytes, c0, c1 - c0)
        base += layout.block_bytes
    covered = sum(s.kept_heads[1] - s.kept_heads[0] for s in slices.values())
    assert covered == c1 - c0, "the shards read must cover the cache's heads"
    return slices


def stage_in_slice(region_tensor: torch.Tensor, sl: ShardSlice, kv_cache, region_blocks: Sequence[int],
                   cache_blocks: Sequence[int], num_tokens: int) -> None:
    """A shard's sub-buffer of a landed pull -> the cache blocks, the heads of it the cache keeps
    (decode side). Positions past `num_tokens` in the last block are zeroed in those heads, as
    KVRegion.stage_in does for whole blocks: a NaN bit pattern in a masked position still poisons
    the torch attention reference."""
    if not len(cache_blocks):
        return
    lay = sl.layout
    n = sl.num_blocks(num_tokens)
    assert n <= len(cache_blocks), "fewer cache blocks than the pull's tokens need"
    cache_blocks = list(cache_blocks)[:n]
    data = sl.staged(region_tensor, region_blocks, num_tokens)  # [n, planes, block_size, shard token bytes]
    cache = kv_cache.storage.view(torch.uint8).view(lay.num_planes, kv_cache.num_blocks, kv_cache.block_size, -1)
    assert lay.block_size == cache.shape[2], "staging and cache block sizes differ"
    head_bytes = lay.token_bytes // sl.heads
    k0, k1 = sl.kept_heads
    cache_start = sl.cache_head_start if sl.cache_heads else sl.head_start
    src = data[..., (k0 - sl.head_start) * head_bytes: (k1 - sl.head_start) * head_bytes]
    lo, hi = (k0 - cache_start) * head_bytes, (k1 - cache_start) * head_bytes
    src = src.to(cache.device).permute(1, 0, 2, 3)  # [planes, n, block_size, kept bytes]
    idx = torch.as_tensor(cache_blocks, dtype=torch.long, device=cache.device)
    cache[:, idx, :, lo:hi] = src
    used = num_tokens - (n - 1) * kv_cache.block_size
    if 0 < used < kv_cache.block_size:
        cache[:, cache_blocks[-1], used:, lo:hi] = 0
