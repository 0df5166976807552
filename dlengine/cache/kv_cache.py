"""Per-layer paged KV tensors for GQA/MHA models.

Layout per layer: K and V each [num_blocks, block_size, num_kv_heads, head_dim], so one block of
one layer is a contiguous chunk (what KV transfer moves) and a token's heads are contiguous (what
decode kernels read).
"""

from __future__ import annotations

import torch

from dlengine.config import ModelConfig


def kv_bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return model.num_hidden_layers * 2 * block_size * model.num_key_value_heads * model.head_dim * elem


class KVCache:
    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size, self.dtype, self.device = num_blocks, block_size, dtype, device
        shape = (model.num_hidden_layers, 2, num_blocks, block_size, model.num_key_value_heads, model.head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [(s[0], s[1]) for s in self.storage]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def __repr__(self) -> str:
        return (f"KVCache(blocks={self.num_blocks}, block_size={self.block_size}, dtype={self.dtype}, "
                f"{self.nbytes / 2**20:.1f} MiB)")
