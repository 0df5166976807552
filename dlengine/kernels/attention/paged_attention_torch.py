"""Plain torch reference for paged attention and the KV-cache write.

Readable rather than fast; it is the oracle for the Triton kernels and the CPU path. Softmax is
computed in float32 whatever the cache dtype, as the fused kernels do. FP8 caches
(float8_e4m3fn, kernels/kv_quant.py) are written quantised with the layer's k_scale / v_scale and
read dequantised.
"""

from __future__ import annotations

import torch

from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.kv_quant import from_cache, index_copy_rows, to_cache


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """Store this step's K/V ([T, Hkv, D]) at their slots of the paged cache ([N, B, Hkv, D]);
    an FP8 cache stores k / k_scale and v / v_scale (scales 1.0 when None)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    index_copy_rows(k_cache.view(-1, num_kv_heads, head_dim), slot_mapping, to_cache(k, k_cache.dtype, k_scale))
    index_copy_rows(v_cache.view(-1, num_kv_heads, head_dim), slot_mapping, to_cache(v, v_cache.dtype, v_scale))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` tokens of one request's K or V as [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]


def attend_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None) -> torch.Tensor:
    """q [Q, H, D], k/v [K, Hkv, D] -> [Q, H, D]. Query i sits at position causal_offset + i."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_heads // num_kv_heads
    qf = q.float().view(q.shape[0], num_kv_heads, group, q.shape[2])
    scores = torch.einsum("qhgd,khd->hgqk", qf, k.float()) * scale
    if causal_offset is not None:
        q_pos = torch.arange(q.shape[0], device=q.device)[:, None] + causal_offset
        k_pos = torch.arange(k.shape[0], device=q.device)[None, :]
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("hgqk,khd->qhgd", probs, v.float())
    return out.reshape(q.shape[0], num_heads, -1).to(q.dtype)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the flattened queries q [T, H, D] over each request's paged context.

    Handles prefill, chunked prefill over a cached prefix, and decode alike: request i's queries
    are the last `query_len` positions of its `seq_len`-token context. FP8 caches are read
    dequantised (x k_scale, x v_scale).
    """
    out = torch.empty_like(q)
    qsl = [0]
    for ql in meta.query_lens_cpu:
        qsl.append(qsl[-1] + ql)
    decode_rows = [i for i, ql in enumerate(meta.query_lens_cpu) if ql == 1]
    # decodes: batched, one query per request, padded to the longest context
    if decode_rows:
        rows = torch.tensor(decode_rows, device=q.device)
        seq_lens = meta.seq_lens[rows].long()
        max_len = int(max(meta.seq_lens_cpu[i] for i in decode_rows))
        block_size = k_cache.shape[1]
        pos = torch.arange(max_len, device=q.device)
        tables = meta.block_tables[rows].long()
        slots = tables[:, pos // block_size] * block_size + pos % block_size  # [R, L]
        kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k = from_cache(k_cache.view(-1, kv_heads, head_dim)[slots], k_scale)  # [R, L, Hkv, D] float32
        v = from_cache(v_cache.view(-1, kv_heads, head_dim)[slots], v_scale)
        token_idx = meta.query_start_loc[rows].long()
        qd = q[token_idx].float()  # [R, H, D]
        group = qd.shape[1] // kv_heads
        qd = qd.view(len(decode_rows), kv_heads, group, head_dim)
        scores = torch.einsum("rhgd,rlhd->rhgl", qd, k) * scale
        scores.masked_fill_((pos[None, :] >= seq_lens[:, None])[:, None, None, :], float("-inf"))
        o = torch.einsum("rhgl,rlhd->rhgd", scores.softmax(-1), v)
        out[token_idx] = o.reshape(len(decode_rows), -1, head_dim).to(q.dtype)
    # prefills and chunks: one request at a time, exact-size
    for i, ql in enumerate(meta.query_lens_cpu):
        if ql == 1:
            continue
        seq_len = meta.seq_lens_cpu[i]
        k = from_cache(gather_kv(k_cache, meta.block_tables[i], seq_len), k_scale)
        v = from_cache(gather_kv(v_cache, meta.block_tables[i], seq_len), v_scale)
        s, e = qsl[i], qsl[i + 1]
        out[s:e] = attend_dense(q[s:e], k, v, scale, causal_offset=seq_len - ql)
    return out
