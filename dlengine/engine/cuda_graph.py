"""CUDA graphs for decode steps.

A decode step of a small model is hundreds of tiny kernel launches; replaying a captured graph
costs one. Graphs are captured for a ladder of batch sizes (1, 2, 4, 8, then every 8 up to the
largest); a step with n decodes replays the smallest captured size >= n with the extra rows
padded (slot -1: their K/V are not written; context length 0: their attention reads nothing;
their logits are dropped). Steps with prompt tokens, or more decodes than the largest graph, run
eagerly.

Models with recurrent state (cache StateSpec groups: the Gated DeltaNet layers of Qwen3-Next and
Qwen3.5) capture their decode too: the per-row `state_slots` and `has_initial_state` are static
buffers like the others, and a padded row gets PAD_STATE_SLOT (-1), which every state kernel skips
(no slot read or written, zero output: kernels/context.py), so padding never touches a real
sequence's state and no scratch slot is reserved. The GDN decode ops are the conv1d and
recurrent-update kernels (Triton, or the torch references: both capturable); fla-core serves only
prompt steps, which never run from a graph. DeepSeek-V4's window and compressor rings follow the
same rule in its batched decode step (layers/v4_attention.py), whose entry lists take their
width from the static block tables.

Everything a graph reads lives in static buffers filled before each replay; the attention
backend must be capturable (no host syncs, launch sizes from static metadata): the Triton
backend is, the torch reference is not. MLA layers on the Triton backend capture the latent write
(skips slot -1) and one absorbed decode launch (context 0 gives zeros): kernels/mla/mla_triton.py.
Every backend has the hooks of the AttentionBackend protocol for host work around a capture and
before each replay (`prepare_capture` / `end_capture`, `before_replay`; no-ops by default):
FlashInfer's MLA decode re-plans its per-batch-size wrapper there.
"""

from __future__ import annotations

import numpy as np
import torch

from dlengine.kernels.context import PAD_STATE_SLOT, AttentionMetadata, ForwardContext


def default_batch_ladder(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class CUDAGraphRunner:
    def __init__(self, model, kv_cache, backend, max_batch: int, max_model_len: int, device: torch.device,
                 batch_sizes: list[int] | None = None) -> None:
        self.model, self.kv_cache, self.backend, self.device = model, kv_cache, backend, device
        self.block_size = kv_cache.block_size
        self.max_model_len = max_model_len
        self.batch_sizes = sorted(batch_sizes or default_batch_ladder(max_batch))
        self.max_batch = self.batch_sizes[-1]
        self.max_blocks = -(-max_model_len // self.block_size)
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        # recurrent-state layers: each row's state slot and whether it resumes it (None without state)
        self.has_state = kv_cache.num_state_slots > 0
        self.state_slots: torch.Tensor | None = None
        self.has_initial_state: torch.Tensor | None = None
        if self.has_state:
            self.state_slots = torch.full((n,), PAD_STATE_SLOT, dtype=torch.int64, device=device)
            self.has_initial_state = torch.zeros(n, dtype=torch.bool, device=device)
        # host staging (pinned on CUDA) so one copy per buffer moves a step's inputs; rows: input ids,
        # positions, KV slots, context lengths, state slots
        pin = self.device.type == "cuda"
        self._host = torch.zeros(2, 5, n, dtype=torch.int64, pin_memory=pin)
        self._host_flags = torch.zeros(2, n, dtype=torch.bool, pin_memory=pin)
        self._host_tables = torch.zeros(2, n, self.max_blocks, dtype=torch.int32, pin_memory=pin)
        self._flip = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.memory_bytes = 0
        self.num_replays = 0  # steps served from a captured graph (tests check the graphs ran)

    def metadata(self, bs: int) -> AttentionMetadata:
        """The metadata a graph of batch size `bs` reads: views of the static buffers."""
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # the split heuristic must hold for any context
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=[self.max_model_len] * bs,
            # the host copies stay None: they could not follow the slots of later replays
            state_slots=self.state_slots[:bs] if self.has_state else None,
            has_initial_state=self.has_initial_state[:bs] if self.has_state else None,
        )

    def forward_batch(self, bs: int) -> torch.Tensor:
        """The forward each graph captures: logits [bs, vocab] of the static inputs' first bs rows
        (eager when called outside a capture)."""
        # every group's views too: paged extras such as DSA's indexer keys are read in the graph
        layer_caches = [self.kv_cache.caches_of_layer(i) for i in range(len(self.kv_cache.layers))]
        ctx = ForwardContext(self.metadata(bs), self.kv_cache.layers, layer_caches)
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], ctx)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first so smaller graphs reuse its memory pool."""
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        if self.has_state:  # the warm-up forwards run for real: they must touch no state slot
            self.state_slots.fill_(PAD_STATE_SLOT)
            self.has_initial_state.fill_(False)
        for bs in reversed(self.batch_sizes):
            # e.g. FlashInfer's MLA decode sets up this batch size's own planned wrapper
            self.backend.prepare_capture(bs)
            try:
                for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                    self.forward_batch(bs)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.outputs[bs] = self.forward_batch(bs)
            finally:
                self.backend.end_capture()
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        self.seq_lens.zero_()
        self.memory_bytes = torch.cuda.memory_allocated(self.device) - before

    def padded_size(self, n: int) -> int | None:
        for bs in self.batch_sizes:
            if bs >= n:
                return bs
        return None

    def stage(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
              block_tables: list[list[int]], state_slots: np.ndarray | None = None,
              has_initial_state: np.ndarray | None = None) -> int:
        """Fill the static inputs for n decode rows and return the padded batch size they replay at.
        Rows n..bs are padding: token 0 at position 0, context 0 (attends to nothing), KV slot -1
        (no write), state slot PAD_STATE_SLOT (no state read or written). The copies are queued
        on the current stream (non-blocking from pinned memory on CUDA)."""
        n = len(input_ids)
        bs = self.padded_size(n)
        if bs is None:
            raise ValueError(f"{n} decode rows exceed the largest captured batch ({self.max_batch})")
        if self.has_state and (state_slots is None or has_initial_state is None):
            raise ValueError("this model keeps recurrent state: a graph step needs each row's state slot")
        # two staging sets, alternating: the previous step's copies may still be queued when this
        # step fills its buffers (async scheduling), the one before that has surely completed
        self._flip ^= 1
        host_all, flags_all = self._host[self._flip], self._host_flags[self._flip]
        tables_all = self._host_tables[self._flip]
        host = host_all.numpy()
        host[0, :n] = input_ids
        host[1, :n] = positions
        host[2, :n] = slots
        host[3, :n] = seq_lens
        host[:, n:bs] = 0  # padding rows: token 0 at position 0, context 0 (attends to nothing) ...
        host[2, n:bs] = -1  # ... no KV write ...
        host[4, n:bs] = PAD_STATE_SLOT  # ... and no state slot
        width = max(len(t) for t in block_tables)
        tables = tables_all.numpy()
        for i, t in enumerate(block_tables):
            tables[i, : len(t)] = t
        self.input_ids[:bs].copy_(host_all[0, :bs], non_blocking=True)
        self.positions[:bs].copy_(host_all[1, :bs], non_blocking=True)
        self.slot_mapping[:bs].copy_(host_all[2, :bs], non_blocking=True)
        self.seq_lens[:bs].copy_(host_all[3, :bs], non_blocking=True)
        self.block_tables[:n, :width].copy_(tables_all[:n, :width], non_blocking=True)
        if self.has_state:
            host[4, :n] = state_slots
            flags = flags_all.numpy()
            flags[:n] = has_initial_state
            flags[n:bs] = False
            self.state_slots[:bs].copy_(host_all[4, :bs], non_blocking=True)
            self.has_initial_state[:bs].copy_(flags_all[:bs], non_blocking=True)
        return bs

    def replay(self, bs: int) -> torch.Tensor:
        """Launch the graph of batch size `bs` on its staged inputs; its logits [bs, vocab]."""
        self.graphs[bs].replay()
        return self.outputs[bs]

    @torch.inference_mode()
    def run(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
            block_tables: list[list[int]], placeholders=None, last_tokens: torch.Tensor | None = None,
            state_slots: np.ndarray | None = None, has_initial_state: np.ndarray | None = None) -> torch.Tensor:
        """Logits [n, vocab] of n decode tokens by replaying the graph of the padded size.
        `placeholders` = (rows, source rows): inputs still being sampled, taken from `last_tokens`
        on the device. `state_slots` / `has_initial_state`: each row's recurrent-state slot and
        whether it resumes it (models with state only)."""
        n = len(input_ids)
        bs = self.stage(input_ids, positions, slots, seq_lens, block_tables, state_slots=state_slots,
                        has_initial_state=has_initial_state)
        if placeholders is not None:
            rows, src = placeholders
            self.input_ids[rows] = last_tokens[src]
        staged_seq_lens = self._host[self._flip, 3, :bs].numpy()
        self.backend.before_replay(bs, staged_seq_lens, self.block_tables[:bs])  # e.g. FlashInfer's plan
        self.num_replays += 1
        return self.replay(bs)[:n]
