"""The MTP proposer's work for a CUDA-graph step, captured: after the target replays a graph of
(q, batch size) (engine/cuda_graph.py: q = 1 decode, q = 1 + k verify), one graph of the same
key runs the MTP layer over the step's rows, the argmax of its head and the k - 1 chained
passes, and leaves the k drafts of every request in a static buffer. The host reads them once
(speculative/mtp.py: when the next step asks for proposals), instead of once per chained draft,
and the ~dozens of small launches per MTP forward become one replay.

The graph reads the target graph's own static buffers where they already hold what it needs
(the final hidden states of every row, positions, context lengths, block tables, the uniform
query layout) and stages only what differs, from the host, where the step's accepted drafts are
known already (the core applied the acceptance there before calling the proposer):

    first pass, rows i*q .. i*q + q - 1 of request i (the target's padded layout)
        row j <= a_i (its last token and its a_i accepted drafts): the token after that
            position (accepted draft j + 1, or the target's token for j = a_i) and the row's KV
            slot: the MTP KV of every kept position is written, as eagerly
        rows j > a_i (rejected drafts, padding drafts): pad token, slot -1 (no KV write); their
            outputs are computed and never read (a kept row never attends them: causal)
        padding requests: pad token, slot -1, context 0 (the target's layout)
    draft 1 = argmax of the head at row i*q + a_i (`last_rows`, staged: a device-side gather)
    chained pass c = 1 .. k - 1, one row per request, at position start_i + a_i + c, on the
        previous pass's output and draft: KV at that position's slot when the request holds
        one (the scheduler's look-ahead), else slot -1 and context 0; such a draft (and every
        later one of the chain: slots are a prefix of positions) is dropped on the host, as
        the eager chain stops there

Why slot -1 for rejected rows rather than writing their (garbage) MTP KV: the verify step's
rejected positions do hold allocated slots until `Scheduler.release_lookahead` frees them after
this call, but padding drafts past the look-ahead have none, and a write that is never needed
is one that cannot land in a block the request no longer owns. The mask costs nothing: the
accepted counts are host values already.

Graphs are captured after the target's, per (q, batch size) of its ladder, into its memory
pool (the replays never overlap). The attention backend must run one-token rows of any lengths
without host work: FlashInfer's MLA decode plans each replay on the host
(`plans_decode_on_host`), so with it the proposer stays eager. Expert-parallel engines capture no
graphs at all (engine/cuda_graph.py), so their proposer is eager too (its forwards are counted
for the lockstep top-ups: parallel/lockstep.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np
import torch

from dlengine.engine.graph_layout import PAD_TOKEN, GraphChoice
from dlengine.engine.host_arrays import block_table
from dlengine.kernels.context import AttentionMetadata, ForwardContext


@dataclass
class DraftGraphBatch:
    """A graph step's draft inputs in the layout of the module docstring."""

    choice: GraphChoice  # the target's graph (and this one's key)
    next_ids: np.ndarray  # [q * bs] int64: the token after each kept row's position, PAD_TOKEN elsewhere
    slot_mapping: np.ndarray  # [q * bs] int64: the MTP KV slot of each kept row, -1 elsewhere
    last_rows: np.ndarray  # [bs] int64: each request's last kept row (padding requests: their first)
    chain_positions: np.ndarray  # [k - 1, bs] int64: chained pass c's position per request
    chain_slots: np.ndarray  # [k - 1, bs] int64: its KV slot, -1 where the request holds none
    chain_seq_lens: np.ndarray  # [k - 1, bs] int32: its context (0: no slot, or padding)
    num_drafts: np.ndarray  # [n] drafts each request keeps (0: it gained nothing)


def draft_graph_layout(requests: Sequence, starts: Sequence[int], gained: Sequence[Sequence[int] | None],
                       choice: GraphChoice, num_tokens: int, block_size: int, max_model_len: int) -> DraftGraphBatch:
    """Lay out the drafting of a graph step's n requests (the target's padded order).

    starts[i]: request i's num_computed_tokens before the step (its row 0's position); gained[i]:
    the tokens it gained (its a_i accepted drafts, then the target's token), None or empty for a
    request that drafts nothing (it finished meanwhile). Kept rows are the first len(gained[i])."""
    q, bs = choice.query_len, choice.batch_size
    n = len(requests)
    kept = np.fromiter((len(g) if g else 0 for g in gained), dtype=np.int64, count=n)
    if n > bs or (n and kept.max() > q):
        raise ValueError(f"{n} requests keeping up to {int(kept.max(initial=0))} rows do not fit graph {choice}")
    start = np.asarray(starts, dtype=np.int64).reshape(n)
    tables = block_table(requests)
    capacity = np.fromiter((len(r.block_ids) for r in requests), dtype=np.int64, count=n) * block_size

    rows = q * bs
    next_ids = np.full(rows, PAD_TOKEN, dtype=np.int64)
    slots = np.full(rows, -1, dtype=np.int64)
    req, j = np.nonzero(np.arange(q)[None, :] < kept[:, None])  # request-major, like chain() below
    row, pos = req * q + j, start[req] + j
    next_ids[row] = np.fromiter(chain.from_iterable(g for g in gained if g), dtype=np.int64, count=len(row))
    slots[row] = tables[req, pos // block_size].astype(np.int64) * block_size + pos % block_size
    last_rows = np.arange(bs, dtype=np.int64) * q
    last_rows[:n] += np.maximum(kept - 1, 0)

    c = np.arange(1, num_tokens, dtype=np.int64)
    cpos = (start + kept - 1)[:, None] + c[None, :]  # [n, k - 1]
    room = (cpos < capacity[:, None]) & (kept[:, None] > 0)
    chain_positions = np.zeros((num_tokens - 1, bs), dtype=np.int64)
    chain_slots = np.full((num_tokens - 1, bs), -1, dtype=np.int64)
    chain_seq_lens = np.zeros((num_tokens - 1, bs), dtype=np.int32)
    if n and num_tokens > 1:
        # positions without a slot still need an in-range RoPE row (their output is dropped)
        chain_positions[:, :n] = np.clip(cpos, 0, max_model_len - 1).T
        block = np.minimum(cpos // block_size, max(tables.shape[1] - 1, 0))
        table_block = tables[np.arange(n)[:, None], block].astype(np.int64) if tables.shape[1] else 0
        chain_slots[:, :n] = np.where(room, table_block * block_size + cpos % block_size, -1).T
        chain_seq_lens[:, :n] = np.where(room, cpos + 1, 0).T
    num_drafts = np.where(kept > 0, 1 + room.sum(axis=1), 0)
    return DraftGraphBatch(choice, next_ids, slots, last_rows, chain_positions, chain_slots, chain_seq_lens,
                           num_drafts)


class MTPGraphRunner:
    """The MTP drafting of every graph step the target captured, as graphs of the same keys.

    target: the engine's CUDAGraphRunner (captured, keeping hidden states); mtp / embed as the
    proposer's. `run(batch)` stages and replays, returning the drafts on the device."""

    def __init__(self, mtp: torch.nn.Module, embed: torch.nn.Module, target, num_tokens: int) -> None:
        if not target.keep_hidden_states:
            raise ValueError("MTP draft graphs read the target graphs' hidden states: build them with "
                             "keep_hidden_states=True")
        self.mtp, self.embed, self.target = mtp, embed, target
        self.num_tokens = num_tokens
        self.max_model_len = target.max_model_len
        device = target.device
        n, rows, chained = target.max_batch, target.max_batch * target.query_lens[-1], num_tokens - 1
        i64 = dict(dtype=torch.int64, device=device)
        self.next_ids = torch.zeros(rows, **i64)
        self.slot_mapping = torch.full((rows,), -1, **i64)
        self.last_rows = torch.zeros(n, **i64)
        self.chain_positions = torch.zeros(chained, n, **i64)
        self.chain_slots = torch.full((chained, n), -1, **i64)
        self.chain_seq_lens = torch.zeros(chained, n, dtype=torch.int32, device=device)
        self.drafts = torch.zeros(n, num_tokens, **i64)  # the output: k drafts per request
        # pinned host staging; the whole chained buffers are copied (contiguous, a few KiB) so
        # that no copy goes through a pageable temporary. One set suffices: the proposer reads
        # each step's drafts (a sync after this replay) before it stages the next step
        pin = device.type == "cuda"
        self._host_rows = torch.zeros(2, rows, dtype=torch.int64, pin_memory=pin)
        self._host_last = torch.zeros(n, dtype=torch.int64, pin_memory=pin)
        self._host_chain = torch.zeros(2, chained, n, dtype=torch.int64, pin_memory=pin)
        self._host_seq = torch.zeros(chained, n, dtype=torch.int32, pin_memory=pin)
        self._layer_caches = [target.kv_cache.caches_of_layer(i) for i in range(len(target.kv_cache.layers))]
        self.graphs: dict[GraphChoice, torch.cuda.CUDAGraph] = {}
        self.num_replays = {q: 0 for q in target.query_lens}  # per query length (tests check graphs ran)
        self.memory_bytes = 0

    def covers(self, choice: GraphChoice) -> bool:
        """Whether `choice` is a graph of the target's ladder (each has its drafting graph)."""
        return choice.query_len in self.target.query_lens and choice.batch_size in self.target.batch_sizes

    def _context(self, meta: AttentionMetadata) -> ForwardContext:
        return ForwardContext(meta, self.target.kv_cache.layers, self._layer_caches)

    def forward(self, choice: GraphChoice) -> None:
        """What the graph of `choice` captures: static inputs (the target's and this runner's)
        -> `drafts[:bs]` (eager when called outside a capture)."""
        t, q, bs = self.target, choice.query_len, choice.batch_size
        rows = choice.num_rows
        # the target's metadata for this graph, with the MTP layer's own KV slots
        meta = dataclasses.replace(t.metadata(choice), slot_mapping=self.slot_mapping[:rows])
        y = self.mtp(t.positions[:rows], self.embed(self.next_ids[:rows]), t.hidden[:rows], self._context(meta))
        y = y[self.last_rows[:bs]]
        tokens = self.mtp.compute_logits(y).argmax(dim=-1)
        drafts = [tokens]
        for c in range(self.num_tokens - 1):
            meta = AttentionMetadata(
                query_start_loc=t.query_start_loc[1][: bs + 1], seq_lens=self.chain_seq_lens[c, :bs],
                block_tables=t.block_tables[:bs], slot_mapping=self.chain_slots[c, :bs], max_query_len=1,
                max_seq_len=t.max_model_len, query_lens_cpu=[1] * bs, seq_lens_cpu=[t.max_model_len] * bs,
                uniform_query_len=1)
            y = self.mtp(self.chain_positions[c, :bs], self.embed(tokens), y, self._context(meta))
            tokens = self.mtp.compute_logits(y).argmax(dim=-1)
            drafts.append(tokens)
        self.drafts[:bs].copy_(torch.stack(drafts, dim=1))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture a graph per key of the target's, most rows first, in the target's pool (call
        after the target's capture: its hidden-state buffer and pool exist then)."""
        t = self.target
        torch.cuda.synchronize(t.device)
        before = torch.cuda.memory_allocated(t.device)
        # the warm-ups run for real: no KV write anywhere, contexts of plain valid lengths
        self.slot_mapping.fill_(-1)
        self.chain_slots.fill_(-1)
        self.chain_seq_lens.fill_(1)
        try:
            for q in reversed(t.query_lens):
                t.seq_lens.fill_(q)
                for bs in reversed(t.batch_sizes):
                    choice = GraphChoice(q, bs)
                    for _ in range(2):  # Triton compiles and autotunes outside the capture
                        self.forward(choice)
                    torch.cuda.synchronize(t.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=t.pool):
                        self.forward(choice)
                    self.graphs[choice] = graph
        finally:
            t.seq_lens.zero_()
            self.chain_seq_lens.zero_()
        torch.cuda.synchronize(t.device)
        self.memory_bytes = torch.cuda.memory_allocated(t.device) - before

    def stage(self, batch: DraftGraphBatch) -> None:
        """Queue the copies of `batch` into the static inputs (non-blocking from pinned memory)."""
        rows, bs = batch.choice.num_rows, batch.choice.batch_size
        host_rows = self._host_rows.numpy()
        host_rows[0, :rows] = batch.next_ids
        host_rows[1, :rows] = batch.slot_mapping
        self._host_last.numpy()[:bs] = batch.last_rows
        self.next_ids[:rows].copy_(self._host_rows[0, :rows], non_blocking=True)
        self.slot_mapping[:rows].copy_(self._host_rows[1, :rows], non_blocking=True)
        self.last_rows[:bs].copy_(self._host_last[:bs], non_blocking=True)
        if self.num_tokens > 1:
            host_chain = self._host_chain.numpy()
            host_chain[0, :, :bs] = batch.chain_positions
            host_chain[1, :, :bs] = batch.chain_slots
            self._host_seq.numpy()[:, :bs] = batch.chain_seq_lens
            self.chain_positions.copy_(self._host_chain[0], non_blocking=True)
            self.chain_slots.copy_(self._host_chain[1], non_blocking=True)
            self.chain_seq_lens.copy_(self._host_seq, non_blocking=True)

    def replay(self, choice: GraphChoice) -> None:
        graph = self.graphs.get(choice)
        if graph is None:
            raise ValueError(f"no MTP draft graph captured for {choice}")
        graph.replay()

    @torch.inference_mode()
    def run(self, batch: DraftGraphBatch) -> torch.Tensor:
        """Draft for a graph step laid out as `batch`: the drafts [n, k] on the device, a view of
        the static output (valid until the next run; row i keeps its first num_drafts[i])."""
        self.stage(batch)
        self.replay(batch.choice)
        self.num_replays[batch.choice.query_len] += 1
        return self.drafts[: len(batch.num_drafts)]
