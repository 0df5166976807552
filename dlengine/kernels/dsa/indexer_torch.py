"""Plain torch reference of DeepSeek Sparse Attention's lightning indexer: score every cached
token for every query token, keep the top-k (kernels/dsa/, docs/dsa.md).

Per query token t (at position p, so it sees the p + 1 tokens 0..p) and cached token s <= p:

    score[t, s] = sum_h  w[t, h] * relu(q[t, h] . k[s] * softmax_scale)

with q the indexer's per-head queries and k its single-head keys (both rotated on their first
qk_rope_head_dim dims), w = weights_proj(x) * n_heads**-0.5. The selection is the `topk`
highest-scoring visible tokens; a token with at most `topk` visible tokens selects all of them
(transformers scores the whole row, future tokens masked to -inf, and takes min(topk, row)
entries: the masked ones it then drops from attention again). That is the dense behaviour below
the top-k length.

The operations and their order follow transformers' DeepseekV32Indexer (float32 matmul of q and
k, scale, relu, then a matmul with the head weights) so the scores round the same way; no FP8
quantisation and no Hadamard rotation, as transformers does (both are precision optimisations of
DeepSeek's own kernels; the rotation preserves dot products).

An FP8 key cache (`cache(dtype="fp8_e4m3")`, docs/fp8_kv.md) holds k / key_scale rounded to
e4m3 (the write) and is read dequantised to float32 (x key_scale); the scoring is unchanged.

Selected tokens are returned as positions in the request's sequence, -1 padding the rows that
select fewer than the output width (`topk_to_slots` turns them into flat cache slots).
"""

from __future__ import annotations

import torch

from dlengine.kernels.attention.paged_attention_torch import gather_kv
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.kv_quant import from_cache, index_copy_rows, is_fp8, to_cache


def write_indexer_keys(k: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                       key_scale: torch.Tensor | None = None) -> None:
    """This step's indexer keys [T, D] -> the paged key cache [N, block_size, 1, D] at their slots
    (an FP8 cache stores k / key_scale, 1.0 when None)."""
    index_copy_rows(cache.view(-1, cache.shape[-1]), slot_mapping, to_cache(k, cache.dtype, key_scale))


def select_width(topk: int, max_context: int) -> int:
    """Columns of the selection: at most `topk`, and no more than the longest context."""
    return max(1, min(topk, max_context))


def topk_of_scores(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of scores [Q, S] (-inf where not visible) -> the `width` best positions [Q, width]
    int32, -1 where a row has fewer than `width` visible tokens."""
    q, s = scores.shape
    out = torch.full((q, width), -1, dtype=torch.int32, device=scores.device)
    k = min(width, s)
    if k == 0 or q == 0:
        return out
    values, idx = scores.topk(k, dim=-1)
    out[:, :k] = torch.where(values == float("-inf"), -1, idx).to(torch.int32)
    return out


def indexer_scores_ref(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor,
                       softmax_scale: float) -> torch.Tensor:
    """Index scores [Q, S] of queries q [Q, H, D] against keys [S, D] with head weights [Q, H]
    (transformers' operation order: float32 q.k, scale, relu, weighted sum over heads)."""
    scores = torch.matmul(q.float(), keys.float().transpose(0, 1).unsqueeze(0)) * softmax_scale  # [Q, H, S]
    scores = torch.relu(scores)
    return torch.matmul(weights.float().unsqueeze(-2), scores).squeeze(-2)  # [Q, S]


def indexer_topk_ref(q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, meta: AttentionMetadata,
                     topk: int, softmax_scale: float, key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k token positions [T, width] int32 (-1 padded; width = select_width(topk,
    max_seq_len)) for the flattened queries q [T, H, D] with head weights [T, H] over each
    request's paged indexer keys [N, block_size, 1, D] (which already hold this step's keys).
    Request i's queries are the last query_len positions of its seq_len-token context. An FP8
    key cache is dequantised with key_scale (1.0 when None)."""
    width = select_width(topk, meta.max_seq_len)
    out = torch.full((q.shape[0], width), -1, dtype=torch.int32, device=q.device)
    start = 0
    for i, ql in enumerate(meta.query_lens_cpu):
        seq_len = meta.seq_lens_cpu[i]
        keys = gather_kv(key_cache, meta.block_tables[i], seq_len)[:, 0]  # [S, D]
        if is_fp8(keys.dtype):
            keys = from_cache(keys, key_scale)
        scores = indexer_scores_ref(q[start:start + ql], keys, weights[start:start + ql], softmax_scale)
        q_pos = torch.arange(ql, device=q.device)[:, None] + (seq_len - ql)
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out[start:start + ql] = topk_of_scores(scores, width)
        start += ql
    return out


def token_requests(query_start_loc: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The request index of each flattened query token [T] int64 (device ops, no host sync)."""
    tokens = torch.arange(num_tokens, device=query_start_loc.device)
    return torch.searchsorted(query_start_loc[1:].long(), tokens, right=True)


def topk_to_slots(positions: torch.Tensor, block_tables: torch.Tensor, token_req: torch.Tensor,
                  block_size: int) -> torch.Tensor:
    """Selected sequence positions [T, K] (-1: none) -> flat cache slots [T, K] int32 (-1 kept),
    through each token's request's block table (device ops, no host sync)."""
    pos = positions.long().clamp(min=0)
    tables = block_tables[token_req].long()  # [T, max_blocks]
    blocks = torch.gather(tables, 1, (pos // block_size).clamp(max=tables.shape[1] - 1))
    slots = blocks * block_size + pos % block_size
    return torch.where(positions >= 0, slots, -1).to(torch.int32)
