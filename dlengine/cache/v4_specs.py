"""Cache specs of DeepSeek-V4's attention (docs/deepseek_v4.md).

- `CompressedKVSpec` (paged): one entry of `entry_dim` per `compress_rate` tokens, for the CSA and
  HCA compressors' KV and the CSA indexer's keys. Entry w (covering tokens [w*m, (w+1)*m)) lives in
  the block holding token w*m, at row (w*m % block_size) // m, so a block of `block_size` tokens
  holds block_size // m entries and one block id names every paged group's part of those tokens
  (the shared block table of specs.py). Prefix-cacheable in itself: entry w depends on tokens
  < (w + 1) * m only.
- `V4StateSpec` (per sequence): the sliding-window ring of K=V vectors and the compressors'
  partial windows. A StateSpec with its own name, so the three layer kinds (different tensors)
  are three groups. Not prefix-cacheable (StateSpec's reason: the ring and the partial windows
  summarise the prefix in place, with no copy at block boundaries to resume from), which turns
  prefix-cache hits off for the whole model (BlockManager.prefix_cache_blocker). Capturable in
  CUDA graphs (`graph_capturable`): a pure decode step runs batched on the device and padded rows
  (PAD_STATE_SLOT) write no slot and no entry (layers/v4_attention.py, kernels/v4/batched_decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dlengine.cache.specs import CacheSpec, StateSpec, dtype_name, element_size
from dlengine.config import ConfigError


@dataclass(frozen=True)
class CompressedKVSpec(CacheSpec):
    """Per layer [num_blocks, block_size // compress_rate, entry_dim] of `dtype`."""

    cache_name: str = "compressed_kv"
    compress_rate: int = 0
    entry_dim: int = 0
    dtype: torch.dtype = torch.float32

    kind: ClassVar[str] = "compressed_kv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compress_rate <= 0 or self.entry_dim <= 0:
            raise ConfigError(f"CompressedKVSpec {self.cache_name!r} needs compress_rate and entry_dim > 0, got "
                              f"{self.compress_rate} and {self.entry_dim}")
        if self.entry_bytes % self.compress_rate:
            # KV migration copies a block's part as block_size * token_bytes bytes
            raise ConfigError(f"CompressedKVSpec {self.cache_name!r}: an entry's {self.entry_bytes} bytes must be a "
                              f"multiple of the compress rate {self.compress_rate}")

    @property
    def name(self) -> str:
        return self.cache_name

    @property
    def entry_bytes(self) -> int:
        return self.entry_dim * element_size(self.dtype)

    @property
    def token_bytes(self) -> int:
        """Bytes per token, averaged (an entry per compress_rate tokens): block_size * token_bytes
        is one block's part of one layer, what KV migration copies."""
        return self.entry_bytes // self.compress_rate

    def page_bytes(self, block_size: int) -> int:
        self.check_block_size(block_size)
        return self.num_layers * (block_size // self.compress_rate) * self.entry_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.entry_bytes // self.compress_rate

    def check_block_size(self, block_size: int) -> None:
        if block_size % self.compress_rate:
            raise ConfigError(f"{self.describe()}: block_size {block_size} must be a multiple of the compress rate "
                              f"{self.compress_rate} (a block holds whole compressed entries)")

    def storage(self, buf, num_blocks, block_size, num_slots):
        self.check_block_size(block_size)
        return buf.view(self.dtype).view(self.num_layers, num_blocks, block_size // self.compress_rate,
                                         self.entry_dim)

    def layer_views(self, storage, num_blocks, block_size, num_slots):
        return list(storage)

    def describe(self) -> str:
        return (f"{self.name}[{self.num_layers} layers x {self.entry_dim} per {self.compress_rate} tokens, "
                f"{dtype_name(self.dtype)}]")


@dataclass(frozen=True)
class V4StateSpec(StateSpec):
    """StateSpec under its own group name (one per V4 layer kind)."""

    cache_name: str = "v4_state"

    kind: ClassVar[str] = "v4_state"
    # the window ring and partial compression windows pair with compressed entries in the paged
    # blocks; resuming from a slot copy is not implemented (prefix caching is refused, docs/deepseek_v4.md)
    checkpointable: ClassVar[bool] = False
    # a decode step (one token per request, the only kind a graph captures) runs V4Attention's
    # batched path: slots from the metadata's device tensor, fixed widths from the block tables,
    # no host sync; rows with PAD_STATE_SLOT write no ring row and no compressed entry and read
    # nothing. (Prompt steps loop over requests on the host; they always run eagerly.)
    graph_capturable: ClassVar[bool] = True
    # V4's layers do not run verify steps position by position with state snapshots, so rejected
    # drafts could not be undone: speculative decoding stays refused (assemble.py)
    speculative_rollback: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.cache_name
