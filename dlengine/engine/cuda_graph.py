"""CUDA graphs for decode and speculative verify steps.

A decode step of a small model is hundreds of tiny kernel launches; replaying a captured graph
costs one. Graphs are captured for a ladder of batch sizes (1, 2, 4, 8, then every 8 up to the
largest) and, per batch size, for each query length: 1 (decode steps) and, in an engine with a
speculator whose drafts are verified in graphs, 1 + k (verify steps: the last token and k drafts
per request). Which graph a step replays and how its rows are padded is engine/graph_layout.py:
the smallest captured batch size >= the step's requests, padding requests with slot -1 (their
K/V are not written) and context 0 (their attention reads nothing), short proposals padded with
drafts that write no KV and are never sampled. Steps with prompt tokens, more requests than the
largest graph, or rows that are image or video tokens run eagerly (the text rows of requests with
images replay graphs, their M-RoPE positions shifted into the 1-D positions: graph_layout.py).

Everything a graph reads lives in static buffers filled before each replay (`stage`), and
everything it produces goes to static output buffers sized for the largest graph: the logits of
every row (float32) and, for a speculator drafting from the target's hidden states (MTP,
`keep_hidden_states`), those hidden states (the LM head's input) of every row. Both are
overwritten by the next replay; the runner samples from them and the MTP proposer reads them
within the same step.

Models with per-sequence state (cache StateSpec groups: the Gated DeltaNet layers of Qwen3-Next
and Qwen3.5, DeepSeek-V4's window and compressor rings) capture their decode too: each request's
`state_slots` and `has_initial_state` are static buffers like the others, and a padding request
gets PAD_STATE_SLOT (-1), which every state kernel skips (no slot read or written, zero output:
kernels/context.py), so padding never touches a real sequence's state and no scratch slot is
reserved. The GDN decode ops are the conv1d and recurrent-update kernels (Triton, or the torch
references: both capturable); fla-core serves only prompt steps, which never run from a graph.
DeepSeek-V4's batched decode step (layers/v4_attention.py) follows the same rule; its entry
lists take their width from the static block tables. A speculating Gated DeltaNet model captures
verify graphs too: their state layers run each request's 1 + k rows position by position through
the one-token ops (kernels/context.py StatePositions), reading per-position slots from a static
[q, batch] buffer (PAD_STATE_SLOT for padding drafts and requests) and copying the state after
each position to the draft snapshot slot staged beside it (-1: none), so the core can roll the
slot back after the replay (cache/state_rollback.py). DeepSeek-V4 never speculates (assemble.py).

The attention backend must be capturable (no host syncs, launch sizes from static metadata): the
Triton backend is, the torch reference is not. Verify graphs need multi-token queries captured
too (`supports_cuda_graph_verify`, kernels/attention/backend.py); on a backend without it verify
steps run eagerly and only decode graphs are captured. MLA layers on the Triton backend capture
the latent write (skips slot -1) and one absorbed launch (context 0 gives zeros), whose rows a
verify graph builds on the device (kernels/mla/mla_triton.py uniform_rows). Every backend has the
hooks of the AttentionBackend protocol for host work around a decode graph's capture and before
its replay (`prepare_capture` / `end_capture`, `before_replay`; no-ops by default): FlashInfer's
MLA decode re-plans its per-batch-size wrapper there. Verify graphs call no hooks.

The runner's steps: `run(batch)` = `stage(batch)` (static inputs), `replay(choice)` (launch the
graph, which runs `forward(choice)` on `metadata(choice)`), then views of the static outputs.
"""

from __future__ import annotations

import torch

from dlengine.engine.graph_layout import GraphChoice, PaddedBatch, padded_size
from dlengine.kernels.context import (PAD_STATE_SLOT, AttentionMetadata, ForwardContext, PositionGroup,
                                      StatePositions)


def default_batch_ladder(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class CUDAGraphRunner:
    """Captured graphs per (query length, batch size) over shared static buffers.

    num_spec_tokens: k > 0 captures verify graphs of 1 + k tokens per request beside the decode
    graphs; keep_hidden_states: the graphs also write the target's final hidden states of every
    row to `hidden` (an MTP speculator reads them). A cache with state slots adds the static
    `state_slots` / `has_initial_state` inputs (None without state)."""

    def __init__(self, model, kv_cache, backend, max_batch: int, max_model_len: int, device: torch.device,
                 batch_sizes: list[int] | None = None, num_spec_tokens: int = 0,
                 keep_hidden_states: bool = False, state_rollback=None) -> None:
        self.model, self.kv_cache, self.backend, self.device = model, kv_cache, backend, device
        self.block_size = kv_cache.block_size
        self.max_model_len = max_model_len
        self.batch_sizes = sorted(batch_sizes or default_batch_ladder(max_batch))
        self.max_batch = self.batch_sizes[-1]
        self.query_lens = (1,) if num_spec_tokens <= 0 else (1, 1 + num_spec_tokens)
        self.keep_hidden_states = keep_hidden_states
        self.has_state = kv_cache.num_state_slots > 0
        if self.has_state and num_spec_tokens > 0 and state_rollback is None:
            raise ValueError("verify graphs for a model with recurrent state need its state rollback "
                             "(cache/state_rollback.py): the state layers snapshot each position for it")
        self.state_rollback = state_rollback
        n, q_max = self.max_batch, self.query_lens[-1]
        rows = n * q_max
        # a request's context may reach q - 1 positions past max_model_len where padding drafts
        # follow its last real token: the table is wide enough for their block lookups too
        self.max_blocks = -(-(max_model_len + q_max - 1) // self.block_size)
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        # uniform layouts: request i owns rows i*q .. i*q + q - 1, whatever the step
        self.query_start_loc = {q: torch.arange(n + 1, dtype=torch.int32, device=device) * q for q in self.query_lens}
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        # recurrent-state layers: each request's state slot and whether it resumes it
        self.state_slots: torch.Tensor | None = None
        self.has_initial_state: torch.Tensor | None = None
        if self.has_state:
            self.state_slots = torch.full((n,), PAD_STATE_SLOT, dtype=torch.int64, device=device)
            self.has_initial_state = torch.zeros(n, dtype=torch.bool, device=device)
        # verify graphs of a model with state: per position j < q and request, the slot its row j
        # reads and writes and the draft snapshot slot its state goes to (kernels/context.py
        # StatePositions); the rows of position j are i * q + j
        self.position_slots: torch.Tensor | None = None
        self.snapshot_slots: torch.Tensor | None = None
        if self.has_state and q_max > 1:
            self.position_slots = torch.full((q_max, n), PAD_STATE_SLOT, dtype=torch.int64, device=device)
            self.snapshot_slots = torch.full((q_max, n), -1, dtype=torch.int64, device=device)
            self._resume_later = torch.ones(n, dtype=torch.bool, device=device)  # rows past the first resume
            self._position_rows = {q: torch.arange(n, dtype=torch.int64, device=device)[None, :] * q
                                   + torch.arange(q, dtype=torch.int64, device=device)[:, None]
                                   for q in self.query_lens if q > 1}
        self.logits: torch.Tensor | None = None  # [rows, vocab] float32, allocated by the first forward
        self.hidden: torch.Tensor | None = None  # [rows, hidden size] when keep_hidden_states
        # host staging (pinned on CUDA) so one copy per buffer moves a step's inputs; rows: input
        # ids, positions, KV slots, context lengths (then state slots and flags per request)
        pin = device.type == "cuda"
        self._host = torch.zeros(2, 4, rows, dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros(2, n, self.max_blocks, dtype=torch.int32, pin_memory=pin)
        self._host_state = torch.zeros(2, n, dtype=torch.int64, pin_memory=pin) if self.has_state else None
        self._host_flags = torch.zeros(2, n, dtype=torch.bool, pin_memory=pin) if self.has_state else None
        self._host_positions = (torch.zeros(2, 2, q_max, n, dtype=torch.int64, pin_memory=pin)
                                if self.position_slots is not None else None)
        self._flip = 0
        self.graphs: dict[GraphChoice, torch.cuda.CUDAGraph] = {}
        self.num_replays = {q: 0 for q in self.query_lens}  # replays per query length (tests check graphs ran)
        self.pool = None
        self.memory_bytes = 0

    @property
    def num_verify_replays(self) -> int:
        """Replays of verify graphs (query length 1 + k) so far."""
        return sum(c for q, c in self.num_replays.items() if q > 1)

    def padded_size(self, n: int) -> int | None:
        """The smallest captured batch size >= n (None: more than the largest)."""
        return padded_size(self.batch_sizes, n)

    def metadata(self, choice: GraphChoice) -> AttentionMetadata:
        """The metadata the graph of `choice` reads: views of the static buffers."""
        q, bs = choice.query_len, choice.batch_size
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[q][: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[: q * bs],
            max_query_len=q,
            max_seq_len=self.max_model_len,  # the split heuristic must hold for any context
            query_lens_cpu=[q] * bs,
            seq_lens_cpu=[self.max_model_len] * bs,
            # the host copies stay None: they could not follow the slots of later replays
            state_slots=self.state_slots[:bs] if self.has_state else None,
            has_initial_state=self.has_initial_state[:bs] if self.has_state else None,
            uniform_query_len=q,
            state_positions=self._state_positions(q, bs) if self.has_state and q > 1 else None,
        )

    def _state_positions(self, q: int, bs: int) -> StatePositions:
        """A verify graph's state rows, position by position, on the static buffers."""
        groups = []
        for j in range(q):
            group = PositionGroup(rows=self._position_rows[q][j, :bs], slots=self.position_slots[j, :bs],
                                  has_initial_state=self.has_initial_state[:bs] if j == 0 else self._resume_later[:bs])
            if j < q - 1:  # the last position is never a snapshot: its state is the slot's own
                group.snapshot_src, group.snapshot_dst = self.position_slots[j, :bs], self.snapshot_slots[j, :bs]
            groups.append(group)
        return StatePositions(groups)

    def forward(self, choice: GraphChoice) -> None:
        """The forward the graph of `choice` captures: its static inputs -> the static outputs'
        first q * bs rows (eager when called outside a capture)."""
        rows = choice.num_rows
        # every group's views too: paged extras such as DSA's indexer keys are read in the graph
        layer_caches = [self.kv_cache.caches_of_layer(i) for i in range(len(self.kv_cache.layers))]
        ctx = ForwardContext(self.metadata(choice), self.kv_cache.layers, layer_caches)
        hidden = self.model(self.input_ids[:rows], self.positions[:rows], ctx)
        logits = self.model.compute_logits(hidden)
        if self.logits is None:  # first call: a warm-up of the largest graph, outside any capture
            total = self.max_batch * self.query_lens[-1]
            self.logits = torch.zeros(total, logits.shape[-1], dtype=torch.float32, device=self.device)
            if self.keep_hidden_states:
                self.hidden = torch.zeros(total, hidden.shape[-1], dtype=hidden.dtype, device=self.device)
        self.logits[:rows].copy_(logits)
        if self.hidden is not None:
            self.hidden[:rows].copy_(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every (query length, batch size), most rows first so later graphs reuse the
        first one's memory pool."""
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.slot_mapping.fill_(-1)
        if self.has_state:  # the warm-up forwards run for real: they must touch no state slot
            self.state_slots.fill_(PAD_STATE_SLOT)
            self.has_initial_state.fill_(False)
            if self.position_slots is not None:
                self.position_slots.fill_(PAD_STATE_SLOT)
                self.snapshot_slots.fill_(-1)
        for q in reversed(self.query_lens):
            self.seq_lens.fill_(q)  # any context >= the query works for the warm-up runs
            for bs in reversed(self.batch_sizes):
                choice = GraphChoice(q, bs)
                decode = q == 1
                if decode:  # e.g. FlashInfer's MLA decode sets up this batch size's own planned wrapper
                    self.backend.prepare_capture(bs)
                try:
                    for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                        self.forward(choice)
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool):
                        self.forward(choice)
                finally:
                    if decode:
                        self.backend.end_capture()
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[choice] = graph
        torch.cuda.synchronize(self.device)
        self.seq_lens.zero_()
        self.memory_bytes = torch.cuda.memory_allocated(self.device) - before

    def stage(self, batch: PaddedBatch, placeholders=None, last_tokens: torch.Tensor | None = None) -> None:
        """Fill the static inputs of `batch.choice`'s graph with a step laid out as `batch`
        (engine/graph_layout.py: padding rows and requests included). The copies are queued on
        the current stream (non-blocking from pinned memory on CUDA). `placeholders` = (rows,
        source rows): inputs still being sampled, taken from `last_tokens` on the device."""
        choice = batch.choice
        q, bs = choice.query_len, choice.batch_size
        rows, n = choice.num_rows, len(batch.first_rows)
        if bs > self.max_batch:
            raise ValueError(f"{n} requests in a batch of {bs} exceed the largest captured batch ({self.max_batch})")
        if q not in self.query_lens or bs not in self.batch_sizes:
            raise ValueError(f"no graph captured for {choice}: query lengths {self.query_lens}, "
                             f"batch sizes {self.batch_sizes}")
        if self.has_state and batch.state_slots is None:
            raise ValueError("this model keeps recurrent state: a graph step needs each request's state slot "
                             "(padded_layout(..., with_state=True))")
        # two staging sets, alternating: the previous step's copies may still be queued when this
        # step fills its buffers (async scheduling), the one before that has surely completed
        self._flip ^= 1
        host_all, tables_all = self._host[self._flip], self._host_tables[self._flip]
        host = host_all.numpy()
        host[0, :rows] = batch.input_ids
        host[1, :rows] = batch.positions
        host[2, :rows] = batch.slot_mapping
        host[3, :bs] = batch.seq_lens
        width = batch.block_tables.shape[1]
        tables_all.numpy()[:n, :width] = batch.block_tables
        self.input_ids[:rows].copy_(host_all[0, :rows], non_blocking=True)
        self.positions[:rows].copy_(host_all[1, :rows], non_blocking=True)
        self.slot_mapping[:rows].copy_(host_all[2, :rows], non_blocking=True)
        self.seq_lens[:bs].copy_(host_all[3, :bs], non_blocking=True)
        # rows of padding requests keep stale (valid) block ids: with context 0 they read nothing
        self.block_tables[:n, :width].copy_(tables_all[:n, :width], non_blocking=True)
        if self.has_state:
            state_host, flags_host = self._host_state[self._flip], self._host_flags[self._flip]
            state_host.numpy()[:bs] = batch.state_slots
            flags_host.numpy()[:bs] = batch.has_initial_state
            self.state_slots[:bs].copy_(state_host[:bs], non_blocking=True)
            self.has_initial_state[:bs].copy_(flags_host[:bs], non_blocking=True)
        if self.has_state and q > 1:
            if batch.position_slots is None:
                raise ValueError("a verify graph step of a model with recurrent state needs its per-position state "
                                 "slots (padded_layout(..., state_rollback=...))")
            pos_host = self._host_positions[self._flip]
            pos_host.numpy()[0, :q, :bs] = batch.position_slots
            pos_host.numpy()[1, :q, :bs] = batch.snapshot_slots
            self.position_slots[:q, :bs].copy_(pos_host[0, :q, :bs], non_blocking=True)
            self.snapshot_slots[:q, :bs].copy_(pos_host[1, :q, :bs], non_blocking=True)
        if placeholders is not None:
            dst, src = placeholders
            self.input_ids[dst] = last_tokens[src]

    def replay(self, choice: GraphChoice) -> None:
        """Launch the graph of `choice` on its staged inputs (outputs: `logits`, `hidden`)."""
        self.graphs[choice].replay()

    @torch.inference_mode()
    def run(self, batch: PaddedBatch, placeholders=None,
            last_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay the graph of `batch.choice` on a step laid out as `batch` (engine/graph_layout.py).
        Returns views of the static outputs: logits [q * bs, vocab] float32 and the hidden states
        [q * bs, hidden] (None without keep_hidden_states), valid until the next replay."""
        choice = batch.choice
        self.stage(batch, placeholders=placeholders, last_tokens=last_tokens)
        if choice.query_len == 1:  # e.g. FlashInfer's plan
            self.backend.before_replay(choice.batch_size, batch.seq_lens, self.block_tables[: choice.batch_size])
        self.replay(choice)
        self.num_replays[choice.query_len] += 1
        rows = choice.num_rows
        return self.logits[:rows], (self.hidden[:rows] if self.hidden is not None else None)
