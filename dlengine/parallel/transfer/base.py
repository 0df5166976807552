"""What a KV transfer engine is, and how blocks become byte ranges.

A `TransferEngine` moves bytes between registered memory regions of two engines: it registers
local regions, connects to a peer (whose address and region table it gets as a plain dict), and
issues batched one-sided reads or writes of (remote offset, local offset, length) segments that
complete through a `TransferFuture`. The KV specifics live in `KVLayout` (layout.py): where a
token of a layer of each cache group sits inside a region, so a list of (remote block, local
block) pairs becomes a short list of coalesced byte segments, also when the two sides use
different block sizes; `kv_layout` describes a KVCache or a staging buffer for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Protocol, Sequence

import torch

from dlengine.parallel.transfer.errors import HandshakeError, TransferError
from dlengine.parallel.transfer.layout import (
    GroupLayout,
    KVLayout,
    Segment,
    StateGroupLayout,
    group_layout,
    layout_of_groups,
    state_group_layout,
)


class TransferFuture(Protocol):
    def done(self) -> bool:
        """True once finished (successfully or not); never blocks."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block up to `timeout` seconds. True when finished OK, False on timeout; raises
        TransferError when the transfer failed."""


class TransferEngine(Protocol):
    """The protocol the prefill/decode roles use; DLSlimeTransferEngine implements it."""

    backend: str
    transport: str

    def register_region(self, name: str, tensor: torch.Tensor) -> None: ...

    def local_info(self) -> dict: ...

    def connect(self, peer_id: str, info: dict) -> None: ...

    def is_connected(self, peer_id: str) -> bool: ...

    def read(self, peer_id: str, local_region: str, remote_region: str, segments: Sequence[Segment]) -> TransferFuture: ...

    def write(self, peer_id: str, local_region: str, remote_region: str, segments: Sequence[Segment]) -> TransferFuture: ...

    def disconnect(self, peer_id: str) -> None: ...

    def close(self) -> None: ...


def kv_layout(kv_cache, model_config=None, num_blocks: int | None = None, block_major: bool = False,
              num_state_slots: int | None = None) -> KVLayout:
    """The layout of a dlengine KVCache (plane-major, its own buffer), or with `num_blocks` /
    `block_major` / `num_state_slots` that of a staging buffer for it: block-major rows, then
    each state group's slots. `model_config` is not needed (the cache knows its specs); it is
    accepted for callers written before cache specs."""
    groups = [group_layout(g.spec) for g in kv_cache.paged_groups]
    states = [state_group_layout(g.spec) for g in kv_cache.state_groups]
    if num_blocks is None:  # the cache itself
        return layout_of_groups(groups, kv_cache.block_size, kv_cache.num_blocks, block_major=False,
                                group_offsets=[g.offset for g in kv_cache.paged_groups], state_groups=states,
                                state_offsets=[g.offset for g in kv_cache.state_groups],
                                num_state_slots=kv_cache.num_state_slots)
    staged = layout_of_groups(groups, kv_cache.block_size, num_blocks, block_major=block_major)
    slots = kv_cache.num_state_slots if num_state_slots is None else num_state_slots
    offsets, end = [], staged.nbytes
    for s in states:
        offsets.append(end)
        end += slots * s.slot_bytes
    return layout_of_groups(groups, kv_cache.block_size, num_blocks, block_major=block_major,
                            state_groups=states, state_offsets=offsets, num_state_slots=slots if states else 0)


def model_fingerprint(model_config, dtype: torch.dtype, load_format: str = "auto", seed: int = 0) -> str:
    """A short hash naming "the same model computed the same way": config.json, the weight files'
    names and sizes (hashing the weights themselves would take minutes on real checkpoints), and
    the compute dtype. Dummy weights depend on the seed too."""
    h = hashlib.sha256()
    h.update(json.dumps(model_config.hf_config, sort_keys=True).encode())
    path = model_config.path
    if load_format != "dummy" and os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors") or name.endswith(".bin"):
                h.update(f"{name}:{os.path.getsize(os.path.join(path, name))}".encode())
    else:
        h.update(f"dummy:{seed}".encode())
    h.update(str(dtype).encode())
    return h.hexdigest()[:16]


__all__ = ["GroupLayout", "HandshakeError", "KVLayout", "Segment", "StateGroupLayout", "TransferEngine",
           "TransferError", "TransferFuture", "kv_layout", "model_fingerprint"]
