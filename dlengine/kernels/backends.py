"""Attention backends: one interface, chosen once at build time.

A backend stores this step's K/V into the paged cache and attends the step's queries over it.
`torch` is the reference (any device). Faster backends (Triton, FlashInfer) plug in here with the
same two methods; `resolve_attention_backend("auto", device)` picks the best importable one.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dlengine.config import ConfigError
from dlengine.kernels.attention_metadata import AttentionMetadata
from dlengine.kernels import paged_attention_torch as ref


class AttentionBackend(Protocol):
    name: str

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None: ...

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


class TorchAttentionBackend:
    """Reference implementation; exact in float32, used on CPU and as the oracle everywhere."""

    name = "torch"

    def write_kv(self, k, v, k_cache, v_cache, meta):
        ref.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta, scale):
        return ref.paged_attention_ref(q, k_cache, v_cache, meta, scale)


_BACKENDS = {"torch": TorchAttentionBackend}


def available_attention_backends() -> list[str]:
    return sorted(_BACKENDS)


def resolve_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """Return the backend object for `name`; "auto" takes the fastest that works on `device`."""
    if name == "auto":
        name = "torch"
    if name not in _BACKENDS:
        raise ConfigError(
            f"unknown attention backend {name!r}; available here: {available_attention_backends()}"
        )
    return _BACKENDS[name]()
