"""The memory a peer reads KV from (or into): block-major staging, or the cache itself.

Staged (the default): a host buffer (pinned when CUDA is present) laid out block-major,
[staging_blocks, layers * parts, block_size, token bytes]. The prefill side gathers a finished
prompt's blocks into consecutive staging blocks, so the whole prompt's KV is ONE contiguous byte
range and the pull is a handful of large reads; the decode side reads into consecutive staging
blocks of its own and scatters them into its cache. This is also the only way for CUDA caches:
DLSlime's TCP transport (PyPI wheel, built without CUDA) takes host pointers only. The gather and
scatter are one copy each (device<->host on CUDA, memcpy on CPU).

Direct (`staging_blocks=0`, CPU, prefill role only): the cache storage itself is registered, region block i is
cache block i, and a pull reads straight into the cache: no copies, but one segment per
(layer, part, run of consecutive blocks), and DLSlime's TCP transport pays ~0.1 ms per segment
(measured: scripts/bench_kv_migration.py, docs/disaggregation.md).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dlengine.config import ConfigError
from dlengine.parallel.transfer.base import kv_layout


class KVRegion:
    def __init__(self, kv_cache, model_config, staging_blocks: int | None = None, min_blocks: int = 0) -> None:
        self.kv_cache = kv_cache
        parts = 1 if model_config.kv_cache_geometry[2] == 0 else 2
        storage = kv_cache.storage
        planes = model_config.num_hidden_layers * parts
        # the cache as bytes [planes, blocks, block bytes]: copies are plain memory moves (any
        # dtype, FP8 included), and 3-D gathers are several times faster than 6-D ones on CPU
        self._cache3 = storage.view(torch.uint8).view(planes, kv_cache.num_blocks, -1)
        self.staged = staging_blocks != 0
        if not self.staged:
            if storage.device.type != "cpu":
                raise ConfigError("staging_blocks=0 (register the cache directly) needs a CPU cache: DLSlime's "
                                  "TCP transport reads host memory only")
            self.tensor = storage
            self.layout = kv_layout(kv_cache, model_config)
            self._free = None
            self.num_quarantined = 0
            return
        n = staging_blocks if staging_blocks is not None else max(1024, 2 * min_blocks)
        n = max(1, min(n, kv_cache.num_blocks))
        # zeros, not empty: block tails travel unwritten (stage_in zeroes them on arrival anyway)
        self.tensor = torch.zeros((n, planes, self._cache3.shape[2]), dtype=torch.uint8,
                                  pin_memory=torch.cuda.is_available())
        self.layout = kv_layout(kv_cache, model_config, num_blocks=n, block_major=True)
        self._free = np.ones(n, dtype=bool)
        self.num_quarantined = 0

    @property
    def num_free(self) -> int:
        return self.kv_cache.num_blocks if self._free is None else int(self._free.sum())

    def allocate(self, cache_blocks: Sequence[int]) -> list[int] | None:
        """Region blocks standing for `cache_blocks` (consecutive when possible, so the transfer
        is one range), or None when staging is full."""
        if self._free is None:
            return list(cache_blocks)
        n = len(cache_blocks)
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
        idx = torch.as_tensor(list(cache_blocks), device=self._cache3.device)
        data = self._cache3.index_select(1, idx).permute(1, 0, 2)  # [n, planes, block bytes]
        dst = self._rows(region_blocks)
        if isinstance(dst, slice):
            self.tensor[dst].copy_(data)
        else:
            self.tensor.index_copy_(0, dst, data.cpu())

    def stage_in(self, region_blocks: Sequence[int], cache_blocks: Sequence[int], num_tokens: int) -> None:
        """Staging -> cache (decode side, after the pull landed). Positions past `num_tokens` in
        the last block are zeroed: whole blocks travel, their tails are whatever the peer's (or
        our) staging held, and a NaN bit pattern in a masked position still poisons the torch
        attention reference (NaN + -inf is NaN)."""
        if not self.staged or not len(cache_blocks):
            return
        src = self._rows(region_blocks)
        data = self.tensor[src] if isinstance(src, slice) else self.tensor.index_select(0, src)
        data = data.to(self._cache3.device).permute(1, 0, 2)  # [planes, n, block bytes]
        idx = torch.as_tensor(list(cache_blocks), device=self._cache3.device)
        self._cache3.index_copy_(1, idx, data)
        used = num_tokens - (len(cache_blocks) - 1) * self.kv_cache.block_size
        if 0 < used < self.kv_cache.block_size:
            self._cache3[:, cache_blocks[-1], used * self.layout.token_bytes:] = 0

    @staticmethod
    def _rows(blocks: Sequence[int]):
        b = list(blocks)
        if b == list(range(b[0], b[0] + len(b))):
            return slice(b[0], b[0] + len(b))
        return torch.as_tensor(b)
