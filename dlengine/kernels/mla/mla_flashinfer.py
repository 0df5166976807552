"""Absorbed MLA through FlashInfer's `BatchMLAPagedAttentionWrapper` (its sm90 kernel), eager or
captured in CUDA graphs. Two users: the triton backend's decode steps (`EngineBuilder.mla_decode(
"flashinfer")`, or "auto" off Hopper where FlashInfer imports; its prefills and extends stay on our kernels,
the non-absorbed path being far cheaper for long prompts), and `attention("flashinfer")`, which
runs every MLA step here (prefill and extend rows causal). See docs/mla.md.

FlashInfer plans a batch on the host (`plan()`: pages and lengths -> a work schedule in its
integer workspace). Eager steps plan once per step (the first MLA layer) and reuse the plan in
the other layers. Under CUDA graphs each captured batch size has its own wrapper built with
`use_cuda_graph=True` over reserved index buffers; the graph captures `run()` and the graph
runner re-plans that wrapper with the step's real lengths just before each replay
(`plan_graph_replay`). Padding rows (context 0 in our metadata) are given one page of one token
(any valid page: it is only read, and their outputs are dropped), because FlashInfer's kernel
expects non-empty contexts.

plan() fills a pinned host buffer and copies it to the device asynchronously; the next plan must
not overwrite that buffer before the copy ran (with async scheduling the host runs a step ahead),
so each plan first waits for an event recorded after the previous one.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from dlengine.kernels.common import host_indptr, page_indices
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.mla.latent import DEEPSEEK_LATENT, latent_cache_problem

try:
    from flashinfer.mla import BatchMLAPagedAttentionWrapper
except ImportError:
    raise
except Exception as e:  # a broken install (missing CUDA libraries, ...) counts as missing
    raise ImportError(f"flashinfer failed to import: {type(e).__name__}: {e}") from e

WORKSPACE_BYTES = 128 << 20
KV_LORA, ROPE = DEEPSEEK_LATENT  # the latent dims FlashInfer's MLA kernels are built for


def supported(device: torch.device, cache_dtype: torch.dtype, kv_lora: int, rope: int) -> str | None:
    """None when FlashInfer's MLA decode can run these shapes here, else why not."""
    if device.type != "cuda":
        return "needs a CUDA device"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "needs an sm_80+ GPU"
    return latent_cache_problem(cache_dtype, kv_lora, rope)


def _pages(seq_lens: np.ndarray, page: int) -> np.ndarray:
    return (seq_lens + page - 1) // page


class FlashInferMLA:
    """Absorbed MLA with FlashInfer over our latent cache; see the module doc."""

    def __init__(self, device: torch.device, workspace_bytes: int = WORKSPACE_BYTES) -> None:
        self.device = device
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self._eager: BatchMLAPagedAttentionWrapper | None = None
        self._graph: dict[int, BatchMLAPagedAttentionWrapper] = {}
        self._planned_meta: AttentionMetadata | None = None  # compared with `is` (kept alive: no id reuse)
        self._plan_args: tuple | None = None  # (num_heads, page, scale, dtype), fixed per engine
        self._plan_event: torch.cuda.Event | None = None

    # ------------------------------------------------------------------ planning
    def _plan(self, wrapper, seq_lens: np.ndarray, block_tables: torch.Tensor, query_lens: np.ndarray | None = None,
              seq_lens_dev: torch.Tensor | None = None) -> None:
        """Plan `wrapper` for rows of context seq_lens (host) over block_tables (device); query_lens
        None = one decode token a row. seq_lens_dev: the same lengths on the device, if at hand."""
        num_heads, page, scale, dtype = self._plan_args
        if self._plan_event is not None:
            self._plan_event.synchronize()  # the previous plan's pinned copy has run
        bs = len(seq_lens)
        pages = _pages(seq_lens, page)
        if seq_lens_dev is None:
            seq_lens_dev = torch.from_numpy(seq_lens).to(block_tables.device, non_blocking=True)
        kv_indices = page_indices(seq_lens_dev, block_tables, page, int(pages.sum()))
        qo_indptr = torch.arange(bs + 1, dtype=torch.int32) if query_lens is None else host_indptr(query_lens)
        with warnings.catch_warnings():  # the flat-metadata form is deprecated in 0.7 but stable
            warnings.simplefilter("ignore", DeprecationWarning)
            wrapper.plan(qo_indptr=qo_indptr, kv_indptr=host_indptr(pages), kv_indices=kv_indices,
                         kv_len_arr=torch.from_numpy(seq_lens.astype(np.int32)), num_heads=num_heads,
                         head_dim_ckv=KV_LORA, head_dim_kpe=ROPE, page_size=page, causal=query_lens is not None,
                         sm_scale=scale, q_data_type=dtype, kv_data_type=dtype)
        self._plan_event = torch.cuda.Event()
        self._plan_event.record(torch.cuda.current_stream(self.device))

    def plan_graph_replay(self, bs: int, seq_lens: np.ndarray, block_tables: torch.Tensor) -> None:
        """Re-plan the batch-size-`bs` graph's wrapper for the lengths of the step about to replay
        (`seq_lens` [bs] host, 0 = padding row; `block_tables` the graph's static [bs, W] buffer,
        already holding this step's rows in stream order)."""
        wrapper = self._graph.get(bs)
        if wrapper is None:  # this engine's graphs run no MLA decode through FlashInfer
            return
        self._plan(wrapper, np.maximum(np.asarray(seq_lens[:bs], dtype=np.int64), 1), block_tables)

    # ------------------------------------------------------------------ running
    def run(self, q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
            scale: float, graph_batch: int | None = None) -> torch.Tensor:
        """q_lat [T, H, 512], q_pe [T, H, 64] (the batch's tokens, query_start_loc order) over the
        latent cache [N, page, 1, 576] -> out_lat [T, H, 512]. `graph_batch`: this forward is a
        CUDA-graph warm-up/capture of that many decode rows (its wrapper is planned on first sight;
        replays are re-planned by plan_graph_replay)."""
        dtype, page = cache.dtype, cache.shape[1]
        args = (q_lat.shape[1], page, float(scale), dtype)
        if self._plan_args is None:
            self._plan_args = args
        elif self._plan_args != args:
            raise ValueError(f"FlashInferMLA planned for (heads, page, scale, dtype) {self._plan_args}, "
                             f"called with {args}")
        if graph_batch is None:
            if self._eager is None:
                self._eager = BatchMLAPagedAttentionWrapper(self.workspace)
            wrapper = self._eager
            if meta is not self._planned_meta:
                query_lens = None if meta.max_query_len == 1 else np.asarray(meta.query_lens_cpu, dtype=np.int64)
                self._plan(wrapper, np.asarray(meta.seq_lens_cpu, dtype=np.int64), meta.block_tables, query_lens,
                           meta.seq_lens)
                self._planned_meta = meta
        else:
            wrapper = self._graph.get(graph_batch)
            if wrapper is None:
                bs, width = graph_batch, meta.block_tables.shape[1]
                i32 = {"dtype": torch.int32, "device": self.device}
                wrapper = BatchMLAPagedAttentionWrapper(
                    self.workspace, use_cuda_graph=True, qo_indptr=torch.zeros(bs + 1, **i32),
                    kv_indptr=torch.zeros(bs + 1, **i32), kv_indices=torch.zeros(bs * width, **i32),
                    kv_len_arr=torch.zeros(bs, **i32))
                self._plan(wrapper, np.ones(bs, dtype=np.int64), meta.block_tables)  # what the capture holds
                self._graph[graph_batch] = wrapper
        c = cache.shape[-1] - ROPE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return wrapper.run(q_nope=q_lat.to(dtype).contiguous(), q_pe=q_pe.to(dtype).contiguous(),
                               ckv_cache=cache[:, :, 0, :c], kpe_cache=cache[:, :, 0, c:])


__all__ = ["FlashInferMLA", "supported"]
