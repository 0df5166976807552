"""ModelRunner: scheduler output -> flattened tensors -> forward -> logits -> sampled tokens.

The batch is "varlen": every scheduled request contributes `num_new_tokens` consecutive tokens to
one flat token dimension, with no padding. Host-side arrays are built with numpy, then copied
once to the device (pinned + non_blocking on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dlengine.cache.kv_cache import KVCache
from dlengine.engine.graph_layout import GraphChoice, choose_graph, padded_layout
from dlengine.engine.host_arrays import block_table
from dlengine.engine.request import Request
from dlengine.engine.sampler import Sampler, SamplerOutput, SamplingTensors
from dlengine.engine.scheduler import SchedulerOutput
from dlengine.engine.seams import AcceptancePolicy, StateRollback
from dlengine.kernels.attention.backend import AttentionBackend
from dlengine.kernels.context import (AttentionMetadata, ForwardContext, MultimodalSegment, PositionGroup,
                                      StatePositions)
from dlengine.kernels.selection import Kernels
from dlengine.speculative.acceptance import ExactMatchAcceptance


@dataclass
class StepHiddenStates:
    """The target's final hidden states of one step (what the LM head reads), every position of
    every scheduled request, for a speculator that drafts from them (`needs_hidden_states`: the
    MTP proposer). Rows of request i are query_start_loc[i]:query_start_loc[i + 1], at positions
    starts[i], starts[i] + 1, ...; the cache views let the speculator run its own layers on the
    same paged cache (its layers have their own indices there). After a CUDA-graph step `hidden`
    is a view of the graph's static output (valid until the next step) in the padded layout:
    request i owns 1 + k rows, its last token's then its drafts' then padding drafts', and
    num_spec[i] = k counts them all (engine/graph_layout.py), and `graph` names the graph that ran
    (a speculator with graphs of its own replays the matching one: speculative/mtp_graphs.py)."""

    hidden: torch.Tensor  # [T, hidden_size]
    requests: list[Request]
    starts: list[int]  # each request's num_computed_tokens before the step
    query_start_loc: list[int]  # [B + 1]
    num_spec: list[int]  # draft rows of each request (its last num_spec inputs: drafts, padding drafts)
    sample: list[bool]  # whether each request sampled a token
    kv_caches: list  # KVCache.layers
    layer_caches: list  # KVCache.caches_of_layer(i) for every layer
    graph: GraphChoice | None = None  # the CUDA graph the step replayed (None: an eager step)


@dataclass
class StepHandle:
    """A launched step. With async scheduling the core schedules and prepares the next step
    before asking for `accepted_tokens()`, which waits only for this step's sampled tokens
    (copied to pinned host memory behind an event), not for work queued after it.

    `sampled` lists the requests that sample this step; `num_drafts[i]` is how many draft tokens
    request i verified (its rows in the sampler output are 1 + num_drafts[i] consecutive ones).
    `scores` holds (request, logits) of scoring requests."""

    sampled: list[Request]
    sampler_out: SamplerOutput | None = None
    host_tokens: torch.Tensor | None = None
    event: "torch.cuda.Event | None" = None
    num_drafts: list[int] = field(default_factory=list)
    scores: list[tuple[Request, torch.Tensor]] = field(default_factory=list)
    hidden_states: StepHiddenStates | None = None  # when the runner keeps them (keep_hidden_states)
    # the accept decision of verification (engine/seams.py AcceptancePolicy)
    acceptance: AcceptancePolicy = field(default_factory=ExactMatchAcceptance, repr=False)
    _accepted: list[list[int]] | None = field(default=None, repr=False)  # accepted_tokens(), computed once

    def token_ids(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host_tokens.tolist() if self.host_tokens is not None else []

    def accepted_tokens(self) -> list[list[int]]:
        """Per sampled request, the tokens it gains: its one sampled token, or, after drafts,
        the accepted drafts (as `acceptance` decides: by default those equal to the target's
        samples) followed by the target's token at the first rejected position (or after the
        last draft). Computed once per step (the core and the speculator both ask)."""
        if self._accepted is None:
            self._accepted = self._accept()
        return self._accepted

    def _accept(self) -> list[list[int]]:
        tokens = self.token_ids()
        if not any(self.num_drafts):
            return [[t] for t in tokens]
        out, row = [], 0
        for req, k in zip(self.sampled, self.num_drafts):
            target = tokens[row : row + 1 + k]
            accepted = self.acceptance.num_accepted(req.spec_token_ids[:k], target)
            out.append(target[: accepted + 1])
            row += 1 + k
        return out

    def logprob_rows(self) -> list[dict[int, float] | None] | None:
        """Per sampled request, {token: logprob} of its sampled token and its top-n (requests
        that asked for logprobs never verify drafts, so they own one row each)."""
        out = self.sampler_out
        if out is None or out.sampled_logprobs is None:
            return None
        sampled = out.sampled_logprobs.tolist()
        tok = out.token_ids.tolist()
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        rows: list[dict[int, float] | None] = []
        row = 0
        for r, k in zip(self.sampled, self.num_drafts or [0] * len(self.sampled)):
            n = r.params.logprobs
            if n is None:
                rows.append(None)
            else:
                d = {tok[row]: sampled[row]}
                if top_ids is not None and n > 0:
                    d.update(zip(top_ids[row][:n], top_lp[row][:n]))
                rows.append(d)
            row += 1 + k
        return rows


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states to turn into logits
    sampled_requests: list[Request]
    num_drafts: list[int] = field(default_factory=list)  # per sampled request
    # scoring requests and how many logits rows each owns (after the sampled requests' rows)
    scored: list[tuple[Request, int]] = field(default_factory=list)
    multimodal: list[MultimodalSegment] = field(default_factory=list)  # requests with images
    # (from slot, to slot) state copies after the forward: prefix-cache checkpoints at the end of a step
    state_saves_after: list[tuple[int, int]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: KVCache, backend: AttentionBackend, sampler: Sampler,
                 vocab_size: int, device: torch.device, graph_runner=None, kernels: Kernels | None = None,
                 keep_hidden_states: bool = False, acceptance: AcceptancePolicy | None = None,
                 state_rollback: StateRollback | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.kernels = kernels  # what the model was built with (kernels/selection.py), for describe()
        self.sampler = sampler
        self.vocab_size = vocab_size
        self.device = device
        self.block_size = kv_cache.block_size
        # a CUDAGraphRunner when CUDA graphs are on (built with keep_hidden_states when this runner is)
        self.graph_runner = graph_runner
        # a speculator drafting from the target's hidden states asks for them (MTP)
        self.keep_hidden_states = keep_hidden_states
        self.acceptance = acceptance or ExactMatchAcceptance()  # which verified drafts a request keeps
        self.num_graph_steps = 0  # steps that replayed a graph (decode or verify)
        self._last_token_ids: torch.Tensor | None = None  # device: tokens sampled by the last step
        # every cache view of every layer (recurrent layers find their state slots here)
        self.layer_caches = [kv_cache.caches_of_layer(i) for i in range(len(kv_cache.layers))]
        self.has_state = kv_cache.num_state_slots > 0
        # a model with recurrent state that speculates: how steps with drafts lay out its state
        # rows and snapshots (cache/state_rollback.py; the core rolls back with the same object)
        self.state_rollback = state_rollback

    def _placeholder_sources(self, reqs: list[Request], token_index: np.ndarray):
        """(flat token indices, rows of the last step's tokens) for inputs that are placeholders."""
        pending = [(i, r.pending_row) for i, r in enumerate(reqs) if r.pending_row is not None]
        if not pending:
            return None
        if self._last_token_ids is None:
            raise RuntimeError("a placeholder token has no in-flight step to come from")
        rows = np.array([p[0] for p in pending], dtype=np.int64)
        src = np.array([p[1] for p in pending], dtype=np.int64)
        return self._to_device(token_index[rows]), self._to_device(src)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def prepare_inputs(self, out: SchedulerOutput) -> ModelInputs:
        """Flatten the scheduled requests into one batch. Logits rows: the last position of each
        request that samples (the last 1 + k positions when it verifies k drafts), then every
        position of each scoring request.

        Per-request work is a few list comprehensions; the arrays are built with vectorised
        numpy, since this runs on the host every step for hundreds of requests."""
        bs = self.block_size
        sched = out.scheduled
        reqs = [s.request for s in sched]
        num_seqs = len(reqs)
        query_lens = [s.num_new_tokens for s in sched]
        starts = [r.num_computed_tokens for r in reqs]
        seq_lens = [st + ql for st, ql in zip(starts, query_lens)]
        ql = np.array(query_lens, dtype=np.int64)
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(ql, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])

        if num_tokens == num_seqs:
            # a decode step (one token per request, no drafts): request i's input is its token
            # at position starts[i], on row i
            input_ids = np.array([r.all_token_ids[st] for r, st in zip(reqs, starts)], dtype=np.int64)
            positions = np.array(starts, dtype=np.int64)
            token_row = np.arange(num_seqs)
        else:
            ids: list[int] = []
            for s, r, st, n in zip(sched, reqs, starts, query_lens):
                if s.num_spec_tokens:
                    ids.append(r.all_token_ids[st])
                    ids.extend(r.spec_token_ids)
                elif n == 1:
                    ids.append(r.all_token_ids[st])
                else:
                    ids.extend(r.all_token_ids[st : st + n])
            input_ids = np.array(ids, dtype=np.int64)
            token_row = np.repeat(np.arange(num_seqs), ql)
            positions = (np.arange(num_tokens, dtype=np.int64)
                         + np.repeat(np.array(starts, dtype=np.int64) - query_start_loc[:-1], ql))
        # a request's pending token is always its last one: its flat index ends its row
        placeholders = self._placeholder_sources(reqs, query_start_loc[1:] - 1)
        block_tables = block_table(reqs)
        slot_mapping = block_tables[token_row, positions // bs].astype(np.int64) * bs + positions % bs

        ends = query_start_loc[1:]
        rows = [i for i, s in enumerate(sched) if s.sample]
        num_drafts = [sched[i].num_spec_tokens for i in rows]
        if any(num_drafts):
            logits_indices = np.concatenate([np.arange(ends[i] - 1 - k, ends[i]) for i, k in zip(rows, num_drafts)])
        else:
            logits_indices = ends[rows] - 1
        scored = [(r, n) for r, n in zip(reqs, query_lens) if r.score_only]
        if scored:
            spans = [np.arange(ends[i] - n, ends[i]) for i, (r, n) in enumerate(zip(reqs, query_lens)) if r.score_only]
            logits_indices = np.concatenate([logits_indices.astype(np.int64)] + spans)
        meta = AttentionMetadata(
            query_start_loc=self._to_device(query_start_loc.astype(np.int32)),
            seq_lens=self._to_device(np.array(seq_lens, dtype=np.int32)),
            block_tables=self._to_device(block_tables),
            slot_mapping=self._to_device(slot_mapping),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        if self.has_state:
            # a request resumes its saved state unless this is its first step (preemption frees
            # the slot and recomputes from token 0, so it starts fresh again)
            meta.state_slots_cpu = [r.state_slot for r in reqs]
            meta.has_initial_state_cpu = [st > 0 for st in starts]
            meta.state_slots = self._to_device(np.array(meta.state_slots_cpu, dtype=np.int64))
            meta.has_initial_state = self._to_device(np.array(meta.has_initial_state_cpu, dtype=np.bool_))
            ckpt_slots, ckpt_offsets, saves_after = self._state_checkpoints(reqs, starts, query_lens)
            if any(s >= 0 for s in ckpt_slots):
                meta.state_checkpoint_slots_cpu, meta.state_checkpoint_offsets_cpu = ckpt_slots, ckpt_offsets
            if any(s.num_spec_tokens for s in sched):
                meta.state_positions = self._state_positions(sched, starts, query_start_loc, ckpt_slots,
                                                             ckpt_offsets)
        else:
            saves_after = []
        # requests with images: the model reads their image embeddings and M-RoPE positions
        multimodal = [MultimodalSegment(int(query_start_loc[i]), starts[i], query_lens[i], r.multimodal)
                      for i, r in enumerate(reqs) if r.multimodal is not None]
        input_ids_dev = self._to_device(input_ids)
        if placeholders is not None:
            dst, src = placeholders
            input_ids_dev[dst] = self._last_token_ids[src]
        return ModelInputs(
            input_ids=input_ids_dev,
            positions=self._to_device(positions),
            meta=meta,
            logits_indices=self._to_device(np.ascontiguousarray(logits_indices, dtype=np.int64)),
            sampled_requests=[reqs[i] for i in rows],
            num_drafts=num_drafts,
            scored=scored,
            state_saves_after=saves_after,
            multimodal=multimodal,
        )

    def _state_checkpoints(self, reqs: list[Request], starts: list[int], query_lens: list[int]
                           ) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Prefix caching of recurrent states (cache/block_manager.py): restore the slot of a
        request that resumes a cached prefix from its checkpoint now (before the forward, in
        stream order). Returns, per request, the checkpoint slot (-1: none) and offset the kernels
        save inside this step, and the (slot, checkpoint) copies for checkpoints at the end of a
        step. A one-token step never has one inside (a boundary lies strictly inside a step)."""
        ckpt_slots, ckpt_offsets, after = [], [], []
        for r, st, n in zip(reqs, starts, query_lens):
            restore = getattr(r, "state_restore", None)
            if restore is not None and restore[1] == st:
                self._copy_state(restore[0], r.state_slot)
            planned = getattr(r, "state_checkpoint", None)
            slot, offset = -1, 0
            if planned is not None and planned[0] >= 0 and st < planned[1] <= st + n:
                if planned[1] < st + n:
                    slot, offset = planned[0], planned[1] - st
                else:
                    after.append((r.state_slot, planned[0]))
            ckpt_slots.append(slot)
            ckpt_offsets.append(offset)
        return ckpt_slots, ckpt_offsets, after

    def _state_positions(self, sched, starts: list[int], query_start_loc: np.ndarray, ckpt_slots: list[int],
                         ckpt_offsets: list[int]) -> StatePositions:
        """A step with drafts, for the recurrent-state layers (kernels/context.py StatePositions):
        the requests feeding one token and its drafts (plain decodes too) run position by position
        with snapshots for the rollback; the others (prompt chunks) run the varlen ops on their rows."""
        if self.state_rollback is None:
            raise RuntimeError("a step verifies drafts of a model with recurrent state, but the runner has no "
                               "state rollback (engine/seams.py StateRollback) to lay its rows out")
        by_pos = [i for i, s in enumerate(sched) if s.num_new_tokens == 1 + s.num_spec_tokens]
        varlen = [i for i, s in enumerate(sched) if s.num_new_tokens != 1 + s.num_spec_tokens]
        drafts = np.array([sched[i].num_spec_tokens for i in by_pos], dtype=np.int64)
        width = 1 + int(drafts.max())
        slots, snaps = self.state_rollback.layout([sched[i].request.state_slot for i in by_pos], drafts, width)
        first = query_start_loc[by_pos]
        resume0 = np.array([starts[i] > 0 for i in by_pos], dtype=np.bool_)
        # every index array of the step, then one host-to-device copy per dtype (sliced on the device)
        ints: list[np.ndarray] = []
        flags: list[np.ndarray] = []
        layout = []
        for j in range(width):
            live = np.flatnonzero(drafts >= j)  # requests with a row at position j
            kept = np.flatnonzero(drafts > j)  # ... whose state after it may be rolled back to
            ints += [first[live] + j, slots[j, live]]
            flags.append(resume0[live] if j == 0 else np.ones(len(live), dtype=np.bool_))
            if len(kept):
                ints += [slots[j, kept], snaps[j, kept]]
            layout.append(bool(len(kept)))
        if varlen:
            ints.append(np.concatenate([np.arange(query_start_loc[i], query_start_loc[i + 1]) for i in varlen]))
        int_views = iter(self._to_device_parts(ints, np.int64))
        flag_views = iter(self._to_device_parts(flags, np.bool_))
        groups = []
        for has_snapshots in layout:
            group = PositionGroup(rows=next(int_views), slots=next(int_views), has_initial_state=next(flag_views))
            if has_snapshots:
                group.snapshot_src, group.snapshot_dst = next(int_views), next(int_views)
            groups.append(group)
        plan = StatePositions(groups)
        if varlen:
            plan.varlen_rows = next(int_views)
            plan.varlen_query_lens = [sched[i].num_new_tokens for i in varlen]
            plan.varlen_state_slots = [sched[i].request.state_slot for i in varlen]
            plan.varlen_has_initial_state = [starts[i] > 0 for i in varlen]
            if any(ckpt_slots[i] >= 0 for i in varlen):
                plan.varlen_checkpoint_slots = [ckpt_slots[i] for i in varlen]
                plan.varlen_checkpoint_offsets = [ckpt_offsets[i] for i in varlen]
        return plan

    def _to_device_parts(self, parts: list[np.ndarray], dtype) -> list[torch.Tensor]:
        """The arrays on the device, copied as one buffer and split into views."""
        sizes = [len(p) for p in parts]
        flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
        return list(self._to_device(np.ascontiguousarray(flat)).split(sizes))

    def _copy_state(self, src: int, dst: int) -> None:
        for g in self.kv_cache.state_groups:
            g.storage[dst].copy_(g.storage[src])

    @torch.inference_mode()
    def compute_logits(self, inputs: ModelInputs) -> torch.Tensor:
        return self._forward(inputs)[0]

    def _forward(self, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the logits rows, hidden states of every row)."""
        ctx = ForwardContext(inputs.meta, self.kv_cache.layers, self.layer_caches, inputs.multimodal)
        hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        for src, dst in inputs.state_saves_after:
            self._copy_state(src, dst)
        return self.model.compute_logits(hidden[inputs.logits_indices]).float(), hidden

    def _hidden_states(self, out: SchedulerOutput, hidden: torch.Tensor) -> StepHiddenStates:
        reqs = [s.request for s in out.scheduled]
        qsl = [0]
        for s in out.scheduled:
            qsl.append(qsl[-1] + s.num_new_tokens)
        return StepHiddenStates(hidden, reqs, [r.num_computed_tokens for r in reqs], qsl,
                                [s.num_spec_tokens for s in out.scheduled], [s.sample for s in out.scheduled],
                                self.kv_cache.layers, self.layer_caches)

    def _graph_step(self, out: SchedulerOutput):
        """Replay a captured graph when the step is one (engine/graph_layout.py choose_graph):
        (sampled requests, their logits rows, drafts per request, hidden states or None), or None
        to run the step eagerly."""
        g = self.graph_runner
        if g is None:
            return None
        choice = choose_graph(out.scheduled, g.query_lens, g.batch_sizes)
        if choice is None:
            return None
        reqs = [s.request for s in out.scheduled]
        num_drafts = [s.num_spec_tokens for s in out.scheduled]
        batch = padded_layout(reqs, num_drafts, choice, self.block_size, g.max_model_len, with_state=self.has_state,
                              state_rollback=self.state_rollback)
        saves_after = []
        if self.has_state:
            # the restores of prefix-cache hits happen here, before the replay (stream order). A
            # graph step feeds one token per request (and drafts, which come after the prompt): no
            # checkpoint falls inside it, only (rarely) one at the end of the one token
            _, _, saves_after = self._state_checkpoints(reqs, [r.num_computed_tokens for r in reqs],
                                                        [1 + d for d in num_drafts])
        placeholders = self._placeholder_sources(reqs, batch.first_rows)
        logits, hidden = g.run(batch, placeholders=placeholders, last_tokens=self._last_token_ids)
        for src, dst in saves_after:
            self._copy_state(src, dst)
        self.num_graph_steps += 1
        n = len(reqs)
        if len(batch.sample_rows) != n * choice.query_len:  # padding rows (drafts or requests) are never sampled
            logits = logits[self._to_device(batch.sample_rows)]
        else:
            logits = logits[: n * choice.query_len]
        step_hidden = None
        if self.keep_hidden_states:
            q = choice.query_len
            step_hidden = StepHiddenStates(hidden, reqs, [r.num_computed_tokens for r in reqs],
                                           [i * q for i in range(n + 1)], [q - 1] * n, [True] * n,
                                           self.kv_cache.layers, self.layer_caches, graph=choice)
        return reqs, logits, num_drafts, step_hidden

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepHandle:
        """Launch one step without waiting for it. The handle lists the requests that sample a
        token (requests in the middle of a chunked prompt sample nothing) and yields their tokens;
        rows of `handle.sampler_out` are in the same order (1 + k rows for a request verifying k
        drafts)."""
        graphed = self._graph_step(out)
        scores: list[tuple[Request, torch.Tensor]] = []
        step_hidden = None
        if graphed is not None:
            sampled, logits, num_drafts, step_hidden = graphed
        else:
            inputs = self.prepare_inputs(out)
            logits, hidden = self._forward(inputs)
            if self.keep_hidden_states:
                step_hidden = self._hidden_states(out, hidden)
            sampled, num_drafts = inputs.sampled_requests, inputs.num_drafts
            row = sum(1 + k for k in num_drafts)
            for req, n in inputs.scored:
                scores.append((req, logits[row : row + n]))
                row += n
            logits = logits[: sum(1 + k for k in num_drafts)]
        if not sampled:
            return StepHandle([], scores=scores, hidden_states=step_hidden)
        # a request verifying k drafts samples k + 1 rows, each with its own settings and noise
        rows = [r for r, k in zip(sampled, num_drafts) for _ in range(1 + k)] if any(num_drafts) else sampled
        tensors = SamplingTensors.from_requests(rows, self.vocab_size, self.device)
        sampler_out = self.sampler(logits, tensors)
        self._last_token_ids = sampler_out.token_ids
        handle = StepHandle(sampled, sampler_out, num_drafts=num_drafts, scores=scores, hidden_states=step_hidden,
                            acceptance=self.acceptance)
        if self.device.type == "cuda":
            handle.host_tokens = torch.empty(len(rows), dtype=torch.int64, pin_memory=True)
            handle.host_tokens.copy_(sampler_out.token_ids, non_blocking=True)
            handle.event = torch.cuda.Event()
            handle.event.record()
        else:
            handle.host_tokens = sampler_out.token_ids
        return handle

    def release(self) -> None:
        """Drop the graphs and the model (Engine.close)."""
        self.graph_runner = None
        self.model = None
