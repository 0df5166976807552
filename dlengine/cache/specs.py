"""Cache specs: what each group of layers keeps between steps, and how it is laid out.

A model's cache is a list of specs, one per layer group. Each spec answers what the memory
planner (bytes per block or per sequence slot), the allocator (storage bytes, per-layer tensor
views), the block manager (paged or per-sequence, prefix-cacheable) and KV migration (planes of
`token_bytes` per token) need to know, so none of them branches on the model.

Two families:
- paged kinds hold per-token entries in fixed-size blocks named by the request's block table.
  All paged groups share ONE block table per request (block id b indexes every paged group),
  so a block costs the sum of the paged specs' `page_bytes`. A paged group's storage is
  plane-major: [num_layers * parts planes][num_blocks][block_size][token_bytes], so one block of
  one plane is a contiguous run (what KV transfer moves).
- state kinds hold a fixed amount per running sequence (a recurrent layer's state), in slots
  named by `request.state_slot`. A state group's storage is slot-major: [num_slots][slot_bytes],
  so one sequence's whole state is one contiguous range.

Used by today's models: FullAttentionSpec (GQA/MHA K and V), MLALatentSpec (DeepSeek's
compressed latent, stored as one K "head" with no V), StateSpec (the Gated DeltaNet layers of
Qwen3-Next / Qwen3.5, docs/gdn.md) and IndexerKeySpec (a PerTokenSpec: DeepSeek Sparse
Attention's indexer keys beside the latent, docs/dsa.md). Declared for upcoming models, with the
allocator and block manager support they need (tests/test_cache_specs.py), but used by no model
yet: SlidingWindowSpec.

Attention specs take any float dtype, float8_e4m3fn included (the FP8 KV cache: one byte an
element, scales held by the attention layers, docs/fp8_kv.md); `describe()` and KV migration's
layout name it, so two engines with different cache dtypes never exchange KV.

A model class may declare its own cache by defining a classmethod
`cache_specs(model_config, *, dtype, tp_size, tp_rank) -> list[CacheSpec]`; `cache_specs_for`
calls it when present and otherwise derives the default from ModelConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from dlengine.config import ConfigError, ModelConfig
from dlengine.models.layers.parallel_linear import kv_heads_per_rank


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


STATE_ALIGN = 16  # bytes: every state tensor of a slot starts here, so any dtype can view it


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class CacheSpec:
    """One layer group's cache. Subclasses set `kind` and implement the paged or state half.

    `layers` are the model's layer indices the group covers (the model indexes its layers' cache
    entries by these). `name` tells groups of the same kind apart (e.g. two PerTokenSpecs)."""

    layers: tuple[int, ...]

    kind: ClassVar[str] = ""
    paged: ClassVar[bool] = True  # per-token blocks (True) or per-sequence slots (False)
    prefix_cacheable: ClassVar[bool] = True  # a block's content depends on its token prefix only
    attention: ClassVar[bool] = False  # kv_cache.layers[i] is this group's (K, V) pair
    # the decode step of the layers reading this group can be captured in a CUDA graph
    # (engine/cuda_graph.py): paged groups are written through the slot mapping (-1 skips), state
    # kinds say whether their kernels take the slots from the device and skip PAD_STATE_SLOT
    graph_capturable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError(f"{type(self).__name__} covers no layers")
        if len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ConfigError(f"{type(self).__name__}: layers must be distinct indices >= 0, got {self.layers}")

    @property
    def name(self) -> str:
        return self.kind

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # ---------------------------------------------------------------- paged kinds
    parts: ClassVar[int] = 1  # planes per layer (2 for K and V)

    @property
    def token_bytes(self) -> int:
        """Bytes of one token of one layer of one part (paged kinds); 0 for state kinds."""
        return 0

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token costs across every layer of the group (paged kinds)."""
        return self.num_layers * self.parts * self.token_bytes

    def page_bytes(self, block_size: int) -> int:
        """Bytes one block costs across every layer of the group (0 for state kinds)."""
        return block_size * self.bytes_per_token

    # ---------------------------------------------------------------- state kinds
    @property
    def slot_bytes(self) -> int:
        """Bytes one sequence slot costs across every layer of the group (0 for paged kinds)."""
        return 0

    # ---------------------------------------------------------------- allocation
    def storage_bytes(self, num_blocks: int, block_size: int, num_slots: int) -> int:
        if self.paged:
            return num_blocks * self.page_bytes(block_size)
        return num_slots * self.slot_bytes

    def storage(self, buf: torch.Tensor, num_blocks: int, block_size: int, num_slots: int) -> torch.Tensor:
        """The group's storage as a typed tensor over `buf` (uint8, exactly storage_bytes)."""
        raise NotImplementedError

    def layer_views(self, storage: torch.Tensor, num_blocks: int, block_size: int, num_slots: int) -> list[Any]:
        """What each covered layer's forward gets, in `layers` order."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}[{self.num_layers} layers]"


# -------------------------------------------------------------------- paged kinds
@dataclass(frozen=True)
class FullAttentionSpec(CacheSpec):
    """K and V of every token, [num_blocks, block_size, num_kv_heads, head_dim] each per layer.

    Under tensor parallelism a rank holds heads [head_start, head_start + num_kv_heads) of
    `total_kv_heads` (0: the same as num_kv_heads, i.e. all of them); KV migration uses the range
    to copy between engines of different tensor-parallel sizes."""

    num_kv_heads: int = 0
    head_dim: int = 0
    dtype: torch.dtype = torch.float32
    total_kv_heads: int = 0
    head_start: int = 0

    kind: ClassVar[str] = "full_attention"
    parts: ClassVar[int] = 2
    attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_kv_heads <= 0 or self.head_dim <= 0:
            raise ConfigError(f"{type(self).__name__} needs num_kv_heads and head_dim > 0, got "
                              f"{self.num_kv_heads} and {self.head_dim}")
        total = self.total_kv_heads or self.num_kv_heads
        if not 0 <= self.head_start <= total - self.num_kv_heads:
            raise ConfigError(f"kv heads [{self.head_start}, {self.head_start + self.num_kv_heads}) are outside "
                              f"the model's {total}")

    @property
    def kv_head_range(self) -> tuple[int, int]:
        return self.head_start, self.head_start + self.num_kv_heads

    @property
    def token_bytes(self) -> int:
        return self.num_kv_heads * self.head_dim * element_size(self.dtype)

    def storage(self, buf, num_blocks, block_size, num_slots):
        return buf.view(self.dtype).view(self.num_layers, 2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def layer_views(self, storage, num_blocks, block_size, num_slots):
        return [(s[0], s[1]) for s in storage]

    def describe(self) -> str:
        return (f"{self.name}[{self.num_layers} layers x {self.num_kv_heads} heads x {self.head_dim}, "
                f"{dtype_name(self.dtype)}]")


@dataclass(frozen=True)
class SlidingWindowSpec(FullAttentionSpec):
    """Full-attention layout, but a query at position p reads keys in (p - window, p] only, so a
    request's blocks wholly before its window may be freed (`blocks_outside_window`;
    BlockManager.drop_blocks_outside_window). Prefix caching stays valid: a dropped block keeps
    its published content until evicted. Declared for upcoming models; no model uses it yet."""

    window: int = 0

    kind: ClassVar[str] = "sliding_window"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window <= 0:
            raise ConfigError(f"SlidingWindowSpec needs window > 0, got {self.window}")

    def blocks_outside_window(self, num_computed_tokens: int, block_size: int) -> int:
        """Leading blocks no future query reads: the next query sits at num_computed_tokens and
        needs keys from num_computed_tokens - window + 1 on."""
        return max(0, num_computed_tokens - self.window + 1) // block_size

    def describe(self) -> str:
        return super().describe()[:-1] + f", window {self.window}]"


@dataclass(frozen=True)
class MLALatentSpec(CacheSpec):
    """Multi-head latent attention: per token and layer one "head" of latent_dim
    (kv_lora_rank normalised c_kv + qk_rope_head_dim rotated k_pe) in K, and an empty V
    ([num_blocks, block_size, 1, 0], no memory) so attention backends see a (K, V) pair.
    The latent is whole on every tensor-parallel rank."""

    latent_dim: int = 0
    dtype: torch.dtype = torch.float32

    kind: ClassVar[str] = "mla_latent"
    attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_dim <= 0:
            raise ConfigError(f"MLALatentSpec needs latent_dim > 0, got {self.latent_dim}")

    @property
    def token_bytes(self) -> int:
        return self.latent_dim * element_size(self.dtype)

    def storage(self, buf, num_blocks, block_size, num_slots):
        return buf.view(self.dtype).view(self.num_layers, num_blocks, block_size, 1, self.latent_dim)

    def layer_views(self, storage, num_blocks, block_size, num_slots):
        no_v = torch.zeros((num_blocks, block_size, 1, 0), dtype=self.dtype, device=storage.device)
        return [(s, no_v) for s in storage]

    def describe(self) -> str:
        return f"{self.name}[{self.num_layers} layers x {self.latent_dim}, {dtype_name(self.dtype)}]"


@dataclass(frozen=True)
class PerTokenSpec(CacheSpec):
    """An extra paged per-token tensor beside attention's, e.g. a sparse-attention indexer's
    keys: `token_shape` elements of `dtype` per token and layer, optionally followed by
    `scale_shape` elements of `scale_dtype` (FP8 keys with their scales), packed into one
    token entry. Each layer gets (data [num_blocks, block_size, *token_shape],
    scale [num_blocks, block_size, *scale_shape] or None). IndexerKeySpec is one."""

    cache_name: str = "per_token"
    token_shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    scale_shape: tuple[int, ...] = ()
    scale_dtype: torch.dtype = torch.float32

    kind: ClassVar[str] = "per_token"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.token_shape or min(self.token_shape) <= 0:
            raise ConfigError(f"PerTokenSpec {self.cache_name!r} needs a non-empty token_shape, got {self.token_shape}")
        sizes = [element_size(self.dtype)] + ([element_size(self.scale_dtype)] if self.scale_shape else [])
        if any(self.token_bytes % size or self._data_bytes % size for size in sizes):
            # the data and scale views start at these byte offsets and stride by token_bytes
            raise ConfigError(f"PerTokenSpec {self.cache_name!r}: {self._data_bytes} data bytes and "
                              f"{self.token_bytes} token bytes must be multiples of every element size")

    @property
    def name(self) -> str:
        return self.cache_name

    @property
    def _data_bytes(self) -> int:
        return math.prod(self.token_shape) * element_size(self.dtype)

    @property
    def token_bytes(self) -> int:
        scale = math.prod(self.scale_shape) * element_size(self.scale_dtype) if self.scale_shape else 0
        return self._data_bytes + scale

    def storage(self, buf, num_blocks, block_size, num_slots):
        return buf.view(self.num_layers, num_blocks, block_size, self.token_bytes)

    def layer_views(self, storage, num_blocks, block_size, num_slots):
        d = self._data_bytes
        views = []
        for s in storage:
            data = s[..., :d].view(self.dtype).unflatten(-1, self.token_shape)
            scale = s[..., d:].view(self.scale_dtype).unflatten(-1, self.scale_shape) if self.scale_shape else None
            views.append((data, scale))
        return views

    def describe(self) -> str:
        scale = f" + scales {self.scale_shape} {dtype_name(self.scale_dtype)}" if self.scale_shape else ""
        return f"{self.name}[{self.num_layers} layers x {self.token_shape} {dtype_name(self.dtype)}{scale}]"


@dataclass(frozen=True)
class IndexerKeySpec(PerTokenSpec):
    """DeepSeek Sparse Attention's lightning-indexer keys (DeepSeek-V3.2, GLM-5; docs/dsa.md): one
    rotated, normalised key of `head_dim` per token and indexer layer, beside the MLA latent and
    paged with the same block tables, so prefix caching, preemption and KV migration treat it as
    they treat the latent. Each layer gets (keys [num_blocks, block_size, 1, head_dim], None): the
    [.., 1, D] row layout the latent cache has, so the latent's row-scatter kernel writes it too.
    Stored in the cache dtype, as transformers keeps it (DeepSeek's FP8 keys with scales would
    set `dtype` / `scale_shape`)."""

    cache_name: str = "indexer_k"

    @classmethod
    def for_layers(cls, layers: tuple[int, ...], head_dim: int, dtype: torch.dtype) -> "IndexerKeySpec":
        if head_dim <= 0:
            raise ConfigError(f"IndexerKeySpec needs index_head_dim > 0, got {head_dim}")
        return cls(layers, token_shape=(1, head_dim), dtype=dtype)


# -------------------------------------------------------------------- state kinds
@dataclass(frozen=True)
class StateTensor:
    """One tensor a recurrent layer keeps per sequence, e.g. Gated DeltaNet's causal-conv window
    ("conv", (conv_dim, kernel_size - 1)) or its delta-rule state ("ssm", (heads, k_dim, v_dim))."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    # the leading dim as consecutive parts, each split by the spec's heads under tensor
    # parallelism (the conv window's q | k | v channels); empty: one part, the whole leading dim
    parts: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one entry of the leading dim (a channel's window, a head's state)."""
        return math.prod(self.shape[1:]) * element_size(self.dtype)


@dataclass(frozen=True)
class StateSpec(CacheSpec):
    """Per-sequence recurrent state: every covered layer keeps `tensors` for each running
    sequence, in the slot `request.state_slot` (allocated at admission, freed on finish or
    preemption). Each layer gets {name: [num_slots, *shape]}.

    Not prefix-cacheable: the state after a prefix summarises all of it in place, and without
    checkpoints (copies of the state at block boundaries) there is nothing to resume from.
    Used by the Gated DeltaNet layers (models/layers/gated_deltanet.py).

    Tensor parallelism: `heads` > 0 says each rank's slot holds heads [head_start, head_start +
    heads) of `total_heads`, each tensor's leading dim (each of its `parts`) split evenly by them
    (Gated DeltaNet: its key heads, each with its q and k channels and its value heads' v channels
    and delta-rule states). KV migration reads a rank's heads out of another split by these
    (parallel/transfer/state_shards.py). 0: every rank keeps the whole state."""

    tensors: tuple[StateTensor, ...] = ()
    heads: int = 0
    total_heads: int = 0
    head_start: int = 0

    kind: ClassVar[str] = "state"
    paged: ClassVar[bool] = False
    prefix_cacheable: ClassVar[bool] = False
    # a copy of the slot at a block boundary resumes the sequence exactly (prefix caching with
    # checkpoints, cache/block_manager.py); a kind whose state is not all in the slot says False
    checkpointable: ClassVar[bool] = True
    # the Gated DeltaNet decode kernels (kernels/gdn/) read the slots from the metadata's device
    # tensors and skip PAD_STATE_SLOT rows: a padded graph row touches no slot
    graph_capturable: ClassVar[bool] = True
    # speculative decoding can undo rejected drafts in this state: its layers run a verify step
    # position by position and keep a snapshot after each (kernels/context.py StatePositions, the
    # Gated DeltaNet layers); the core copies the accepted one back (cache/state_rollback.py)
    speculative_rollback: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tensors:
            raise ConfigError("StateSpec needs at least one StateTensor")
        for t in self.tensors:
            parts = t.parts or t.shape[:1]
            if sum(parts) != t.shape[0] or (self.heads and any(p % self.heads for p in parts)):
                raise ConfigError(f"state tensor {t.name} {tuple(t.shape)}: parts {parts} must add up to its leading "
                                  f"dim, each a multiple of the spec's {self.heads} heads")
        if self.heads and not 0 <= self.head_start <= self.total_heads - self.heads:
            raise ConfigError(f"state heads [{self.head_start}, {self.head_start + self.heads}) are not inside the "
                              f"model's {self.total_heads}")

    @property
    def layer_bytes(self) -> int:
        return sum(_align(t.nbytes, STATE_ALIGN) for t in self.tensors)

    @property
    def slot_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    def head_runs(self) -> tuple[tuple[int, int], ...]:
        """(byte offset inside a layer, bytes per head) of each tensor part, in slot order: a
        part's heads sit back to back, so heads [a, b) of it are one range. () when not split."""
        if not self.heads:
            return ()
        runs, off = [], 0
        for t in self.tensors:
            part_off = off
            for rows in t.parts or t.shape[:1]:
                runs.append((part_off, rows // self.heads * t.row_bytes))
                part_off += rows * t.row_bytes
            off += _align(t.nbytes, STATE_ALIGN)
        return tuple(runs)

    def page_bytes(self, block_size: int) -> int:
        return 0

    @property
    def bytes_per_token(self) -> int:
        return 0

    def storage(self, buf, num_blocks, block_size, num_slots):
        return buf.view(num_slots, self.slot_bytes)

    def layer_views(self, storage, num_blocks, block_size, num_slots):
        views, off = [], 0
        for _ in self.layers:
            layer = {}
            for t in self.tensors:
                raw = storage[:, off:off + t.nbytes]  # [slots, bytes], slot stride slot_bytes
                layer[t.name] = raw.view(t.dtype).unflatten(1, t.shape)
                off += _align(t.nbytes, STATE_ALIGN)
            views.append(layer)
        return views

    def describe(self) -> str:
        parts = ", ".join(f"{t.name} {tuple(t.shape)} {dtype_name(t.dtype)}" for t in self.tensors)
        return f"{self.name}[{self.num_layers} layers x ({parts})]"


# -------------------------------------------------------------------- derived from the model
def kv_head_start(num_kv_heads: int, tp_size: int, tp_rank: int) -> int:
    """First kv head a rank holds (the split QKVParallelLinear makes: an even split, or head
    rank * heads // tp replicated on tp / heads ranks when there are fewer heads than ranks)."""
    if num_kv_heads >= tp_size:
        return tp_rank * kv_heads_per_rank(num_kv_heads, tp_size)
    return tp_rank * num_kv_heads // tp_size


def default_cache_specs(model: ModelConfig, dtype: torch.dtype, tp_size: int = 1, tp_rank: int = 0) -> list[CacheSpec]:
    """Today's models: one full-attention group over every layer (this rank's kv heads), or one
    MLA latent group (the latent is whole on every rank)."""
    layers = tuple(range(model.num_hidden_layers))
    if model.uses_mla:
        heads, k_dim, _ = model.kv_cache_geometry
        return [MLALatentSpec(layers, latent_dim=k_dim, dtype=dtype)]
    n = model.num_key_value_heads
    return [FullAttentionSpec(layers, num_kv_heads=kv_heads_per_rank(n, tp_size), head_dim=model.head_dim,
                              dtype=dtype, total_kv_heads=n, head_start=kv_head_start(n, tp_size, tp_rank))]


def cache_specs_for(model: ModelConfig, dtype: torch.dtype, tp_size: int = 1, tp_rank: int = 0,
                    model_cls: type | None = None) -> list[CacheSpec]:
    """The cache specs of `model` on one tensor-parallel rank. A model class that defines the
    classmethod `cache_specs(model_config, *, dtype, tp_size, tp_rank)` declares its own (the
    seam for hybrid models); otherwise `default_cache_specs`. The result is checked."""
    declare = getattr(model_cls, "cache_specs", None)
    if declare is not None:
        specs = list(declare(model, dtype=dtype, tp_size=tp_size, tp_rank=tp_rank))
    else:
        specs = default_cache_specs(model, dtype, tp_size, tp_rank)
    check_specs(specs, model.num_hidden_layers)
    return specs


def check_specs(specs: Sequence[CacheSpec], num_layers: int | None = None) -> None:
    """Raise ConfigError unless `specs` are usable together: at least one, every layer index in
    range, at most one attention group and one group of each name per layer."""
    if not specs:
        raise ConfigError("a KV cache needs at least one cache spec")
    seen: dict[tuple[int, str], str] = {}
    for spec in specs:
        if not isinstance(spec, CacheSpec):
            raise ConfigError(f"cache specs must be CacheSpec instances, got {type(spec).__name__}")
        for layer in spec.layers:
            if num_layers is not None and layer >= num_layers:
                raise ConfigError(f"{spec.describe()} names layer {layer}, but the model has {num_layers}")
            key = (layer, "attention" if spec.attention else spec.name)
            if key in seen:
                raise ConfigError(f"layer {layer} has two {key[1]} caches: {seen[key]} and {spec.describe()}")
            seen[key] = spec.describe()


def graph_uncapturable(specs: Sequence[CacheSpec]) -> list[CacheSpec]:
    """The specs whose layers' decode step cannot be captured in a CUDA graph yet."""
    return [s for s in specs if not s.graph_capturable]


def state_checkpointable(specs: Sequence[CacheSpec]) -> bool:
    """Whether prefix caching can resume these specs' per-sequence state from checkpoints: there
    is a state spec and every one of them is checkpointable."""
    states = [s for s in specs if not s.paged]
    return bool(states) and all(getattr(s, "checkpointable", False) for s in states)
