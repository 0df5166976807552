"""The memory a peer reads KV from (or into): the cache itself, or pinned host staging.

On CPU the KV cache storage is registered directly: region block i IS cache block i and a pull
is one copy, socket to cache. On CUDA, DLSlime's TCP transport (PyPI wheel, built without CUDA)
takes host pointers only, so the region is a pinned host buffer shaped like the cache with
`staging_blocks` blocks: the prefill side gathers a finished prompt's blocks into it (one
device-to-host copy per layer and part), the decode side reads into its own staging blocks and
scatters them into its cache (host-to-device). Staging blocks are allocated and freed like cache
blocks; when none are free a pull waits.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import torch

from dlengine.parallel.transfer.base import KVLayout, kv_layout


class KVRegion:
    def __init__(self, kv_cache, model_config, staging_blocks: int | None = None) -> None:
        self.kv_cache = kv_cache
        self.staged = kv_cache.storage.device.type != "cpu"
        if not self.staged:
            self.tensor = kv_cache.storage
            self.layout = kv_layout(kv_cache, model_config)
            self._free: deque[int] | None = None
        else:
            n = min(kv_cache.num_blocks, staging_blocks or 1024)
            shape = list(kv_cache.storage.shape)
            block_dim = 2 if self._parts(model_config) == 2 else 1
            shape[block_dim] = n
            self.tensor = torch.empty(shape, dtype=kv_cache.dtype, pin_memory=True)
            self.layout = kv_layout(kv_cache, model_config, num_blocks=n)
            self._free = deque(range(n))
        self._block_dim = 2 if self.layout.parts == 2 else 1

    @staticmethod
    def _parts(model_config) -> int:
        return 1 if model_config.kv_cache_geometry[2] == 0 else 2

    @property
    def num_free(self) -> int:
        return self.kv_cache.num_blocks if self._free is None else len(self._free)

    def allocate(self, cache_blocks: Sequence[int]) -> list[int] | None:
        """Region blocks standing for `cache_blocks`, or None when staging is full."""
        if self._free is None:
            return list(cache_blocks)
        if len(self._free) < len(cache_blocks):
            return None
        return [self._free.popleft() for _ in cache_blocks]

    def release(self, region_blocks: Sequence[int]) -> None:
        if self._free is not None:
            self._free.extend(region_blocks)

    def stage_out(self, cache_blocks: Sequence[int], region_blocks: Sequence[int]) -> None:
        """Cache -> region (prefill side, before a peer reads); waits for the copy."""
        if not self.staged or not cache_blocks:
            return
        src = torch.as_tensor(list(cache_blocks), device=self.kv_cache.storage.device)
        dst = torch.as_tensor(list(region_blocks))
        gathered = self.kv_cache.storage.index_select(self._block_dim, src).cpu()
        self.tensor.index_copy_(self._block_dim, dst, gathered)

    def stage_in(self, region_blocks: Sequence[int], cache_blocks: Sequence[int]) -> None:
        """Region -> cache (decode side, after the pull finished)."""
        if not self.staged or not cache_blocks:
            return
        src = torch.as_tensor(list(region_blocks))
        dst = torch.as_tensor(list(cache_blocks), device=self.kv_cache.storage.device)
        data = self.tensor.index_select(self._block_dim, src).to(self.kv_cache.storage.device, non_blocking=False)
        self.kv_cache.storage.index_copy_(self._block_dim, dst, data)


__all__ = ["KVRegion", "KVLayout"]
