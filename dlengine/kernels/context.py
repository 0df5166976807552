"""What one forward pass reads besides activations: the batch layout (`AttentionMetadata`) and the
per-layer KV tensors (`ForwardContext`). The engine builds both every step; model layers and
attention backends read them. They live here, below both, so the engine never imports models.

The runner flattens all scheduled requests into one token dimension (no padding). Request `i`
owns query tokens `query_start_loc[i]:query_start_loc[i+1]`; those are the *last* tokens of its
context of `seq_lens[i]` tokens, whose KV lives in blocks `block_tables[i, :]` of the paged cache.
`slot_mapping[t]` is the flat cache slot (block * block_size + offset) where token t's K/V go.

Models with recurrent-state layers (cache StateSpec, e.g. Gated DeltaNet) also get, per request,
its state slot (`request.state_slot`) and whether it resumes the state saved there
(num_computed_tokens > 0: a later chunk of a prompt, or a decode) or starts from zeros (the
first step of a request, or its recompute after preemption); those layers find their state
tensors in `ForwardContext.layer_caches[i]`. A negative slot (`PAD_STATE_SLOT`) marks a padded
row of a captured CUDA-graph batch (engine/cuda_graph.py): the state kernels read zeros for it,
write no slot and give it a zero output, so padding never touches a real sequence's state.

Requests with images (multimodal/inputs.py) are listed in `ForwardContext.multimodal`, one
`MultimodalSegment` per such request in the batch: which rows of the flat batch are its tokens and
its MultimodalInputs, from which a multimodal model takes image embeddings and M-RoPE positions.

The kernels themselves (attention backend, fused ops) are not in the context: layers receive them
once, when they are built (kernels/selection.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

# the state slot of a padded row in a CUDA-graph batch: every slot-indexed state kernel skips it
PAD_STATE_SLOT = -1


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32, device
    seq_lens: torch.Tensor  # [B] int32, device: context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, device (padded with 0)
    slot_mapping: torch.Tensor  # [T] int64, device
    max_query_len: int
    max_seq_len: int
    # host copies: reference backends loop over requests with them, avoiding device syncs
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # recurrent-state layers only (None when the cache has no state groups)
    state_slots: torch.Tensor | None = None  # [B] int64, device (PAD_STATE_SLOT: a padded row)
    has_initial_state: torch.Tensor | None = None  # [B] bool, device
    # host copies, for prompt steps (varlen kernels); None in a captured decode graph, whose
    # slots change at every replay: decode layers read the device tensors only
    state_slots_cpu: list[int] | None = None
    has_initial_state_cpu: list[bool] | None = None
    # prefix caching: per request, a state slot to save the state before token `offset` of this
    # step into (-1: none); None when no request checkpoints inside this step
    state_checkpoint_slots_cpu: list[int] | None = None
    state_checkpoint_offsets_cpu: list[int] | None = None
    # CUDA-graph steps (engine/cuda_graph.py): every request owns exactly this many query tokens
    # (query_start_loc = arange * q) and the host lists above hold placeholders, not this step's
    # lengths; kernels that need per-token rows derive them on the device from query_start_loc and
    # seq_lens. A request with seq_lens 0 is padding: its rows attend nothing. None elsewhere.
    uniform_query_len: int | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass
class MultimodalSegment:
    row: int  # the request's first row in the flat batch
    start: int  # index (in the request's tokens) of that row's token
    num_tokens: int  # its rows this step
    inputs: Any  # the request's dlengine.multimodal.inputs.MultimodalInputs


@dataclass
class ForwardContext:
    """Set by the runner for the duration of one forward; attention layers read their cache
    tensors by layer index: `kv_caches[i] = (k_cache, v_cache)` (MLA: (latent cache, empty)).
    `layer_caches[i]` maps every cache group covering layer i to its views
    (KVCache.caches_of_layer), e.g. {"state": {"conv": [slots, ...], "ssm": [slots, ...]}}."""

    meta: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    layer_caches: Sequence[dict[str, Any]] = ()
    multimodal: Sequence[MultimodalSegment] = ()  # requests with images in this batch
