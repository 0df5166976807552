"""DeepSeek-V4's lightning-indexer scores for the batched decode step on DSA's Triton kernel
(kernels/dsa/indexer_triton.py), same signature and result as `batched_decode.indexer_logits`.

The math is the same: V4 scores relu(q_h . k) * scale * w_h summed over heads, DSA relu(q_h . k *
scale) * w_h (equal, since scale > 0), with w = weights_proj(x) * heads^-0.5 in both. V4's keys
are compressed entries, paged like DSA's token keys with a page of block_size / m entries
(entry w at block_tables[b, w // page], row w % page), and a query sees its request's first
`counts[b]` entries, i.e. DSA's "position" counts[b] - 1. No host sync (CUDA-graph capturable).
"""

from __future__ import annotations

import torch

from dlengine.kernels.dsa.indexer_triton import indexer_logits as dsa_indexer_logits


def indexer_logits(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, block_tables: torch.Tensor,
                   counts: torch.Tensor, width: int, softmax_scale: float) -> torch.Tensor:
    """See batched_decode.indexer_logits: [B, width] float32, -inf for entries >= counts[b]."""
    b = q.shape[0]
    rows = torch.arange(b, device=q.device)  # one query token per request
    last = counts.to(torch.int64) - 1  # the last visible entry (-1: none)
    return dsa_indexer_logits(q, weights, keys, block_tables.to(torch.int32).contiguous(), rows, last, width,
                              softmax_scale)
