"""Our Triton kernels as an attention backend (CUDA; CPU only under TRITON_INTERPRET=1, for tests).

GQA: attention/paged_attention_triton.py (KV write, split-KV decode, varlen extend). MLA:
mla/mla_triton.py for prefills and extends, and for decode steps the kernel named by `mla_decode`,
a constructor argument chosen once at build (mla/decode_choice.py resolves the user's choice):

  "triton"      mla/mla_triton.py's decode kernel
  "gluon"       the Hopper kernel of mla/mla_decode_gluon.py
  "auto"        gluon where it applies to the call's cache layout, else triton (the one choice
                left per call: whether the cache is TMA-readable is a property of the tensor)
  "flashinfer"  FlashInfer's MLA decode (mla/mla_flashinfer.py); its host plan is made on the
                first layer of an eager step, and before every replay under CUDA graphs

GQA prefill / extend rows run the kernel named by `prefill_attention` (attention/prefill_choice.py):
"triton", the portable extend kernel, or "hopper", attention/prefill_hopper_triton.py, which reads
the step's own keys from the k / v the layer hands over (`step_kv`, see `reads_step_kv` in
backend.py) and only the cached prefix from the paged cache.

FP8 caches (kernels/kv_quant.py): every kernel here reads and writes them with the layer's scales;
MLA decode steps then run the Triton kernel ("auto" falls back from gluon, which reads bf16/fp16
latents only; an explicit "gluon" / "flashinfer" choice is refused at build).

Everything but FlashInfer's plan is capturable in CUDA graphs: launch sizes come from static
metadata and no kernel syncs with the host. That includes speculative verify steps (1 + k query
tokens per request, `meta.uniform_query_len`): GQA runs the extend kernel (padding requests,
context 0, get zeros), MLA one absorbed launch of the Triton kernel whose rows are built on the
device (mla_triton.uniform_rows); FlashInfer's MLA decode serves one-token rows only, so verify
steps never need its plan.
"""

from __future__ import annotations

import numpy as np
import torch

from dlengine.config import ConfigError
from dlengine.kernels.attention import paged_attention_triton as gqa
from dlengine.kernels.attention import prefill_hopper_triton as hopper
from dlengine.kernels.attention.backend import AttentionBackendBase
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.mla import mla_triton
from dlengine.kernels.mla.decode_choice import MLA_DECODE_KERNELS
from dlengine.kernels.mla.mla_torch import MLAWeights, absorb_query, latent_to_v


class TritonAttentionBackend(AttentionBackendBase):
    name = "triton"
    fused_kv_write = True  # our paged layout: the fused norm/RoPE/KV-write kernel stores K/V
    supports_cuda_graphs = True
    supports_cuda_graph_verify = True  # verify steps: the extend / absorbed kernels, no host work
    supports_fp8_kv = True

    def __init__(self, config: dict | None = None, num_splits: int | None = None,
                 mla_config: dict | None = None, mla_decode: str = "auto", prefill_attention: str = "triton") -> None:
        if mla_decode not in MLA_DECODE_KERNELS:
            raise ConfigError(f"unknown mla_decode kernel {mla_decode!r}; choose one of {list(MLA_DECODE_KERNELS)}")
        if prefill_attention not in ("triton", "hopper"):
            raise ConfigError(f"prefill_attention kernel {prefill_attention!r} on the triton backend: 'triton' or "
                              "'hopper' (resolve 'auto' with attention/prefill_choice.py)")
        # GQA tiles: paged_attention_triton._default_config keys, and prefill_hopper_triton.HOPPER_KEYS
        self.config = config
        self.num_splits = num_splits  # fixed split count (tests); None: the heuristic
        self.mla_config = mla_config  # tiles of the MLA decode kernel (mla_triton.DECODE_DEFAULTS keys)
        self.mla_decode = mla_decode
        self.prefill_attention = prefill_attention
        self.reads_step_kv = prefill_attention == "hopper"  # layers then pass attend(..., step_kv=(k, v))
        self._graph_batch: int | None = None  # the batch size being warmed up / captured, if any
        self._flashinfer_mla = None  # mla_flashinfer.FlashInferMLA, made on the first decode step

    # ------------------------------------------------------------------ GQA
    def write_kv(self, k, v, k_cache, v_cache, meta: AttentionMetadata, k_scale=None, v_scale=None) -> None:
        gqa.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
               v_scale=None, step_kv=None) -> torch.Tensor:
        if step_kv is not None and self.prefill_attention == "hopper":  # it falls back where it does not apply
            return hopper.prefill_attention(q, *step_kv, k_cache, v_cache, meta, scale, num_splits=self.num_splits,
                                            config=self.config, k_scale=k_scale, v_scale=v_scale)
        return gqa.paged_attention(q, k_cache, v_cache, meta, scale, num_splits=self.num_splits, config=self.config,
                                   k_scale=k_scale, v_scale=v_scale)

    # ------------------------------------------------------------------ MLA
    def write_latent(self, latent, cache, meta: AttentionMetadata, kv_scale=None) -> None:
        mla_triton.store_latent(latent, cache, meta.slot_mapping, kv_scale)

    def attend_latent(self, q_nope, q_pe, cache, meta: AttentionMetadata, weights: MLAWeights,
                      scale: float, kv_scale=None) -> torch.Tensor:
        if self.mla_decode == "flashinfer" and meta.max_query_len == 1:  # bf16/fp16 caches only (build check)
            out_lat = self._flashinfer(q_nope.device).run(absorb_query(q_nope, weights), q_pe, cache, meta, scale,
                                                          graph_batch=self._graph_batch)
            return latent_to_v(out_lat, weights)
        # prefills and extends (and flashinfer's non-decode steps) run our kernels
        decode_kernel = "auto" if self.mla_decode == "flashinfer" else self.mla_decode
        return mla_triton.mla_attention(q_nope, q_pe, cache, meta, weights, scale, config=self.mla_config,
                                        num_splits=self.num_splits, decode_kernel=decode_kernel, kv_scale=kv_scale)

    def _flashinfer(self, device: torch.device):
        if self._flashinfer_mla is None:
            from dlengine.kernels.mla.mla_flashinfer import FlashInferMLA  # optional package

            self._flashinfer_mla = FlashInferMLA(device)
        return self._flashinfer_mla

    # ------------------------------------------------------------------ CUDA graphs
    @property
    def plans_decode_on_host(self) -> bool:
        """FlashInfer's MLA decode is planned on the host before each replay (kernels/attention/backend.py)."""
        return self.mla_decode == "flashinfer"

    def prepare_capture(self, batch_size: int) -> None:
        self._graph_batch = batch_size

    def end_capture(self) -> None:
        self._graph_batch = None

    def before_replay(self, batch_size: int, seq_lens: np.ndarray, block_tables: torch.Tensor) -> None:
        if self._flashinfer_mla is not None:  # the only host work a replay needs: FlashInfer's plan
            self._flashinfer_mla.plan_graph_replay(batch_size, seq_lens, block_tables)

    def kernel_names(self) -> dict[str, str]:
        decode = {"auto": "gluon where the cache layout allows, else triton"}.get(self.mla_decode, self.mla_decode)
        prefill = ("hopper (Triton: the chunk's keys by TMA, the cached prefix gathered)"
                   if self.prefill_attention == "hopper" else "triton")
        return {"kv_write": "triton", "gqa_decode": "triton split-KV", "gqa_prefill": prefill,
                "mla_decode": decode, "mla_prefill": "triton (absorbed short rows, expanded long ones)"}
