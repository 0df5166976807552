"""DeepSeek-V4 attention (docs/deepseek_v4.md): shared-KV MQA over a sliding window, plus, in
CSA / HCA layers, compressed entries (one per `compress_rate` tokens) chosen by a lightning indexer
(CSA) or all of them (HCA); one softmax with a per-head sink; grouped output projection.

Module and parameter names are the released checkpoint's (`attn.wq_a`, `attn.compressor.ape`, ...).

Cache (dlengine/cache/v4_specs.py), per running request:
- state group `V4_STATE[kind]`, slot `request.state_slot`: `window_kv` [window, head_dim], the ring
  of the last `window` K=V vectors at row position % window; per compressor `<name>_kv` /
  `<name>_gate` [R, P], the ring of the last R projections (R = m, or 2m with overlap), read to
  finish a window that started in an earlier step (shapes: deepseek_v4._compressor_rings);
- paged groups `<name>` (CompressedKVSpec): entry w at block_table[w*m // block_size], row
  (w*m % block_size) // m.
A step reads every ring before writing it, so one step may span many windows (chunked prefill).

Two paths. A step with prompt tokens (any number of tokens per request) feeds the compressors
and the indexer one request at a time on the host (`request_slices`, `Compressor.update`,
`indexer_topk_ids`), then runs one attention call for the whole step (`ops.v4_prefill_attention`:
Triton on CUDA, kernels/v4/prefill_triton.py; else the per-request torch reference). A pure
decode step (one token each) runs batched on the device (`Compressor.decode_update`,
kernels/v4/batched_decode.py): fixed widths from the block tables, no host sync, padded rows
(state slot < 0) writing nothing, so the CUDA graph runner captures it (engine/cuda_graph.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlengine.config import RopeConfig
from dlengine.kernels.context import ForwardContext
from dlengine.kernels.selection import current_kernels
from dlengine.kernels.v4.batched_decode import (finished_entry_ids, masked_index_put, pool_last_window, ring_before,
                                                top_entry_ids)
from dlengine.kernels.v4.reference import indexer_topk_ids, interleaved_rope, pool_windows
from dlengine.models.layers.linear import Linear, default_weight_loader
from dlengine.models.layers.norm import RMSNorm
from dlengine.models.layers.parallel_linear import ColumnParallelLinear, RowParallelLinear, divide
from dlengine.models.layers.rotary import rope_inv_freq
from dlengine.parallel.state import get_parallel_state

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
V4_STATE = {SLIDING: "v4_sliding_state", CSA: "v4_csa_state", HCA: "v4_hca_state"}


def float32_param(*shape: int) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(*shape, dtype=torch.float32), requires_grad=False)
    p.weight_loader = default_weight_loader
    return p


class InterleavedRope(nn.Module):
    """cos / sin of one RoPE configuration for every position, applied to the last `dim` dims."""

    def __init__(self, dim: int, max_position: int, rope: RopeConfig) -> None:
        super().__init__()
        inv_freq, scale = rope_inv_freq(rope, dim)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_cached", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin_cached", freqs.sin() * scale, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        cos, sin = self.cos_cached[positions].to(x.dtype), self.sin_cached[positions].to(x.dtype)
        return interleaved_rope(x, cos, -sin if inverse else sin)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


@dataclass(frozen=True)
class StepSlice:
    """One request's part of the flattened batch: tokens [start, start + n) at positions
    [first_pos, first_pos + n), its state slot and block table row."""

    start: int
    n: int
    first_pos: int
    slot: int
    block_table: torch.Tensor


def request_slices(ctx: ForwardContext) -> list[StepSlice]:
    meta = ctx.meta
    qsl = meta.query_start_loc.tolist()
    return [StepSlice(qsl[i], n, seq - n, meta.state_slots_cpu[i], meta.block_tables[i])
            for i, (n, seq) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu))]


def ring_rows(lo: int, hi: int, size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(lo, hi, device=device) % size


@dataclass
class CompressStep:
    """One step's compressor projections (CSA / HCA layers) and, for CSA, the indexer's inputs."""

    kv: torch.Tensor
    gate: torch.Tensor
    paged: torch.Tensor  # this layer's compressed entries
    block_size: int
    idx_kv: torch.Tensor | None = None
    idx_gate: torch.Tensor | None = None
    idx_q: torch.Tensor | None = None  # [T, index heads, index_head_dim], RoPE'd
    idx_w: torch.Tensor | None = None  # [T, index heads]
    idx_paged: torch.Tensor | None = None  # the indexer's compressed keys


class Compressor(nn.Module):
    """Pools every `compress_rate` tokens' projections into one entry (`wkv`, `wgate`, `ape`,
    `norm`), RoPE'd at the window's first position; `overlap` for CSA and the indexer."""

    def __init__(self, hidden: int, dim: int, compress_rate: int, overlap: bool, eps: float, rope: InterleavedRope,
                 cache_name: str) -> None:
        super().__init__()
        width = 2 * dim if overlap else dim
        self.dim, self.m, self.overlap, self.width = dim, compress_rate, overlap, width
        self.ring = 2 * compress_rate if overlap else compress_rate
        self.wkv = Linear(hidden, width)
        self.wgate = Linear(hidden, width)
        self.ape = float32_param(compress_rate, width)
        self.norm = RMSNorm(dim, eps)
        self.rope = rope
        self.cache_name = cache_name

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.wkv(x), self.wgate(x)

    def gather(self, r: StepSlice, paged: torch.Tensor, block_size: int, count: int) -> torch.Tensor:
        """The request's first `count` entries [count, dim] from the paged cache."""
        tok = torch.arange(count, device=paged.device) * self.m
        return paged[r.block_table[tok // block_size].long(), (tok % block_size) // self.m]

    def update(self, kv: torch.Tensor, gate: torch.Tensor, r: StepSlice, state: dict, paged: torch.Tensor,
               block_size: int) -> int:
        """Consume one request's new projections (kv, gate [n, P]); write the entries of windows
        completed in this step to `paged`; return how many entries the request has now."""
        m, s, n = self.m, r.first_pos, r.n
        e0, e1 = s // m, (s + n) // m
        ring_kv, ring_gate = state[f"{self.cache_name}_kv"][r.slot], state[f"{self.cache_name}_gate"][r.slot]
        if e1 > e0:
            first = e0 * m
            lo = max(0, first - m) if self.overlap else first
            rows = ring_rows(lo, s, self.ring, kv.device)
            seq_kv = torch.cat([ring_kv[rows].to(kv.dtype), kv[: e1 * m - s]])
            seq_gate = torch.cat([ring_gate[rows].to(gate.dtype), gate[: e1 * m - s]])
            has_prev = first - lo == m
            win_kv = seq_kv[first - lo:].view(e1 - e0, m, self.width)
            win_gate = seq_gate[first - lo:].view(e1 - e0, m, self.width)
            pooled = pool_windows(win_kv, win_gate, self.ape, self.overlap,
                                  seq_kv[:m] if has_prev else None, seq_gate[:m] if has_prev else None)
            windows = torch.arange(e0, e1, device=kv.device)
            entries = self.rope(self.norm(pooled), windows * m)
            tok = windows * m
            paged[r.block_table[tok // block_size].long(), (tok % block_size) // m] = entries.to(paged.dtype)
        keep = max(s, s + n - self.ring)
        rows = ring_rows(keep, s + n, self.ring, kv.device)
        ring_kv[rows] = kv[keep - s:].to(ring_kv.dtype)
        ring_gate[rows] = gate[keep - s:].to(ring_gate.dtype)
        return e1

    def decode_update(self, kv: torch.Tensor, gate: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                      block_tables: torch.Tensor, state: dict, paged: torch.Tensor, block_size: int) -> torch.Tensor:
        """`update` for one new token per request, the whole batch at once on the device: kv, gate
        [B, P] of the tokens at `positions` [B]. A request whose token ends a window (position + 1
        divisible by m) pools it (with the ring's earlier rows) into its paged entry; every
        request's token then goes into its ring. Padded rows (slot < 0) write nothing. Returns
        each request's number of entries [B] (0 for padded rows: they read none)."""
        m, size = self.m, self.ring
        ring_kv, ring_gate = state[f"{self.cache_name}_kv"], state[f"{self.cache_name}_gate"]
        live = slots >= 0
        # the last `size` positions, ending at the new token: the window (and, with overlap, the
        # one before it) of a request that completes one now
        seq_kv = torch.cat([ring_before(ring_kv, slots, positions, size - 1).to(kv.dtype), kv[:, None]], dim=1)
        seq_gate = torch.cat([ring_before(ring_gate, slots, positions, size - 1).to(gate.dtype), gate[:, None]], dim=1)
        pooled = pool_last_window(seq_kv, seq_gate, self.ape, self.overlap, positions + 1 >= 2 * m)
        first = (positions + 1 - m).clamp(min=0)  # the window's first position
        entries = self.rope(self.norm(pooled), first)
        blocks = block_tables.gather(1, (first // block_size).clamp(max=block_tables.shape[1] - 1)[:, None])[:, 0]
        done = live & ((positions + 1) % m == 0)
        masked_index_put(paged, (blocks.long(), (first % block_size) // m), done, entries)
        rows = (slots.clamp(min=0), positions % size)
        masked_index_put(ring_kv, rows, live, kv)
        masked_index_put(ring_gate, rows, live, gate)
        return torch.where(live, (positions + 1) // m, 0)


class Indexer(nn.Module):
    """CSA's lightning indexer: its own overlapping compressor at `index_head_dim` (the keys),
    queries `wq_b(q_residual)`, per-head weights `weights_proj(x)`.

    Replicated under tensor parallelism, heads included: its output is a discrete choice (the
    top-k entries) that every rank must make identically. Sharding its heads would need an
    all-reduce of the [tokens, entries] scores per CSA layer before the top-k, and that sum's
    other order could flip near-ties against the single-process choice; replicated, every rank
    computes the same scores bitwise from the same inputs, at the cost of its (small) projections
    on every rank."""

    def __init__(self, hidden: int, q_lora_rank: int, heads: int, dim: int, topk: int, compress_rate: int,
                 eps: float, rope: InterleavedRope) -> None:
        super().__init__()
        self.heads, self.dim, self.topk, self.m = heads, dim, topk, compress_rate
        self.wq_b = Linear(q_lora_rank, heads * dim)
        self.weights_proj = Linear(hidden, heads)
        self.compressor = Compressor(hidden, dim, compress_rate, True, eps, rope, "csa_index_k")
        self.rope = rope


def head_sharded_float32_param(num_heads: int) -> nn.Parameter:
    """A float32 per-head parameter (the attention sink) holding this tensor-parallel rank's heads
    (the same contiguous split as a column-parallel wq_b); it loads its slice of the full tensor."""
    ps = get_parallel_state()
    local = divide(num_heads, ps.tp_size, "num_attention_heads")
    p = nn.Parameter(torch.zeros(local, dtype=torch.float32), requires_grad=False)

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if tuple(loaded.shape) != (num_heads,):
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {(num_heads,)}")
        param.data.copy_(loaded.narrow(0, ps.tp_rank * local, local))

    p.weight_loader = load
    return p


class V4Attention(nn.Module):
    """Under tensor parallelism (docs/deepseek_v4.md) a rank holds H / tp query heads (wq_b's rows,
    their sinks) and o_groups / tp output groups (wo_a's blocks, wo_b's columns; wo_b's
    all-reduce sums the ranks' groups). The shared K=V head, the compressors and the indexer are
    replicated: every rank computes them from the same input and writes the same caches."""

    def __init__(self, s, layer_idx: int, kind: str, main_rope: InterleavedRope,
                 compress_rope: InterleavedRope) -> None:
        """`s`: the model's V4Settings (models/deepseek_v4.py)."""
        super().__init__()
        self.layer_idx, self.kind = layer_idx, kind
        h, d, tp = s.num_heads, s.head_dim, get_parallel_state().tp_size
        self.num_heads = divide(h, tp, "num_attention_heads")  # this rank's
        self.head_dim, self.window, self.eps = d, s.window, s.eps
        # groups are contiguous runs of heads, so a rank with whole groups holds exactly the
        # groups its heads feed (the model checked divide(o_groups, tp) with a clearer message)
        self.o_groups = divide(s.o_groups, tp, "o_groups")
        self.rope = main_rope if kind == SLIDING else compress_rope
        self.wq_a = Linear(s.hidden, s.q_lora_rank)
        self.q_norm = RMSNorm(s.q_lora_rank, s.eps)
        self.wq_b = ColumnParallelLinear(s.q_lora_rank, h * d)
        self.wkv = Linear(s.hidden, d)
        self.norm = RMSNorm(d, s.eps)
        # one [o_lora_rank, H*d/g] block per group, stacked group after group: a contiguous split
        # of the rows is a split by group
        self.wo_a = ColumnParallelLinear(h * d // s.o_groups, s.o_groups * s.o_lora_rank)
        self.wo_b = RowParallelLinear(s.o_groups * s.o_lora_rank, s.hidden)
        self.attn_sink = head_sharded_float32_param(h)
        self.ops = current_kernels().ops  # v4_*_attention: Triton on CUDA, else the torch references
        if kind != SLIDING:
            m = s.compress_rates[kind]
            self.compressor = Compressor(s.hidden, d, m, kind == CSA, s.eps, compress_rope,
                                         "csa_kv" if kind == CSA else "hca_kv")
            if kind == CSA:
                self.indexer = Indexer(s.hidden, s.q_lora_rank, s.index_heads, s.index_head_dim, s.index_topk, m,
                                       s.eps, compress_rope)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t, h, d = x.shape[0], self.num_heads, self.head_dim
        q_residual = self.q_norm(self.wq_a(x))
        q = unweighted_rms_norm(self.wq_b(q_residual).view(t, h, d), self.eps)
        q = self.rope(q, positions)
        kv = self.rope(self.norm(self.wkv(x)), positions)  # [T, d]: K and V
        caches = ctx.layer_caches[self.layer_idx]
        state = caches[V4_STATE[self.kind]]
        step = self._compress_inputs(x, q_residual, positions, caches) if self.kind != SLIDING else None
        if ctx.meta.is_decode_only:
            out = self._decode(q, kv, positions, ctx, state, step)
        else:
            out = self._prefill(q, kv, positions, ctx, state, step)
        out = self.rope(out, positions, inverse=True)  # V = K carries RoPE: rotate back by the query position
        return self._grouped_output(out)

    def _compress_inputs(self, x: torch.Tensor, q_residual: torch.Tensor, positions: torch.Tensor,
                         caches: dict) -> CompressStep:
        paged = caches[self.compressor.cache_name]
        step = CompressStep(*self.compressor.project(x), paged=paged, block_size=paged.shape[1] * self.compressor.m)
        if self.kind == CSA:
            idx = self.indexer
            step.idx_kv, step.idx_gate = idx.compressor.project(x)
            step.idx_q = idx.rope(idx.wq_b(q_residual).view(x.shape[0], idx.heads, idx.dim), positions)
            step.idx_w = idx.weights_proj(x).float() * idx.heads ** -0.5
            step.idx_paged = caches[idx.compressor.cache_name]
        return step

    def _prefill(self, q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, state: dict,
                 step: CompressStep | None) -> torch.Tensor:
        """A step with prompt tokens (any number per request). The compressors (and CSA's
        indexer) take each request's new tokens on the host, one request at a time; then one
        `ops.v4_prefill_attention` call serves every request: its window (keys before its chunk
        from the ring, the chunk's own from `kv`), its compressed entries and the sink. Only then
        does the ring take the step's keys (the attention still reads the ones they replace)."""
        meta, d = ctx.meta, self.head_dim
        ring = state["window_kv"]
        if step is None:
            ids = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
            paged, m = kv.new_zeros((1, 1, d)), 1
        else:
            paged, m = step.paged, self.compressor.m
            ids = self._compress_prompt(step, ctx, state, positions)
        out = self.ops.v4_prefill_attention(q, kv, ring, positions, meta.query_start_loc, meta.state_slots,
                                            self.window, paged, meta.block_tables, ids, m, self.attn_sink, d ** -0.5)
        self._write_window(kv, positions, meta.query_start_loc, meta.state_slots, ring)
        return out

    def _compress_prompt(self, step: CompressStep, ctx: ForwardContext, state: dict,
                         positions: torch.Tensor) -> torch.Tensor | None:
        """Feed each request's new tokens to the compressor(s), writing the entries of the windows
        they finish; return which entries each query reads: CSA the indexer's top-k ids [T, K]
        (ascending, -1 padded), HCA None (every finished entry, the attention derives them)."""
        ids = []
        for r in request_slices(ctx):
            sl = slice(r.start, r.start + r.n)
            self.compressor.update(step.kv[sl], step.gate[sl], r, state, step.paged, step.block_size)
            if self.kind == CSA:
                idx = self.indexer
                n_keys = idx.compressor.update(step.idx_kv[sl], step.idx_gate[sl], r, state, step.idx_paged,
                                               step.block_size)
                keys = idx.compressor.gather(r, step.idx_paged, step.block_size, n_keys)
                ids.append(indexer_topk_ids(step.idx_q[sl], keys.to(step.idx_q.dtype), step.idx_w[sl], positions[sl],
                                            idx.m, idx.topk, idx.dim ** -0.5))
        if self.kind == HCA:
            return None
        width = max((i.shape[1] for i in ids), default=0)
        return torch.cat([F.pad(i, (0, width - i.shape[1]), value=-1) for i in ids]) if ids else \
            torch.zeros((positions.shape[0], 0), dtype=torch.long, device=positions.device)

    def _decode(self, q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, state: dict,
                step: CompressStep | None) -> torch.Tensor:
        """One token per request, batched on the device: write it into the window ring and the
        compressors, list the compressed entries each query reads (a fixed width, ids ascending,
        -1 padded), then the decode kernel reads both caches. No host sync, so a CUDA graph
        captures it; a padded row (state slot < 0) writes no ring or entry and reads nothing."""
        meta, d = ctx.meta, self.head_dim
        slots = meta.state_slots
        ring = state["window_kv"]
        masked_index_put(ring, (slots.clamp(min=0), positions % self.window), slots >= 0, kv)
        if step is None:
            ids = torch.full((q.shape[0], 0), -1, dtype=torch.long, device=q.device)
            paged, m = kv.new_zeros((1, 1, d)), 1
        else:
            paged, m = step.paged, self.compressor.m
            tables = meta.block_tables
            counts = self.compressor.decode_update(step.kv, step.gate, slots, positions, tables, state, paged,
                                                   step.block_size)
            # every entry a request can have: the block tables bound its context (in a graph, by max_model_len)
            width = tables.shape[1] * paged.shape[1]
            if self.kind == HCA:  # every finished window
                ids = finished_entry_ids(counts, width)
            else:
                idx = self.indexer
                idx.compressor.decode_update(step.idx_kv, step.idx_gate, slots, positions, tables, state,
                                             step.idx_paged, step.block_size)
                logits = self.ops.v4_indexer_logits(step.idx_q, step.idx_w, step.idx_paged, tables, counts, width,
                                                    idx.dim ** -0.5)
                ids = top_entry_ids(logits, idx.topk)
        return self.ops.v4_decode_attention(q, ring, slots, positions, self.window, paged, meta.block_tables, ids, m,
                                            self.attn_sink, d ** -0.5)

    def _write_window(self, kv: torch.Tensor, positions: torch.Tensor, query_start_loc: torch.Tensor,
                      slots: torch.Tensor, ring: torch.Tensor) -> None:
        """Each request's ring keeps the last `window` of its keys: the step's rows within
        `window` of the request's last position go to row pos % window (one masked write for
        the whole step, no host sync)."""
        qsl = query_start_loc.long()
        req = torch.searchsorted(qsl[1:], torch.arange(kv.shape[0], device=kv.device), right=True)
        last = positions[(qsl[1:] - 1).clamp(min=0)][req]  # each row's request's last position
        masked_index_put(ring, (slots[req].clamp(min=0), positions % self.window), positions > last - self.window, kv)

    def _grouped_output(self, out: torch.Tensor) -> torch.Tensor:
        """wo_a: one [o_lora_rank, H*d/g] block per head group; wo_b mixes the groups (under tp:
        this rank's groups, then wo_b's all-reduce)."""
        t, g = out.shape[0], self.o_groups
        x = out.reshape(t, g, -1).transpose(0, 1)  # [g, T, H*d/g]
        w = self.wo_a.weight.view(g, -1, x.shape[-1]).transpose(1, 2)  # [g, H*d/g, r]
        y = torch.bmm(x, w).transpose(0, 1).reshape(t, -1)
        return self.wo_b(y)
