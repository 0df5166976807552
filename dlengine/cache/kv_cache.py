"""The cache tensors of every layer group, allocated from a list of cache specs (specs.py).

All groups live in ONE byte buffer: paged groups first, then state groups, each at an offset
aligned to GROUP_ALIGN bytes. One buffer is what a CPU peer registers to read KV straight out of
the cache (kv_region.py), and its byte layout is what KV migration describes (KVLayout).

What layers see:
- `layers[i]` is layer i's attention (K, V) pair, as every attention backend expects:
  full-attention K and V each [num_blocks, block_size, num_kv_heads, head_dim]; MLA's latent as
  K [num_blocks, block_size, 1, latent_dim] with an empty V. None for a layer with no attention
  group (a recurrent layer).
- `caches_of_layer(i)` maps every group name covering layer i to its views (state: a dict of
  [num_slots, *shape] tensors, indexed by `request.state_slot`; per-token: (data, scale)).

FP8 KV (`cache(dtype="fp8_e4m3")`): the attention specs' dtype is float8_e4m3fn, one byte an
element, so a block costs half of bf16's. The per-layer scales are not cache contents: they come
with the weights (the attention layers' `k_scale` / `v_scale` buffers, docs/fp8_kv.md), so
migrating or preempting a block never has to carry them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dlengine.cache.specs import CacheSpec, cache_specs_for, check_specs, dtype_name
from dlengine.config import ConfigError, ModelConfig

GROUP_ALIGN = 256  # bytes: every group's storage starts here (any dtype can view it, and cache lines)


def _align(n: int, to: int = GROUP_ALIGN) -> int:
    return -(-n // to) * to


def bytes_per_block(specs: Sequence[CacheSpec], block_size: int) -> int:
    """What one block id costs: every paged group holds that block."""
    return sum(s.page_bytes(block_size) for s in specs if s.paged)


def bytes_per_state_slot(specs: Sequence[CacheSpec]) -> int:
    return sum(s.slot_bytes for s in specs if not s.paged)


def kv_bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes per block of a model's default (single-rank) cache."""
    return bytes_per_block(cache_specs_for(model, dtype), block_size)


def group_offsets(specs: Sequence[CacheSpec], num_blocks: int, block_size: int,
                  num_slots: int) -> tuple[list[int], int]:
    """Byte offset of each spec's storage in the cache buffer (paged groups first, in order,
    then state groups), and the buffer's size. KVLayout relies on the same rule."""
    offsets, end = [0] * len(specs), 0
    order = [i for i, s in enumerate(specs) if s.paged] + [i for i, s in enumerate(specs) if not s.paged]
    for i in order:
        start = _align(end) if end else 0
        offsets[i] = start
        end = start + specs[i].storage_bytes(num_blocks, block_size, num_slots)
    return offsets, end


@dataclass
class CacheGroup:
    spec: CacheSpec
    offset: int  # bytes into the cache buffer
    nbytes: int
    storage: torch.Tensor | None  # typed, see the spec's `storage`
    views: list[Any]  # per layer of spec.layers


class KVCache:
    """The cache of one engine (one rank): `specs` (or a ModelConfig plus `dtype`: its default
    single-rank specs), `num_blocks` blocks of `block_size` tokens for the paged groups, and
    `num_state_slots` sequence slots for the state groups."""

    def __init__(self, specs: Sequence[CacheSpec] | ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 num_state_slots: int = 0) -> None:
        if isinstance(specs, ModelConfig):
            if dtype is None:
                raise ConfigError("KVCache(model_config, ...) needs the cache dtype")
            specs = cache_specs_for(specs, dtype)
        specs = list(specs)
        check_specs(specs)
        if num_blocks <= 0 or block_size <= 0:
            raise ConfigError(f"KV cache needs num_blocks and block_size > 0, got {num_blocks} and {block_size}")
        has_state = any(not s.paged for s in specs)
        if has_state and num_state_slots <= 0:
            raise ConfigError("a cache with state specs needs num_state_slots > 0 (one per running sequence)")
        self.specs = specs
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_state_slots = num_state_slots if has_state else 0
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        attn = [s for s in specs if s.attention]
        self.dtype = dtype if dtype is not None else (attn or specs)[0].dtype  # what reports and layouts name

        offsets, total = group_offsets(specs, num_blocks, block_size, self.num_state_slots)
        self.buffer: torch.Tensor | None = torch.zeros(total, dtype=torch.uint8, device=self.device)
        self.groups: list[CacheGroup] = []
        for spec, off in zip(specs, offsets):
            n = spec.storage_bytes(num_blocks, block_size, self.num_state_slots)
            storage = spec.storage(self.buffer[off:off + n], num_blocks, block_size, self.num_state_slots)
            views = spec.layer_views(storage, num_blocks, block_size, self.num_state_slots)
            self.groups.append(CacheGroup(spec, off, n, storage, views))

        num_layers = 1 + max(max(s.layers) for s in specs)
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._by_layer: list[dict[str, Any]] = [{} for _ in range(num_layers)]
        for g in self.groups:
            for layer, view in zip(g.spec.layers, g.views):
                self._by_layer[layer][g.spec.name] = view
                if g.spec.attention:
                    self.layers[layer] = view

    # ------------------------------------------------------------------ access
    def caches_of_layer(self, layer: int) -> dict[str, Any]:
        """Every cache of `layer`, by group name (e.g. {"mla_latent": (K, V), "indexer_k": (data, scale)})."""
        return self._by_layer[layer]

    @property
    def paged_groups(self) -> list[CacheGroup]:
        return [g for g in self.groups if g.spec.paged]

    @property
    def state_groups(self) -> list[CacheGroup]:
        return [g for g in self.groups if not g.spec.paged]

    @property
    def storage(self) -> torch.Tensor | None:
        """The typed storage of a single-group cache (every model today), None once released."""
        if self.buffer is None:
            return None
        if len(self.groups) != 1:
            raise AttributeError(f"this cache has {len(self.groups)} groups; use kv_cache.groups[i].storage")
        return self.groups[0].storage

    @storage.setter
    def storage(self, value: None) -> None:
        if value is not None:
            raise ValueError("kv_cache.storage can only be set to None (release the cache's memory)")
        self.release()

    def release(self) -> None:
        """Drop every tensor so the memory can be freed (the engine's close)."""
        self.buffer = None
        for g in self.groups:
            g.storage, g.views = None, []
        self.layers = []
        self._by_layer = []

    # ------------------------------------------------------------------ accounting
    @property
    def bytes_per_block(self) -> int:
        return bytes_per_block(self.specs, self.block_size)

    @property
    def bytes_per_state_slot(self) -> int:
        return bytes_per_state_slot(self.specs)

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.spec.describe()} {g.nbytes / 2**20:.1f} MiB" for g in self.groups)
        slots = f", state_slots={self.num_state_slots}" if self.num_state_slots else ""
        return (f"KVCache(blocks={self.num_blocks}, block_size={self.block_size}, dtype={dtype_name(self.dtype)}"
                f"{slots}, {self.nbytes / 2**20:.1f} MiB: {groups})")
