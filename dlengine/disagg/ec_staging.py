"""Registered host memory for image embeddings in flight between engines, handed out in runs of
fixed-size chunks: an encoder engine stages a request's embeddings in one run (one contiguous
byte range, so a pull is one read cut into a few large segments), and a pulling engine receives
them into a run of its own.

A run a timed-out read may still land in is quarantined (never handed out again), as KV staging
does (parallel/transfer/kv_region.py): nothing in DLSlime's contract says an abandoned read
cannot complete later.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK_BYTES = 1 << 16


class ChunkedStaging:
    def __init__(self, nbytes: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        n = max(1, nbytes // chunk_bytes)
        self.tensor = torch.zeros(n * chunk_bytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        self._free = np.ones(n, dtype=bool)
        self.num_quarantined_bytes = 0

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    @property
    def free_bytes(self) -> int:
        return int(self._free.sum()) * self.chunk_bytes

    def allocate(self, nbytes: int) -> tuple[int, int] | None:
        """(byte offset, chunks) of a free run holding `nbytes`, or None when there is none."""
        n = max(1, -(-nbytes // self.chunk_bytes))
        if n > len(self._free):
            return None
        csum = np.concatenate(([0], np.cumsum(self._free, dtype=np.int64)))
        starts = np.nonzero(csum[n:] - csum[:-n] == n)[0]
        if not len(starts):
            return None
        first = int(starts[0])
        self._free[first:first + n] = False
        return first * self.chunk_bytes, n

    def release(self, run: tuple[int, int]) -> None:
        first = run[0] // self.chunk_bytes
        assert not self._free[first:first + run[1]].any(), "staging run released twice"
        self._free[first:first + run[1]] = True

    def quarantine(self, run: tuple[int, int]) -> None:
        self.num_quarantined_bytes += run[1] * self.chunk_bytes

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The bytes at `offset` as a tensor of `dtype` and `shape` (no copy)."""
        size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        return self.tensor[offset:offset + size].view(dtype).view(shape)
