"""The attention backend seam: what a model's attention layers call, as methods.

A backend owns how this step's keys/values reach the paged cache and how queries attend over it,
for both attention families the models use:

  GQA (Qwen3, ...)            write_kv(k, v, k_cache, v_cache, meta); attend(q, k_cache, v_cache, meta, scale)
  MLA (DeepSeek-V3, Kimi-K2)  write_latent(latent, cache, meta); attend_latent(q_nope, q_pe, cache, meta,
                              weights, scale) -- decode steps absorbed, prefills / extends as the
                              backend sees fit (kernels/mla/)

FP8 KV caches (float8_e4m3fn, `cache(dtype="fp8_e4m3")`, kernels/kv_quant.py): a backend that
declares `supports_fp8_kv = True` receives the layer's float32 scale tensors as keywords, on
FP8 caches only (`k_scale=`, `v_scale=` for GQA, `kv_scale=` for MLA's latent), quantises on
write and dequantises on read. The builder refuses an FP8 cache with any other backend.

A backend may also read this step's own keys and values directly, instead of from the cache
(prefill: they are contiguous there, the paged cache holds them scattered): declaring
`reads_step_kv = True`, it receives them as `attend(..., step_kv=(k, v))` (k / v [T, Hkv, D],
the values just written, after QK-norm and RoPE); layers pass nothing to other backends.

and the CUDA-graph hooks the graph runner calls (engine/cuda_graph.py): `prepare_capture(bs)`
before warming up and capturing the graph of `bs` decode rows, `end_capture()` after it, and
`before_replay(bs, seq_lens, block_tables)` on the host before every replay. Backends without
host work around graphs inherit the no-op hooks of `AttentionBackendBase`. A capturable backend
that also declares `supports_cuda_graph_verify = True` gets speculative verify steps captured
too (1 + k query tokens per request, `AttentionMetadata.uniform_query_len`): its attend /
attend_latent then take such batches with no host work at all, and the hooks above are called
for the decode graphs only. Without it (the default) verify steps run eagerly. A backend whose
one-token batches need that host plan before each replay declares `plans_decode_on_host = True`:
its graphs then hold only the target's decode forward, and the MTP proposer's chained drafts
(one-token forwards of other lengths, speculative/mtp_graphs.py) run eagerly.

Implementations: torch_backend.py (the reference, any device), triton_backend.py (our kernels,
capturable), flashinfer_backend.py (optional package). The engine picks one at build
(kernels/selection.py); a user may pass any object following `AttentionBackend` instead.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.mla.mla_torch import MLAWeights


@runtime_checkable
class AttentionBackend(Protocol):
    name: str
    supports_cuda_graphs: bool  # launch sizes from static metadata, no host syncs in a forward
    # Optional, not a protocol member (absent reads as False): `supports_cuda_graph_verify`,
    # multi-token queries under capture too, with no host hooks (see the module doc)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, **kv_scales: torch.Tensor) -> None:
        """k/v [T, Hkv, D] -> the paged caches [N, page, Hkv, D] at meta.slot_mapping (< 0: skip).
        FP8 caches only: k_scale / v_scale keywords (see the module docstring)."""

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, **kv_scales: torch.Tensor) -> torch.Tensor:
        """Causal attention of q [T, H, D] over each request's paged context -> [T, H, D]. A backend
        with `reads_step_kv = True` also gets step_kv=(k, v), this step's keys / values."""

    def write_latent(self, latent: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                     **kv_scales: torch.Tensor) -> None:
        """MLA latents [T, kv_lora_rank + rope] -> the latent cache [N, page, 1, kv_lora_rank + rope].
        FP8 caches only: a kv_scale keyword."""

    def attend_latent(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                      weights: MLAWeights, scale: float, **kv_scales: torch.Tensor) -> torch.Tensor:
        """MLA of q_nope [T, H, nope], q_pe [T, H, rope] (rotated) over the latent cache, which
        already holds this step's latents -> [T, H, v_head_dim]."""

    def prepare_capture(self, batch_size: int) -> None:
        """Host work before warming up and capturing the CUDA graph of `batch_size` decode rows."""

    def end_capture(self) -> None:
        """Host work after that graph was captured (or its capture failed)."""

    def before_replay(self, batch_size: int, seq_lens: np.ndarray, block_tables: torch.Tensor) -> None:
        """Host work before replaying the graph of `batch_size` rows (seq_lens: host, 0 = padding;
        block_tables: the graph's static buffer, already holding this step's rows)."""


class AttentionBackendBase:
    """Defaults for `AttentionBackend`: not capturable, no host work around graphs, and no MLA
    (a GQA-only backend inherits the MLA methods' clear error)."""

    name = "base"
    supports_cuda_graphs = False
    supports_cuda_graph_verify = False  # verify steps (1 + k tokens a request) in graphs: see the module doc
    # True when a one-token batch in a graph needs `before_replay`'s host plan for its lengths:
    # such a graph can hold only the target's decode forward (planned for that step), not forwards
    # of other lengths after it (the MTP proposer's chained drafts then run eagerly)
    plans_decode_on_host = False
    # True when the cache is the paged layout the fused QK-norm + RoPE + KV-write op writes
    # (kernels/norm_rope): attention layers then store K/V through that op instead of write_kv
    fused_kv_write = False
    # True when write_kv / attend / write_latent / attend_latent take the FP8 cache scales
    supports_fp8_kv = False
    # True when attend takes this step's keys / values too: attend(..., step_kv=(k, v)) (module doc)
    reads_step_kv = False

    def write_latent(self, latent: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, **kv_scales) -> None:
        raise NotImplementedError(f"attention backend {self.name!r} does not run multi-head latent attention")

    def attend_latent(self, q_nope, q_pe, cache, meta, weights, scale, **kv_scales) -> torch.Tensor:
        raise NotImplementedError(f"attention backend {self.name!r} does not run multi-head latent attention")

    def prepare_capture(self, batch_size: int) -> None:
        pass

    def end_capture(self) -> None:
        pass

    def before_replay(self, batch_size: int, seq_lens: np.ndarray, block_tables: torch.Tensor) -> None:
        pass

    def kernel_names(self) -> dict[str, str]:
        """What runs each attention op, for `Kernels.describe()` (backends name their kernels)."""
        return {op: self.name for op in ("kv_write", "gqa_decode", "gqa_prefill", "mla_decode", "mla_prefill")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


PROTOCOL_METHODS = ("write_kv", "attend", "write_latent", "attend_latent", "prepare_capture", "end_capture",
                    "before_replay")


def missing_methods(backend: object) -> list[str]:
    """The `AttentionBackend` members `backend` lacks (empty when it follows the protocol)."""
    missing = [m for m in PROTOCOL_METHODS if not callable(getattr(backend, m, None))]
    return missing + [a for a in ("name", "supports_cuda_graphs") if not hasattr(backend, a)]
