"""Per-layer paged KV tensors.

Layout per layer: K and V each [num_blocks, block_size, num_kv_heads, head_dim], so one block of
one layer is a contiguous chunk (what KV transfer moves) and a token's heads are contiguous (what
decode kernels read). The geometry comes from `ModelConfig.kv_cache_geometry`: GQA/MHA models
store K and V alike; MLA models store their latent as one K "head" and get an empty V tensor
([num_blocks, block_size, 1, 0], no memory).
"""

from __future__ import annotations

import torch

from dlengine.config import ModelConfig


def kv_bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return model.num_hidden_layers * block_size * model.kv_bytes_per_token_per_layer_elem * elem


class KVCache:
    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size, self.dtype, self.device = num_blocks, block_size, dtype, device
        heads, k_dim, v_dim = model.kv_cache_geometry
        if k_dim == v_dim:
            shape = (model.num_hidden_layers, 2, num_blocks, block_size, heads, k_dim)
            self.storage = torch.zeros(shape, dtype=dtype, device=device)
            self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [(s[0], s[1]) for s in self.storage]
        elif v_dim == 0:  # K only (MLA's latent)
            shape = (model.num_hidden_layers, num_blocks, block_size, heads, k_dim)
            self.storage = torch.zeros(shape, dtype=dtype, device=device)
            no_v = torch.zeros((num_blocks, block_size, heads, 0), dtype=dtype, device=device)
            self.layers = [(s, no_v) for s in self.storage]
        else:
            raise ValueError(f"unsupported KV cache geometry {model.kv_cache_geometry}")

    def release(self) -> None:
        """Drop the tensors (Engine.close): the memory goes back once nothing else holds them."""
        self.storage = None
        self.layers = []

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def __repr__(self) -> str:
        return (f"KVCache(blocks={self.num_blocks}, block_size={self.block_size}, dtype={self.dtype}, "
                f"{self.nbytes / 2**20:.1f} MiB)")
