"""What one forward pass reads besides activations: the batch layout (`AttentionMetadata`) and the
per-layer KV tensors (`ForwardContext`). The engine builds both every step; model layers and
attention backends read them. They live here, below both, so the engine never imports models.

The runner flattens all scheduled requests into one token dimension (no padding). Request `i`
owns query tokens `query_start_loc[i]:query_start_loc[i+1]`; those are the *last* tokens of its
context of `seq_lens[i]` tokens, whose KV lives in blocks `block_tables[i, :]` of the paged cache.
`slot_mapping[t]` is the flat cache slot (block * block_size + offset) where token t's K/V go.

The kernels themselves (attention backend, fused ops) are not in the context: layers receive them
once, when they are built (kernels/selection.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32, device
    seq_lens: torch.Tensor  # [B] int32, device: context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, device (padded with 0)
    slot_mapping: torch.Tensor  # [T] int64, device
    max_query_len: int
    max_seq_len: int
    # host copies: reference backends loop over requests with them, avoiding device syncs
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass
class ForwardContext:
    """Set by the runner for the duration of one forward; attention layers read their cache
    tensors by layer index: `kv_caches[i] = (k_cache, v_cache)` (MLA: (latent cache, empty))."""

    meta: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
