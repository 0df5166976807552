"""DeepSeek Sparse Attention kernels (docs/dsa.md): the lightning indexer's key write, scoring and
top-k, and sparse MLA over each query's selected tokens, for prefill, chunked prefill and decode.

Two implementations of one small interface (`DSAKernels`), chosen once when a layer is built
(`dsa_kernels_for`), so the model never branches on a kernel's name:

  "torch"   indexer_torch.py + sparse_mla_torch.py: exact, host loops over requests (the oracle
            and the CPU path; what the torch attention backend pairs with)
  "triton"  indexer_triton.py (scores) + torch.topk, sparse_mla_triton.py (absorbed attention over
            the gathered latent rows); no host syncs, so decode steps can be captured in CUDA graphs

The engine takes "triton" where its fused ops are Triton (CUDA, attention not "torch"), else
"torch"; DLENGINE_DSA_KERNELS=torch|triton overrides it (tests run the Triton kernels on CPU under
TRITON_INTERPRET=1 that way).

FP8 caches (`cache(dtype="fp8_e4m3")`, docs/fp8_kv.md): every method takes the layer's float32
scale tensor of the cache it touches (`kv_scale` for the latent, `key_scale` for the indexer
keys; None: 1.0, and unused for other cache dtypes). Writes store x / scale rounded to e4m3,
reads fold the scale back in.
"""

from __future__ import annotations

import os

import torch

from dlengine.config import ConfigError
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.dsa import indexer_torch, sparse_mla_torch
from dlengine.kernels.kv_quant import is_fp8
from dlengine.kernels.mla.mla_torch import MLAWeights, absorb_query, latent_to_v

DSA_KERNELS_ENV = "DLENGINE_DSA_KERNELS"


class TorchDSAKernels:
    """The references: exact, one request at a time."""

    name = "torch"

    def write_keys(self, k: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                   key_scale: torch.Tensor | None = None) -> None:
        """Indexer keys [T, D] -> their paged cache [N, page, 1, D] at meta.slot_mapping."""
        indexer_torch.write_indexer_keys(k, cache, meta.slot_mapping, key_scale)

    def select(self, q: torch.Tensor, weights: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
               positions: torch.Tensor, topk: int, softmax_scale: float,
               key_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Top-k positions [T, width] int32 (-1 padded) of each query token's visible tokens."""
        return indexer_torch.indexer_topk_ref(q, weights, cache, meta, topk, softmax_scale, key_scale)

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
               weights: MLAWeights, scale: float, selected: torch.Tensor,
               kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        """MLA of each query token over its selected tokens of the latent cache -> [T, H, v]."""
        return sparse_mla_torch.sparse_mla_ref(q_nope, q_pe, cache, meta, weights, scale, selected, kv_scale)


class TritonDSAKernels:
    """Triton scoring + torch.topk, absorbed sparse MLA over gathered latent rows."""

    name = "triton"

    def __init__(self) -> None:
        from dlengine.kernels.dsa import indexer_triton, sparse_mla_triton
        from dlengine.kernels.mla import mla_triton

        self._indexer, self._sparse, self._mla = indexer_triton, sparse_mla_triton, mla_triton

    def write_keys(self, k, cache, meta: AttentionMetadata, key_scale=None) -> None:
        if not is_fp8(cache.dtype):
            # round in torch (nearest even; a no-op when the dtypes agree): float32 keys into the
            # bf16 key cache of an FP8 run would be truncated by Triton's CPU interpreter
            k = k.to(cache.dtype)
        # the latent's row scatter (slot < 0 skipped), FP8 rounding included
        self._mla.store_latent(k, cache, meta.slot_mapping, key_scale)

    def select(self, q, weights, cache, meta: AttentionMetadata, positions, topk: int, softmax_scale: float,
               key_scale=None):
        return self._indexer.indexer_topk(q, weights, cache, meta.block_tables, meta.query_start_loc, positions,
                                          topk, softmax_scale, key_scale=key_scale)

    def attend(self, q_nope, q_pe, cache, meta: AttentionMetadata, weights: MLAWeights, scale: float, selected,
               kv_scale=None):
        token_req = indexer_torch.token_requests(meta.query_start_loc, q_nope.shape[0])
        slots = indexer_torch.topk_to_slots(selected, meta.block_tables, token_req, cache.shape[1])
        out_lat = self._sparse.sparse_mla_attend(absorb_query(q_nope, weights), q_pe, cache, slots, scale,
                                                 out_dtype=q_nope.dtype, kv_scale=kv_scale)
        return latent_to_v(out_lat, weights)


DSAKernels = TorchDSAKernels | TritonDSAKernels
KNOWN = {"torch": TorchDSAKernels, "triton": TritonDSAKernels}


def dsa_kernels_for(kernels) -> DSAKernels:
    """The DSA kernels that go with an engine's `Kernels` (kernels/selection.py): Triton where its
    fused ops are Triton, else the torch references; DLENGINE_DSA_KERNELS overrides."""
    choice = os.environ.get(DSA_KERNELS_ENV, "")
    if not choice:
        on_triton = kernels.attention.name != "torch" and kernels.ops.names.get("norm_rope", "").startswith("triton")
        choice = "triton" if on_triton else "torch"
    if choice not in KNOWN:
        raise ConfigError(f"{DSA_KERNELS_ENV}={choice!r}; choose one of {sorted(KNOWN)}")
    return KNOWN[choice]()


__all__ = ["DSA_KERNELS_ENV", "DSAKernels", "TorchDSAKernels", "TritonDSAKernels", "dsa_kernels_for"]
