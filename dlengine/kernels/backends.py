"""Attention backends: one interface, chosen once at build time.

A backend stores this step's K/V into the paged cache and attends the step's queries over it.
`torch` is the reference (any device). Faster backends (Triton, optional FlashInfer) plug in here
with the same two methods; `resolve_attention_backend("auto", device)` picks Triton or torch.
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
    supports_cuda_graphs = False  # indexes with host-side lengths: not capturable

    def write_kv(self, k, v, k_cache, v_cache, meta):
        ref.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta, scale):
        return ref.paged_attention_ref(q, k_cache, v_cache, meta, scale)


def _triton_backend():
    from dlengine.kernels.triton_attention import TritonAttentionBackend

    return TritonAttentionBackend


def _flashinfer_backend():
    from dlengine.kernels.flashinfer_attention import FlashInferAttentionBackend

    return FlashInferAttentionBackend


# name -> zero-argument loader of the backend class (imports stay lazy: optional packages)
_BACKENDS = {"torch": lambda: TorchAttentionBackend, "triton": _triton_backend, "flashinfer": _flashinfer_backend}
_INSTALL_HINT = {"triton": "pip install triton", "flashinfer": "pip install flashinfer-python"}


def _importable(name: str) -> bool:
    try:
        _BACKENDS[name]()
        return True
    except ImportError:
        return False


def known_attention_backends() -> list[str]:
    """Every backend name, importable here or not (no imports: cheap for --help texts)."""
    return sorted(_BACKENDS)


def available_attention_backends() -> list[str]:
    return sorted(n for n in _BACKENDS if _importable(n))


def resolve_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """Return the backend object for `name`; "auto" takes the best that works on `device`:
    Triton on CUDA when it imports (our kernels, capturable in CUDA graphs), else the torch
    reference. FlashInfer is never picked by "auto"; ask for it by name."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and _importable("triton") else "torch"
    if name not in _BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    try:
        cls = _BACKENDS[name]()
    except ImportError as e:
        raise ConfigError(
            f"attention backend {name!r} is not importable here ({e}); {_INSTALL_HINT.get(name, '')}"
        ) from e
    if name == "triton" and device.type != "cuda":
        from dlengine.kernels.triton_attention import interpret_mode

        if not interpret_mode():
            raise ConfigError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1 for tests)")
    if name == "flashinfer" and device.type != "cuda":
        raise ConfigError(f"the flashinfer attention backend needs a CUDA device, not {device}")
    return cls()
