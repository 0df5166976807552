"""The host half of CUDA-graph steps: which captured graph a step replays, and the padded layout
of the graph's static inputs. Plain numpy, no CUDA: engine/cuda_graph.py captures and replays,
this module decides and lays out (and is what the CPU tests check).

Graphs are captured per (query length q, batch size): q = 1 for plain decode steps and, with a
speculator, q = 1 + k for verify steps (k = its num_tokens), every request owning exactly q
consecutive rows. A step with n requests replays the smallest captured batch size >= n:

    request i < n   rows i*q .. i*q + q - 1: its last token, its d drafts, then q - 1 - d
                    padding drafts; context seq_len = start + q (its query is the last q
                    positions); real rows write their KV, padding drafts write none (slot -1)
    request i >= n  padding requests: token 0 at position 0, slot -1, context 0 (attends nothing)

A model with recurrent state (Gated DeltaNet, DeepSeek-V4's rings) also stages one state slot and
has_initial_state per request (kernels/context.py); padding requests get PAD_STATE_SLOT, which
every state kernel skips (no slot read or written), and no initial state. In a verify graph its
state layers run the q rows of each request position by position (kernels/context.py
StatePositions): per position a slot (PAD_STATE_SLOT for padding drafts, so they leave the state
as the last real row left it) and a draft snapshot slot (-1: none), laid out by the state rollback
(cache/state_rollback.py).

Short proposals are padded rather than run eagerly: n-gram proposals are often shorter than k or
empty, so a step whose every request drafted exactly k tokens would be rare and verify graphs
would seldom replay. A padding draft is causally after every real row of its request (no real
row attends it), writes no KV, and its logits row is never sampled (`sample_rows` lists the
1 + d real rows of each request), so it can neither be accepted nor change a real token; it only
costs its share of the forward. A step where no request drafts replays the q = 1 graph instead.

Requests with images or videos replay graphs too once their step's tokens are text (decode and
verify steps: generated tokens, or the text after the last image): their M-RoPE positions are
then equal on all three axes, `index + mrope_delta`, which is what the 1-D position
`index + mrope_delta` gives (multimodal/inputs.py `text_rope_offset`); the KV slots keep the
token index. Steps stay eager when a graph cannot express them: prompt chunks, scoring requests
(every row feeds logits), a step row that is an image or video token, more requests than the
largest graph, or more drafts than the largest captured q.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dlengine.engine.host_arrays import block_table
from dlengine.kernels.context import PAD_STATE_SLOT

PAD_TOKEN = 0  # input id of padding rows (any valid id: their outputs are dropped)


@dataclass(frozen=True)
class GraphChoice:
    """The captured graph a step replays."""

    query_len: int  # rows per request: 1 (decode) or 1 + k (verify)
    batch_size: int  # captured batch size >= the step's requests

    @property
    def num_rows(self) -> int:
        return self.query_len * self.batch_size


def padded_size(batch_sizes: Sequence[int], n: int) -> int | None:
    """The smallest captured batch size >= n (None: more than the largest)."""
    for bs in sorted(batch_sizes):
        if bs >= n:
            return bs
    return None


def rope_offset(request, num_rows: int) -> int | None:
    """What to add to the token index of the request's next `num_rows` rows to get their 1-D
    rotary position: 0 for text-only requests, `mrope_delta` for the text rows of a request with
    images or videos, None where a row is an image or video token."""
    mm = getattr(request, "multimodal", None)
    return 0 if mm is None else mm.text_rope_offset(request.num_computed_tokens, num_rows)


def choose_graph(scheduled: Sequence, query_lens: Sequence[int], batch_sizes: Sequence[int]) -> GraphChoice | None:
    """The graph a step replays, or None to run it eagerly.

    scheduled: the step's ScheduledRequests (engine/scheduler.py); query_lens: the captured query
    lengths (1, and 1 + k with verify graphs); batch_sizes: the captured batch sizes."""
    if not scheduled:
        return None
    drafts = 0
    for s in scheduled:
        # one decode token (plus drafts) that samples: a prompt chunk or a scoring request is not
        if not s.sample or s.num_new_tokens != 1 + s.num_spec_tokens:
            return None
        if rope_offset(s.request, s.num_new_tokens) is None:
            return None  # an image or video token: its M-RoPE axes differ
        drafts = max(drafts, s.num_spec_tokens)
    bs = padded_size(batch_sizes, len(scheduled))
    q = next((q for q in sorted(query_lens) if q >= 1 + drafts), None)
    if bs is None or q is None:
        return None
    return GraphChoice(q, bs)


@dataclass
class PaddedBatch:
    """A step's static-buffer contents in the graph layout (module docstring)."""

    choice: GraphChoice  # the graph these rows are laid out for
    input_ids: np.ndarray  # [bs * q] int64
    positions: np.ndarray  # [bs * q] int64
    slot_mapping: np.ndarray  # [bs * q] int64, -1: no KV write
    seq_lens: np.ndarray  # [bs] int64, 0: padding request
    block_tables: np.ndarray  # [n, max blocks of the n requests] int32 (rows of padding requests: none)
    first_rows: np.ndarray  # [n] each request's first row (its last token; a pending placeholder's row)
    sample_rows: np.ndarray  # rows whose logits are sampled: 1 + d per request, in request order
    num_drafts: list[int]  # d per request (real drafts only)
    # models with recurrent state only (None otherwise): per request, PAD_STATE_SLOT / False for padding
    state_slots: np.ndarray | None = None  # [bs] int64
    has_initial_state: np.ndarray | None = None  # [bs] bool
    # ... and in a verify graph (q > 1), per position j and request: the slot row j reads and writes
    # (PAD_STATE_SLOT past the request's 1 + d real rows and for padding requests) and the draft
    # snapshot slot its state is copied to (-1: none); kernels/context.py StatePositions
    position_slots: np.ndarray | None = None  # [q, bs] int64
    snapshot_slots: np.ndarray | None = None  # [q, bs] int64


def padded_layout(requests: Sequence, num_drafts: Sequence[int], choice: GraphChoice, block_size: int,
                  max_model_len: int, with_state: bool = False, state_rollback=None) -> PaddedBatch:
    """Lay out n requests (each decoding its last token and verifying num_drafts[i] drafts, the
    first ones of `request.spec_token_ids`) as `choice.batch_size` requests of
    `choice.query_len` rows.

    Positions of padding drafts continue their request's, clamped below max_model_len (RoPE
    tables are indexed in range); their slots are -1. `with_state`: also lay out each request's
    `state_slot` and whether it resumes it (num_computed_tokens > 0), and for a verify graph the
    per-position slots and draft snapshot slots `state_rollback` (engine/seams.py StateRollback)
    lays out."""
    q, bs = choice.query_len, choice.batch_size
    n = len(requests)
    drafts = np.asarray(num_drafts, dtype=np.int64).reshape(n)
    if n > bs or (n and drafts.max() + 1 > q):
        raise ValueError(f"{n} requests with up to {int(drafts.max(initial=0))} drafts do not fit graph {choice}")
    rows = q * bs
    input_ids = np.full(rows, PAD_TOKEN, dtype=np.int64)
    positions = np.zeros(rows, dtype=np.int64)
    slots = np.full(rows, -1, dtype=np.int64)
    seq_lens = np.zeros(bs, dtype=np.int64)
    start_list = [r.num_computed_tokens for r in requests]
    starts = np.array(start_list, dtype=np.int64).reshape(n)
    first = np.arange(n, dtype=np.int64) * q
    tables = block_table(requests)
    input_ids[first] = [r.all_token_ids[st] for r, st in zip(requests, start_list)]
    for i in np.flatnonzero(drafts):  # requests with drafts only: none in a plain decode step
        d = num_drafts[i]
        input_ids[first[i] + 1: first[i] + 1 + d] = requests[i].spec_token_ids[:d]
    offsets = np.arange(q, dtype=np.int64)
    pos = starts[:, None] + offsets[None, :]  # [n, q] token indices: KV slots and contexts
    # rotary positions: the index, shifted by mrope_delta for requests with images (rope_offset;
    # choose_graph admitted only steps where it is defined); text-only steps pay one scan
    rope_pos = pos
    with_media = [i for i, r in enumerate(requests) if getattr(r, "multimodal", None) is not None]
    if with_media:
        rope_pos = pos.copy()
        for i in with_media:
            rope_pos[i] += rope_offset(requests[i], q) or 0
    positions[: n * q] = np.clip(rope_pos, 0, max_model_len - 1).reshape(-1)
    # real rows (j <= d): KV at the request's slot for position start + j; padding drafts: none
    req, j = np.nonzero(offsets[None, :] <= drafts[:, None])
    p = pos[req, j]
    slots[first[req] + j] = tables[req, p // block_size].astype(np.int64) * block_size + p % block_size
    seq_lens[:n] = starts + q
    batch = PaddedBatch(choice, input_ids, positions, slots, seq_lens, tables, first, first[req] + j, list(num_drafts))
    if with_state:
        batch.state_slots = np.full(bs, PAD_STATE_SLOT, dtype=np.int64)
        batch.state_slots[:n] = [r.state_slot for r in requests]
        batch.has_initial_state = np.zeros(bs, dtype=np.bool_)
        batch.has_initial_state[:n] = starts > 0
        if q > 1:
            if state_rollback is None:
                raise ValueError("a verify graph of a model with recurrent state needs the state rollback's layout "
                                 "of its draft snapshots (padded_layout(..., state_rollback=...))")
            batch.position_slots = np.full((q, bs), PAD_STATE_SLOT, dtype=np.int64)
            batch.snapshot_slots = np.full((q, bs), -1, dtype=np.int64)
            slots, snaps = state_rollback.layout(batch.state_slots[:n], drafts, q)
            batch.position_slots[:, :n] = slots
            batch.snapshot_slots[:, :n] = snaps
    return batch
