"""The memory a peer reads KV from (or into): block-major staging, or the cache itself.

Staged (the default): a host buffer (pinned when CUDA is present) laid out block-major,
[staging_blocks, block bytes] (a block row holds every paged group's planes, see layout.py),
followed by state slots for models with state specs. The prefill side gathers a finished
prompt's blocks into consecutive staging blocks, so the whole prompt's KV is ONE contiguous byte
range and the pull is a handful of large reads; the decode side reads into consecutive staging
blocks of its own and scatters them into its cache. This is also the only way for CUDA caches:
DLSlime's TCP transport (PyPI wheel, built without CUDA) takes host pointers only. The gather and
scatter are one copy each (device<->host on CUDA, memcpy on CPU).

Direct (`staging_blocks=0`, CPU, prefill role only): the cache buffer itself is registered, region block i is
cache block i, and a pull reads straight into the cache: no copies, but one segment per
(group, layer, part, run of consecutive blocks), and DLSlime's TCP transport pays ~0.1 ms per segment
(measured: scripts/bench_kv_migration.py, docs/disaggregation.md).
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np
import torch

from dlengine.config import ConfigError
from dlengine.parallel.transfer.base import kv_layout


class KVRegion:
    def __init__(self, kv_cache, model_config=None, staging_blocks: int | None = None, min_blocks: int = 0,
                 staging_state_slots: int | None = None, staging_on_device: bool = False,
                 rows_per_block: int = 1) -> None:
        """`model_config` is unused (the cache knows its specs), accepted for older callers.
        `staging_state_slots`: state slots in the staging buffer (default: the cache's).
        `staging_on_device`: stage on the cache's device instead of (pinned) host memory, for a
        transfer engine that reads device memory (cuda_ipc). `rows_per_block`: staging rows (of
        the cache's block bytes) per staging block asked for: a tensor-parallel decode rank
        reads whole blocks of prefill ranks that may hold up to that many times its own heads
        (kv_shards.py)."""
        self.kv_cache = kv_cache
        buf = kv_cache.buffer
        # each paged group as bytes [planes, blocks, block bytes]: copies are plain memory moves
        # (any dtype, FP8 included), and 3-D gathers are several times faster than 6-D ones on CPU
        self._groups3 = [buf[g.offset:g.offset + g.nbytes].view(g.spec.num_layers * g.spec.parts,
                                                                  kv_cache.num_blocks, -1)
                         for g in kv_cache.paged_groups]
        self._states2 = [buf[g.offset:g.offset + g.nbytes].view(kv_cache.num_state_slots, -1)
                         for g in kv_cache.state_groups]
        self.staged = staging_blocks != 0
        self.num_quarantined = 0
        if not self.staged:
            if buf.device.type != "cpu":
                raise ConfigError("staging_blocks=0 (register the cache directly) needs a CPU cache: DLSlime's "
                                  "TCP transport reads host memory only")
            self.tensor = buf
            self.layout = kv_layout(kv_cache)
            self._free = None
            self._free_state = deque()
            return
        n = staging_blocks if staging_blocks is not None else max(1024, 2 * min_blocks)
        n = max(1, min(n, kv_cache.num_blocks)) * rows_per_block
        slots = kv_cache.num_state_slots if staging_state_slots is None else staging_state_slots
        self.layout = kv_layout(kv_cache, num_blocks=n, block_major=True, num_state_slots=slots)
        # zeros, not empty: block tails travel unwritten (stage_in zeroes them on arrival anyway)
        if staging_on_device:
            self.tensor = torch.zeros(self.layout.nbytes + self.layout.state_bytes, dtype=torch.uint8,
                                      device=buf.device)
        else:
            self.tensor = torch.zeros(self.layout.nbytes + self.layout.state_bytes, dtype=torch.uint8,
                                      pin_memory=torch.cuda.is_available())
        self._rows2 = self.tensor[:self.layout.nbytes].view(n, self.layout.block_bytes)
        # where each paged group's planes sit inside a block row
        self._cols, c = [], 0
        for g3 in self._groups3:
            self._cols.append((c, c + g3.shape[0] * g3.shape[2]))
            c += g3.shape[0] * g3.shape[2]
        self._free = np.ones(n, dtype=bool)
        # staging state slots (one per request handed off or pulled); first free slot first
        self._free_state = deque(range(self.layout.num_state_slots))

    @property
    def has_state(self) -> bool:
        """Whether the cache keeps per-sequence state (state specs) that travels with the KV."""
        return bool(self.kv_cache.state_groups)

    @property
    def num_free_state_slots(self) -> int:
        return len(self._free_state) if self.staged else 0

    def allocate_state(self) -> int | None:
        """A staging state slot for one sequence's state, or None when every one is taken (or the
        region is the cache itself, which has no staging slots)."""
        if not self.staged or not self._free_state:
            return None
        return self._free_state.popleft()

    def release_state(self, region_slot: int) -> None:
        """Give a staging state slot back (never one a timed-out read may still land in: those
        are simply not released, like quarantined blocks)."""
        if region_slot >= 0:
            assert region_slot not in self._free_state, "staging state slot released twice"
            self._free_state.append(region_slot)

    @property
    def num_free(self) -> int:
        return self.kv_cache.num_blocks if self._free is None else int(self._free.sum())

    def allocate(self, cache_blocks: Sequence[int]) -> list[int] | None:
        """Region blocks standing for `cache_blocks` (consecutive when possible, so the transfer
        is one range), or None when staging is full."""
        if self._free is None:
            return list(cache_blocks)
        return self.allocate_rows(len(cache_blocks))

    def allocate_rows(self, n: int) -> list[int] | None:
        """`n` staging rows (consecutive when possible), or None when staging is full."""
        free = self._free
        if n == 0 or free.sum() < n:
            return None if n else []
        # first fit of a run of n free blocks: windows whose sum is n
        csum = np.concatenate(([0], np.cumsum(free, dtype=np.int64)))
        starts = np.nonzero(csum[n:] - csum[:-n] == n)[0]
        blocks = list(range(int(starts[0]), int(starts[0]) + n)) if len(starts) else np.nonzero(free)[0][:n].tolist()
        free[blocks] = False
        return blocks

    def quarantine(self, region_blocks: Sequence[int]) -> None:
        """Never hand these staging blocks out again: a read into them was abandoned (timeout),
        and nothing in DLSlime's contract says it cannot land later. Staging, not the cache, is
        what a pull writes into for exactly this reason."""
        self.num_quarantined += len(region_blocks)

    def release(self, region_blocks: Sequence[int]) -> None:
        if self._free is not None and len(region_blocks):
            assert not self._free[list(region_blocks)].any(), "staging block released twice"
            self._free[list(region_blocks)] = True

    def stage_out(self, cache_blocks: Sequence[int], region_blocks: Sequence[int]) -> None:
        """Cache -> staging (prefill side, before a peer reads); returns when the copy is done."""
        if not self.staged or not len(cache_blocks):
            return
        dst = self._rows(region_blocks)
        for g3, (c0, c1) in zip(self._groups3, self._cols):
            idx = torch.as_tensor(list(cache_blocks), device=g3.device)
            data = g3.index_select(1, idx).permute(1, 0, 2)  # [n, planes, block bytes]
            if isinstance(dst, slice):
                self._rows2[dst, c0:c1].unflatten(1, data.shape[1:]).copy_(data)
            elif c1 - c0 == self._rows2.shape[1]:
                self._rows2.index_copy_(0, dst.to(self.tensor.device), data.reshape(len(cache_blocks), -1).to(
                    self.tensor.device))
            else:
                self._rows2[:, c0:c1].index_copy_(0, dst.to(self.tensor.device), data.reshape(
                    len(cache_blocks), -1).to(self.tensor.device))
        if self.tensor.is_cuda:  # a peer process reads it next, on no stream of ours
            torch.cuda.current_stream(self.tensor.device).synchronize()

    def stage_in(self, region_blocks: Sequence[int], cache_blocks: Sequence[int], num_tokens: int) -> None:
        """Staging -> cache (decode side, after the pull landed). Positions past `num_tokens` in
        the last block are zeroed: whole blocks travel, their tails are whatever the peer's (or
        our) staging held, and a NaN bit pattern in a masked position still poisons the torch
        attention reference (NaN + -inf is NaN)."""
        if not self.staged or not len(cache_blocks):
            return
        src = self._rows(region_blocks)
        rows = self._rows2[src] if isinstance(src, slice) else self._rows2.index_select(0, src.to(self.tensor.device))
        used = num_tokens - (len(cache_blocks) - 1) * self.kv_cache.block_size
        for g3, (c0, c1), group in zip(self._groups3, self._cols, self.layout.groups):
            data = rows[:, c0:c1].unflatten(1, (g3.shape[0], g3.shape[2]))
            data = data.to(g3.device).permute(1, 0, 2)  # [planes, n, block bytes]
            idx = torch.as_tensor(list(cache_blocks), device=g3.device)
            g3.index_copy_(1, idx, data)
            if 0 < used < self.kv_cache.block_size:
                g3[:, cache_blocks[-1], used * group.token_bytes:] = 0

    def stage_state_out(self, cache_slot: int, region_slot: int) -> None:
        """One sequence's state (every state group), cache slot -> staging slot: the state
        counterpart of stage_out (a prefill engine's hand-off of a Gated DeltaNet request)."""
        if self.staged:
            for s2, rows in zip(self._states2, self._state_rows()):
                rows[region_slot].copy_(s2[cache_slot])

    def stage_state_in(self, region_slot: int, cache_slot: int) -> None:
        """Staging slot -> cache slot (see stage_state_out)."""
        if self.staged:
            for s2, rows in zip(self._states2, self._state_rows()):
                s2[cache_slot].copy_(rows[region_slot])

    def _state_rows(self) -> list[torch.Tensor]:
        lay = self.layout
        return [self.tensor[off:off + lay.num_state_slots * g.slot_bytes].view(lay.num_state_slots, g.slot_bytes)
                for g, off in zip(lay.state_groups, lay.state_offsets)]

    @staticmethod
    def _rows(blocks: Sequence[int]):
        b = list(blocks)
        if b == list(range(b[0], b[0] + len(b))):
            return slice(b[0], b[0] + len(b))
        return torch.as_tensor(b)
