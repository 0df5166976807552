"""Torch references of DeepSeek-V4's operations, written to follow transformers 5.25's
modeling_deepseek_v4.py operation by operation (so float32 results agree to rounding).

- `interleaved_rope`: RoPE on the trailing `2 * cos.shape[-1]` dims, pairs (2i, 2i + 1).
- `pool_windows`: a compressor's softmax-gated pooling of whole windows (HCA: one window;
  CSA and its indexer: the previous window's first half with this window's second half).
- `indexer_topk_ids` / `indexer_select`: the lightning indexer's scores and its top-k choice of
  compressed entries (as ids, -1 padded, or as a mask).
- `sink_attention`: one softmax over sliding-window keys, selected compressed entries and a
  per-head sink logit; K = V.
- `prefill_attention`: `sink_attention` for a prompt step's requests, read from the window ring,
  the step's new keys and the paged entries (the oracle of kernels/v4/prefill_triton.py).
- `clamped_swiglu_experts`: routed SwiGLU experts with V4's clamps on gate and up (and its dense
  form, run while a CUDA graph captures).
- `decode_attention`: `sink_attention` for one token per request, read from the caches.
The batched decode step's compressor and indexer helpers: batched_decode.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlengine.kernels.v4.batched_decode import top_entry_ids


def interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, ..., D]; cos / sin [T, R/2] (one entry per pair). Rotates x[..., D-R:], in float32."""
    half = cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (2 * half,)
    cos = cos.repeat_interleave(2, dim=-1).view(shape)
    sin = sin.repeat_interleave(2, dim=-1).view(shape)
    nope, rope = x[..., : -2 * half], x[..., -2 * half:]
    rotated = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    out = (rope.float() * cos + rotated.float() * sin).to(x.dtype)
    return torch.cat([nope, out], dim=-1)


def pool_windows(kv: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor, overlap: bool,
                 prev_kv: torch.Tensor | None = None, prev_gate: torch.Tensor | None = None) -> torch.Tensor:
    """One pooled (not yet normalised) entry per window.

    kv, gate [W, m, P]: the projections of W whole consecutive windows; `ape` [m, P] is added to
    the gate. Without overlap (HCA) entry w = sum_j softmax_j(gate) * kv over window w (P = d).
    With overlap (CSA, P = 2d) entry w pools window w-1's first half (Ca) with window w's second
    half (Cb) over 2m slots; `prev_kv` / `prev_gate` [m, P] are the window before the first one
    (None at the start of the sequence: weight 0)."""
    gate = gate + ape
    if not overlap:
        return (kv * gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)).sum(dim=1)
    w, m, p = kv.shape
    d = p // 2
    new_kv = kv.new_zeros((w, 2 * m, d))
    new_gate = gate.new_full((w, 2 * m, d), float("-inf"))
    new_kv[:, m:] = kv[..., d:]
    new_gate[:, m:] = gate[..., d:]
    if w > 1:
        new_kv[1:, :m] = kv[:-1, :, :d]
        new_gate[1:, :m] = gate[:-1, :, :d]
    if prev_kv is not None:
        new_kv[0, :m] = prev_kv[:, :d]
        new_gate[0, :m] = (prev_gate + ape)[:, :d]
    return (new_kv * new_gate.softmax(dim=1, dtype=torch.float32).to(new_kv.dtype)).sum(dim=1)


# the most score elements one block of queries materialises in the reference prefill paths
SCORE_ELEMENTS = 1 << 27


def indexer_topk_ids(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, q_positions: torch.Tensor,
                     compress_rate: int, topk: int, softmax_scale: float) -> torch.Tensor:
    """Which compressed entries each query attends to, as ids: [n, min(topk, C)] int64, ascending,
    -1 padding a row with fewer (what the attention kernels read).

    q [n, Hi, di] (RoPE'd), keys [C, di], weights [n, Hi] (weights_proj(x) * Hi^-0.5). Score
    = sum_h relu(q_h . k) * softmax_scale * weights_h; query p may pick entries w < (p + 1) // m;
    it keeps the top min(topk, C) by score among them (transformers' choice: future entries
    score -inf and are dropped after the top-k)."""
    n, c = q.shape[0], keys.shape[0]
    if c == 0:
        return torch.zeros((n, 0), dtype=torch.long, device=q.device)
    rows = max(1, SCORE_ELEMENTS // max(1, q.shape[1] * c))  # bound the [n, Hi, C] scores of a long prompt
    if n > rows:
        return torch.cat([indexer_topk_ids(q[i:i + rows], keys, weights[i:i + rows], q_positions[i:i + rows],
                                           compress_rate, topk, softmax_scale) for i in range(0, n, rows)])
    scores = torch.matmul(q.float(), keys.float().t())  # [n, Hi, C]
    scores = F.relu(scores) * softmax_scale
    scores = (scores * weights.float().unsqueeze(-1)).sum(dim=1)  # [n, C]
    threshold = (q_positions + 1) // compress_rate
    visible = torch.arange(c, device=q.device)[None, :] < threshold[:, None]
    return top_entry_ids(scores.masked_fill(~visible, float("-inf")), topk)


def indexer_select(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, q_positions: torch.Tensor,
                   compress_rate: int, topk: int, softmax_scale: float) -> torch.Tensor:
    """`indexer_topk_ids` as a mask: bool [n, C], True for the entries each query attends to."""
    ids = indexer_topk_ids(q, keys, weights, q_positions, compress_rate, topk, softmax_scale)
    return entry_mask(ids, keys.shape[0])


def entry_mask(ids: torch.Tensor, count: int) -> torch.Tensor:
    """Entry ids [n, K] (-1: none) -> bool [n, count], True at each listed id."""
    chosen = torch.zeros((ids.shape[0], count + 1), dtype=torch.bool, device=ids.device)
    return chosen.scatter_(1, torch.where(ids >= 0, ids, count), True)[:, :count]


def sink_attention(q: torch.Tensor, keys: torch.Tensor, key_positions: torch.Tensor, q_positions: torch.Tensor,
                   window: int, compressed: torch.Tensor, compressed_visible: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """q [n, H, D]; keys [L, D] at `key_positions` (K = V, one head), visible to query p when
    p - window < pos <= p; compressed [C, D] visible per `compressed_visible` [n, C]; sinks [H].
    Returns [n, H, D].

    The scores of a long prompt ([n, H, L + C]: 10 GiB for one 8k-token prompt at V4-Flash's 64
    heads) are made a block of queries at a time, each block's at most SCORE_ELEMENTS."""
    n, h, _ = q.shape
    rows = max(1, SCORE_ELEMENTS // max(1, h * (keys.shape[0] + compressed.shape[0])))
    if n > rows:
        return torch.cat([sink_attention(q[i:i + rows], keys, key_positions, q_positions[i:i + rows], window,
                                         compressed, compressed_visible[i:i + rows], sinks, scale)
                          for i in range(0, n, rows)])
    kv = torch.cat([keys, compressed], dim=0)  # [L + C, D]
    logits = torch.matmul(q, kv.t().unsqueeze(0).to(q.dtype)) * scale  # [n, H, L + C]
    in_window = (key_positions[None, :] <= q_positions[:, None]) & (key_positions[None, :] > q_positions[:, None] - window)
    visible = torch.cat([in_window, compressed_visible], dim=1)  # [n, L + C]
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    sink = sinks.to(logits.dtype).view(1, h, 1).expand(n, h, 1)
    combined = torch.cat([logits, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return torch.matmul(probs.to(kv.dtype), kv.unsqueeze(0))


def prefill_attention(q: torch.Tensor, kv: torch.Tensor, window_kv: torch.Tensor, positions: torch.Tensor,
                      query_start_loc: torch.Tensor, slots: torch.Tensor, window: int, compressed: torch.Tensor,
                      block_tables: torch.Tensor, entry_ids: torch.Tensor | None, compress_rate: int,
                      sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """A prompt step's attention (any number of tokens per request): `sink_attention` for each
    request, one at a time on the host.

    q [T, H, D]; kv [T, D] the step's new K=V; request b owns rows query_start_loc[b] ..
    query_start_loc[b + 1] - 1 at consecutive `positions` [T] starting at s_b, and state slot
    slots[b]. Query p reads the window keys at positions max(0, p - W + 1) .. p: from kv at and
    after s_b, from the ring `window_kv` [slots, W, D] (row pos % W) before it, so the ring must
    not hold this step's keys yet. Compressed entries: `compressed` [num_blocks, per_block, D],
    entry w of request b at block_tables[b, w // per_block], row w % per_block (already holding
    the entries this step finishes); `entry_ids` [T, K] lists the entries each query reads (the
    valid ids first, then -1; at most (p + 1) // m of them), or None: every finished entry
    w < (p + 1) // m (HCA). A width-0 `entry_ids` reads none (sliding layers). Returns [T, H, D]."""
    out = torch.empty_like(q)
    starts, host_pos = query_start_loc.tolist(), positions.tolist()
    per_block = compressed.shape[1]
    for b, slot in enumerate(slots.tolist()):
        a, e = starts[b], starts[b + 1]
        if e == a:
            continue
        n, s, pos = e - a, host_pos[a], positions[a:e]
        old = torch.arange(max(0, s - window + 1), s, device=q.device)
        keys = torch.cat([window_kv[slot, old % window].to(kv.dtype), kv[a:e]])
        key_pos = torch.cat([old, torch.arange(s, s + n, device=q.device)])
        count = 0 if entry_ids is not None and entry_ids.shape[1] == 0 else (s + n) // compress_rate
        w = torch.arange(count, device=q.device)
        entries = compressed[block_tables[b, w // per_block].long(), w % per_block]  # [count, D]
        if entry_ids is None:  # every finished window
            visible = w[None, :] < ((pos + 1) // compress_rate)[:, None]
        else:
            visible = entry_mask(entry_ids[a:e].long(), count)
        out[a:e] = sink_attention(q[a:e], keys, key_pos, pos, window, entries.to(q.dtype), visible, sinks, scale)
    return out


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def clamped_swiglu_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor, limit: float) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; topk [T, K].

    Each routed expert runs on its tokens; listing them reads the routing on the host, which a
    CUDA graph cannot capture: while capturing, `clamped_swiglu_experts_dense` runs instead (the
    same numbers, every expert on every token)."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return clamped_swiglu_experts_dense(x, w13, w2, topk_weights, topk_ids, limit)
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    for e in topk_ids.unique().tolist():
        token_idx, k_idx = torch.where(topk_ids == e)
        gate_up = F.linear(x[token_idx], w13[e])
        h = clamped_swiglu(gate_up[:, :inter], gate_up[:, inter:], limit)
        y = F.linear(h, w2[e]) * topk_weights[token_idx, k_idx, None].to(x.dtype)
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def clamped_swiglu_experts_dense(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                                 topk_ids: torch.Tensor, limit: float) -> torch.Tensor:
    """`clamped_swiglu_experts` without reading the routing on the host (CUDA-graph capturable):
    every expert on every token, each token weighting it by its routing weight (0 when not
    routed there), summed in expert order like the sparse form's index_add_. E / K times the
    expert work: on CUDA the engine runs the fused Triton MoE's clamped form instead
    (kernels/moe/fused_moe_triton.py); this runs only where the torch ops are forced."""
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    for e in range(w13.shape[0]):
        gate_up = F.linear(x, w13[e])
        y = F.linear(clamped_swiglu(gate_up[:, :inter], gate_up[:, inter:], limit), w2[e])
        weight = torch.where(topk_ids == e, topk_weights, 0).sum(dim=-1)  # [T]: the one routed slot, or 0
        out += y * weight[:, None].to(x.dtype)
    return out


def decode_attention(q: torch.Tensor, window_kv: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                     window: int, compressed: torch.Tensor, block_tables: torch.Tensor, entry_ids: torch.Tensor,
                     compress_rate: int, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode token per request: `sink_attention` read straight from the caches, for the
    whole batch at once (device tensors only: no host sync, so a decode step on the reference
    can be captured too).

    q [B, H, D]; window_kv [slots, W, D], the ring (already holding this step's token) at row
    pos % W; slots, positions [B]; compressed [num_blocks, block_size // m, D] (paged entries,
    entry w at block_tables[b, w*m // block_size], row (w*m % block_size) // m); entry_ids [B, K]
    the entries each query reads, -1 for none. A padded row (slot < 0: engine/cuda_graph.py)
    reads nothing and gets zeros. Returns [B, H, D]."""
    b, h, _ = q.shape
    live = slots >= 0
    key_pos = positions[:, None] - (window - 1) + torch.arange(window, device=q.device)  # [B, W] ascending
    in_window = (key_pos >= 0) & live[:, None]
    keys = window_kv[slots.clamp(min=0)[:, None], key_pos % window]  # [B, W, D]
    per_block = compressed.shape[1]
    ids = entry_ids.long()
    chosen = (ids >= 0) & live[:, None]
    safe = ids.clamp(min=0)
    blocks = block_tables.long().gather(1, (safe // per_block).clamp(max=block_tables.shape[1] - 1))
    entries = compressed[blocks, safe % per_block]  # [B, K, D]
    visible = torch.cat([in_window, chosen], dim=1)  # [B, W + K]
    kv = torch.where(visible[..., None], torch.cat([keys, entries], dim=1).to(q.dtype), 0.0)
    logits = torch.matmul(q, kv.transpose(1, 2)) * scale  # [B, H, W + K]
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    sink = sinks.to(logits.dtype).view(1, h, 1).expand(b, h, 1)
    combined = torch.cat([logits, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return torch.matmul(probs.to(kv.dtype), kv)
