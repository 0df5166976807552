"""DeepSeek-V4's decode step for a whole batch at once (one token per request), in torch: device
tensors only, no host sync and no data-dependent shape (no .item(), .tolist(), nonzero or
boolean-mask indexing), so a decode step built from these can be captured in a CUDA graph
(engine/cuda_graph.py). Their oracle is the per-request path (layers/v4_attention.py:
`Compressor.update`, `reference.indexer_select`); tests/test_v4_batched_decode.py compares them.

- `masked_index_put`: write one row per request into a cache, except the rows that must not
  write (padded rows of a graph batch, requests whose window is not complete).
- `ring_before`: each request's ring rows for the positions just before its new token.
- `pool_last_window`: a compressor's pooling of the window that ends at the new token (CSA: with
  the previous window's first half), `reference.pool_windows` for one window per request.
- `indexer_logits`: the lightning indexer's scores of every request's compressed keys, read
  through its block table, -inf beyond its finished windows (same operation order as
  `reference.indexer_select`). On CUDA the op is DSA's indexer kernel (kernels/v4/indexer_triton.py).
- `top_entry_ids` (CSA: the indexer's top-k) and `finished_entry_ids` (HCA: every finished
  window): fixed-width entry ids, ascending, -1 padded, what `decode_attention` reads.

Widths come from static shapes: a request has at most block_tables.shape[1] * block_size / m
entries (the graph runner's block tables are max_model_len wide), so a captured graph serves
every context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] mask -> [B, 1, ...] broadcastable against `like` ([B, ...])."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def masked_index_put(dst: torch.Tensor, index: tuple[torch.Tensor, ...], live: torch.Tensor,
                     values: torch.Tensor) -> None:
    """dst[index[0][i], index[1][i], ...] = values[i] for every row i with live[i]; the other rows
    change nothing. Every row's index must be in bounds (callers clamp), and live rows must name
    distinct places.

    A dead row cannot be dropped from the scatter without a host sync, so it writes exactly what
    another write to the same place holds: the first live row's value to that row's place, or,
    when no row is live, the first row's place's current value back to it (duplicate indices of an
    index_put are safe only because their values are identical; kernels/gdn/slot_rows.py does the
    same for whole state slots)."""
    if live.numel() == 0:
        return
    values = values.to(dst.dtype)
    first = torch.argmax(live.to(torch.int32)).view(1)  # the first live row (0 when none is)
    fill_index = tuple(ix.index_select(0, first) for ix in index)
    current = dst[fill_index]  # [1, ...]: what that place holds now
    first_live = live.index_select(0, first)
    fill = torch.where(_rows(first_live, current), values.index_select(0, first), current)
    target = tuple(torch.where(live, ix, f) for ix, f in zip(index, fill_index))
    dst.index_put_(target, torch.where(_rows(live, values), values, fill))


def ring_before(ring: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, count: int) -> torch.Tensor:
    """ring [num_slots, R, P] (position p at row p % R) -> each request's rows of positions
    p - count .. p - 1, oldest first: [B, count, P]. Rows of negative positions and of padded
    requests (slot < 0, read as slot 0) hold whatever is there; callers mask them."""
    offsets = torch.arange(-count, 0, device=positions.device)
    rows = (positions[:, None] + offsets) % ring.shape[1]
    return ring[slots.clamp(min=0)[:, None], rows]


def pool_last_window(seq_kv: torch.Tensor, seq_gate: torch.Tensor, ape: torch.Tensor, overlap: bool,
                     has_prev: torch.Tensor) -> torch.Tensor:
    """One pooled (not yet normalised) entry per request [B, d], as `reference.pool_windows` for
    the window ending at each request's last row.

    seq_kv, seq_gate [B, R, P]: projections of the last R positions (R = m without overlap, 2m
    with). Without overlap (HCA) the entry softmax-pools the m rows. With overlap (CSA, P = 2d)
    it pools the previous window's first half (rows :m, columns :d) with this window's second
    half (rows m:, columns d:); `has_prev` [B] False marks a sequence's first window, whose
    previous half weighs 0 (gate -inf, kv 0, whatever the ring rows hold)."""
    if not overlap:
        gate = seq_gate + ape
        return (seq_kv * gate.softmax(dim=1, dtype=torch.float32).to(seq_kv.dtype)).sum(dim=1)
    m, d = ape.shape[0], seq_kv.shape[-1] // 2
    prev = has_prev.view(-1, 1, 1)
    prev_gate = (seq_gate[:, :m] + ape)[..., :d]
    gate = (seq_gate[:, m:] + ape)[..., d:]
    new_kv = torch.cat([torch.where(prev, seq_kv[:, :m, :d], 0), seq_kv[:, m:, d:]], dim=1)
    new_gate = torch.cat([torch.where(prev, prev_gate, float("-inf")), gate], dim=1)
    return (new_kv * new_gate.softmax(dim=1, dtype=torch.float32).to(new_kv.dtype)).sum(dim=1)


def paged_entries(paged: torch.Tensor, block_tables: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block [B, width], row [B, width]) of each request's entries 0 .. width - 1 in a paged
    compressed cache [num_blocks, per_block, D]: entry w at block_tables[b, w // per_block],
    row w % per_block (block ids past the table's width are clamped: callers mask them)."""
    per_block = paged.shape[1]
    w = torch.arange(width, device=block_tables.device)
    cols = (w // per_block).clamp(max=block_tables.shape[1] - 1)
    return block_tables.long()[:, cols], (w % per_block).expand(block_tables.shape[0], width)


def indexer_logits(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, block_tables: torch.Tensor,
                   counts: torch.Tensor, width: int, softmax_scale: float) -> torch.Tensor:
    """The lightning indexer's scores [B, width] float32 of each request's entries 0 .. width - 1:
    sum_h relu(q[b, h] . k_w) * softmax_scale * weights[b, h], -inf for w >= counts[b] (not
    finished, or not the request's). q [B, Hi, di] (RoPE'd); weights [B, Hi]; keys [num_blocks,
    per_block, di], the paged indexer keys (already holding this step's entries)."""
    blocks, rows = paged_entries(keys, block_tables, width)
    visible = torch.arange(width, device=q.device)[None, :] < counts[:, None]
    k = torch.where(visible[..., None], keys[blocks, rows].float(), 0.0)  # [B, width, di]
    scores = torch.matmul(q.float(), k.transpose(1, 2))  # [B, Hi, width]
    scores = F.relu(scores) * softmax_scale
    scores = (scores * weights.float().unsqueeze(-1)).sum(dim=1)
    return scores.masked_fill(~visible, float("-inf"))


def top_entry_ids(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """The ids of each row's top min(topk, C) finite logits [B, C] -> [B, min(topk, C)] int64,
    ascending (the order the per-request path lists them in), -1 padding rows with fewer."""
    b, c = logits.shape
    k = min(topk, c)
    if k == 0:
        return torch.full((b, 0), -1, dtype=torch.long, device=logits.device)
    values, idx = logits.topk(k, dim=-1)
    ids = torch.where(values == float("-inf"), c, idx).sort(dim=-1).values  # padding sorts last
    return torch.where(ids == c, -1, ids)


def finished_entry_ids(counts: torch.Tensor, width: int) -> torch.Tensor:
    """Every finished entry of each request: [B, width] int64, w where w < counts[b], else -1."""
    w = torch.arange(width, device=counts.device)[None, :]
    return torch.where(w < counts[:, None], w, -1)
