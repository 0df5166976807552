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

A speculative verify step of such a model feeds each request its last token and its drafts;
the state layers then run those requests position by position through their one-token ops and
copy the state after each draft-to-be-judged position to a snapshot slot (`StatePositions`), so
the core can roll the slot back to the accepted length afterwards (cache/state_rollback.py).

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
    # verify steps of models with recurrent state: which rows run the state layers one position at
    # a time, with snapshots of the state after each (None: every request as described above)
    state_positions: "StatePositions | None" = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass
class PositionGroup:
    """Position j of every request in a state-positions step: one row each, run together through
    the one-token state ops, then the state of some of them copied to snapshot slots."""

    rows: torch.Tensor  # [m] int64: the rows of the batch at this position
    slots: torch.Tensor  # [m] int64: each row's state slot (PAD_STATE_SLOT: no state read or written)
    has_initial_state: torch.Tensor  # [m] bool: whether the row resumes its slot (False: zeros)
    # the state after this position is copied from slot snapshot_src[i] to snapshot_dst[i] (a
    # slot < 0 in snapshot_dst copies nothing); None: no copy at this position
    snapshot_src: torch.Tensor | None = None
    snapshot_dst: torch.Tensor | None = None


@dataclass
class StatePositions:
    """How a step with speculative drafts runs a model's recurrent-state layers.

    Request i of the step feeds its last token and d_i drafts (1 + d_i rows; plain decodes have
    d_i = 0). Those rows run position by position: group j holds position j of every such request
    (its row, its slot) and goes through the one-token conv and delta-rule updates, which read and
    write the slot in place; then the state after position j < d_i is copied to the request's
    snapshot slot for j. Once the core knows how many drafts a request kept (a), it copies
    snapshot a back into the slot (a = d_i: the slot is already right). The one-token ops are the
    decode ones, so the state evolves exactly as in plain decoding, and a group needs only device
    tensors of fixed shapes (capturable: a CUDA-graph verify step lays out every request's 1 + k
    rows with slot PAD_STATE_SLOT past its real ones).

    Requests of the step that feed anything else (prompt chunks) run the varlen ops on
    `varlen_rows`, with the host lists below (prefix-cache checkpoints included)."""

    groups: list[PositionGroup]
    varlen_rows: torch.Tensor | None = None  # [T'] int64: the other requests' rows, in request order
    varlen_query_lens: list[int] | None = None
    varlen_state_slots: list[int] | None = None
    varlen_has_initial_state: list[bool] | None = None
    varlen_checkpoint_slots: list[int] | None = None  # as AttentionMetadata's, for these requests only
    varlen_checkpoint_offsets: list[int] | None = None


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
