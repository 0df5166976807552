"""FlashInfer paged attention (optional: `pip install flashinfer-python`; CUDA only).

Same interface as the Triton backend, chosen explicitly with `EngineBuilder.attention("flashinfer")`
("auto" never picks it). The engine's cache maps onto FlashInfer's paged layout directly: NHD,
page size = block size, and the separate K and V caches of a layer passed as a (k, v) tuple.

Per step, the batch is described to FlashInfer once (`plan()`, host-side work scheduling) on the
first layer's `attend()`; the other layers reuse that plan because they get the very same
AttentionMetadata object. Request i's pages and lengths:

  kv_indptr[i+1] - kv_indptr[i] = ceil(seq_len_i / page)       host, from meta.seq_lens_cpu
  kv_indices = those first entries of each block-table row      device (no sync), concatenated
  kv_last_page_len[i] = (seq_len_i - 1) % page + 1              host
  qo_indptr = query_start_loc                                   host, from meta.query_lens_cpu

Decode-only steps use BatchDecodeWithPagedKVCacheWrapper (tensor-core decode). Any step with a
longer query uses BatchPrefillWithPagedKVCacheWrapper with causal=True: FlashInfer aligns the
causal mask to the end of each context (queries are the last query_len positions, as in the torch
reference), so prefills, chunks over a cached prefix and the decode rows of a mixed batch are all
just rows of one prefill plan.

MLA models (DeepSeek-V3, Kimi-K2; latent cache [N, page, 1, 512 + 64]) go through
`attend_latent`: kernels/mla/mla_flashinfer.py (BatchMLAPagedAttentionWrapper), absorbed form, causal
for prefills and extends, reading the c_kv and k_pe halves of the cache as strided views.

plan() runs on the host every step, so this backend is not capturable in CUDA graphs. (For MLA
decode steps in CUDA graphs, use the triton backend with `mla_decode("flashinfer")`, the default
where flashinfer imports: kernels/mla/mla_flashinfer.py re-plans a per-batch-size wrapper before each
replay.)
FlashInfer's plan() fills a pinned host buffer and copies it to the device asynchronously; the
next plan() must not overwrite that buffer before the copy ran (the engine's host runs a step
ahead with async scheduling), so each plan waits for an event recorded after the previous one.
"""

from __future__ import annotations

import numpy as np
import torch

from dlengine.config import ConfigError
from dlengine.kernels.attention import paged_attention_torch as ref
from dlengine.kernels.attention.backend import AttentionBackendBase
from dlengine.kernels.common import host_indptr, page_indices
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.mla import mla_torch
from dlengine.kernels.mla.mla_torch import absorb_query, latent_to_v

try:
    import flashinfer
except ImportError:
    raise
except Exception as e:  # a broken install (e.g. missing CUDA libraries) counts as missing
    raise ImportError(f"flashinfer failed to import: {type(e).__name__}: {e}") from e

WORKSPACE_BYTES = 128 << 20
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


class FlashInferAttentionBackend(AttentionBackendBase):
    """FlashInfer batch decode / prefill over the paged cache (bf16 or fp16 caches)."""

    name = "flashinfer"
    fused_kv_write = True  # our paged layout: the fused norm/RoPE/KV-write kernel stores K/V
    supports_cuda_graphs = False  # plan() runs on the host every step
    supports_fp8_kv = False  # FP8 KV is not wired to FlashInfer's wrappers: the builder refuses it

    def __init__(self, workspace_bytes: int = WORKSPACE_BYTES, decode_tensor_cores: bool = True) -> None:
        self.workspace_bytes = workspace_bytes
        self.decode_tensor_cores = decode_tensor_cores
        self._device: torch.device | None = None
        self._decode = self._prefill = self._wrapper = None
        self._mla = None  # mla_flashinfer.FlashInferMLA, made on the first MLA step
        self._planned_meta: AttentionMetadata | None = None  # compared with `is`; kept alive so ids don't recycle
        self._planned_key: tuple | None = None
        self._plan_event: torch.cuda.Event | None = None
        self.num_plans = 0  # plans made so far (one per step, not per layer)
        try:  # our Triton write kernels when triton imports (same cache layout), else the torch writes
            from dlengine.kernels.attention.paged_attention_triton import store_kvcache
            from dlengine.kernels.mla.mla_triton import store_latent
        except Exception:  # noqa: BLE001 - no triton: the torch writes
            store_kvcache = store_latent = None
        self._store, self._store_latent = store_kvcache, store_latent

    def write_kv(self, k, v, k_cache, v_cache, meta):
        if self._store is not None and k_cache.is_cuda:
            self._store(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            ref.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta, scale):
        dtype = k_cache.dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"the flashinfer attention backend needs a float16/bfloat16 KV cache, not {dtype}; "
                              "use dtype('bfloat16') or another attention backend")
        key = (q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1], dtype, float(scale), q.device)
        if meta is not self._planned_meta or key != self._planned_key:
            self._plan(meta, key)
        return self._wrapper.run(q.to(dtype).contiguous(), (k_cache, v_cache))

    def _ensure_wrappers(self, device: torch.device) -> None:
        if self._device == device:
            return
        # one workspace for both wrappers: only one of them runs in a step
        ws = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=device)
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD",
                                                                     use_tensor_cores=self.decode_tensor_cores)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        self._ws, self._device, self._plan_event = ws, device, None

    def write_latent(self, latent, cache, meta):
        if self._store_latent is not None and cache.is_cuda:
            self._store_latent(latent, cache, meta.slot_mapping)
        else:
            mla_torch.write_latent_cache(latent, cache, meta.slot_mapping)

    def attend_latent(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                      weights, scale: float) -> torch.Tensor:
        """MLA over the latent cache [N, page, 1, C + R], absorbed for every step (FlashInfer's MLA
        kernel, causal for prefills and extends; kernels/mla/mla_flashinfer.py) -> [T, H, v]."""
        dtype = cache.dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"the flashinfer attention backend needs a float16/bfloat16 KV cache, not {dtype}")
        if self._mla is None:
            from dlengine.kernels.mla.mla_flashinfer import FlashInferMLA  # needs flashinfer.mla

            self._mla = FlashInferMLA(q_nope.device)
        out_lat = self._mla.run(absorb_query(q_nope, weights), q_pe, cache, meta, scale)
        return latent_to_v(out_lat, weights)

    def _plan(self, meta: AttentionMetadata, key: tuple) -> None:
        num_heads, num_kv_heads, head_dim, page, dtype, scale, device = key
        self._ensure_wrappers(device)
        if self._plan_event is not None:
            self._plan_event.synchronize()  # the previous plan's pinned-buffer copy has run
        seq_lens = meta.seq_lens_cpu
        pages = [-(-s // page) for s in seq_lens]
        kv_indptr = host_indptr(pages)
        last_page_len = torch.tensor([(s - 1) % page + 1 for s in seq_lens], dtype=torch.int32)
        indices = page_indices(meta.seq_lens, meta.block_tables, page, int(kv_indptr[-1]))
        common = {"pos_encoding_mode": "NONE", "q_data_type": dtype, "kv_data_type": dtype, "sm_scale": scale}
        if meta.max_query_len == 1:
            self._decode.plan(kv_indptr, indices, last_page_len, num_heads, num_kv_heads, head_dim, page, **common)
            self._wrapper = self._decode
        else:
            qo_indptr = host_indptr(meta.query_lens_cpu)
            self._prefill.plan(qo_indptr, kv_indptr, indices, last_page_len, num_heads, num_kv_heads, head_dim,
                               page, causal=True, **common)
            self._wrapper = self._prefill
        if device.type == "cuda":
            self._plan_event = torch.cuda.Event()
            self._plan_event.record(torch.cuda.current_stream(device))
        self._planned_meta, self._planned_key = meta, key
        self.num_plans += 1

    def kernel_names(self) -> dict[str, str]:
        return {"kv_write": "triton" if self._store is not None else "torch",
                "gqa_decode": "flashinfer BatchDecodeWithPagedKVCacheWrapper",
                "gqa_prefill": "flashinfer BatchPrefillWithPagedKVCacheWrapper",
                "mla_decode": "flashinfer BatchMLAPagedAttentionWrapper",
                "mla_prefill": "flashinfer BatchMLAPagedAttentionWrapper (causal)"}


__all__ = ["FlashInferAttentionBackend", "page_indices"]
