"""Triton paged-attention kernels: KV-cache write, split-KV decode and varlen prefill/extend.

Layouts (same as `paged_attention_torch`):
  q            [T, H, D]   flattened varlen queries (any strides with unit stride on D)
  k/v          [T, Hkv, D] this step's keys/values
  k/v_cache    [num_blocks, block_size, Hkv, D] per layer
  meta         AttentionMetadata; request i owns queries query_start_loc[i]:query_start_loc[i+1],
               the *last* query_len positions of its seq_len-token context (causal).

Kernels:
  _store_kv_kernel       scatter K/V rows into the paged cache by slot_mapping (negative slot = skip)
  _decode_split_kernel   flash-decoding for query_len == 1 rows: grid (request, kv_head, split); one
                         program attends the whole GQA group of its kv head over one slice of the
                         context (online softmax) and writes a partial (out, lse); the split that
                         finishes last (per-request/kv-head arrival counter) merges the partials,
                         so decode is a single launch (the epilogue and counters are
                         kernels/split_kv_triton.py's, shared with MLA). With one split it writes
                         the output directly.
  _extend_kernel         flash-attention over paged KV for rows with query_len > 1 (prefill,
                         chunked prefill over a cached prefix): grid (q_tile, request, kv_head);
                         one program packs BLOCK_Q query tokens x the GQA group into BLOCK_M rows,
                         so K/V tiles are read once per kv head. Keys strictly before the tile's
                         first query are attended without masks; the causal diagonal with masks.

K/V tiles are gathered token by token through the block table (block index = pos // block_size),
so any block size works (1, 16, 32, ...) independently of the key tile BLOCK_N.
Softmax runs in float32 in the exp2 domain; matmuls accumulate in float32 (tensor cores for
bf16/fp16 caches, IEEE fp32 for float32 caches -- no TF32); q is cast to the cache dtype.

FP8 caches (float8_e4m3fn, kernels/kv_quant.py): the write kernel stores x / scale (saturated,
rounded to nearest even); the attention kernels convert each FP8 tile to q's dtype and run the
dots there (bf16/fp16 tensor cores, or IEEE fp32), folding the per-layer scales in: the scores
are multiplied by k_scale (with the softmax scale), the output by v_scale.

CUDA graphs: launch sizes come from host metadata only, and correctness never depends on the
split count, so a graph captured with max_seq_len = max_model_len replays for any shorter context.
Rows of a request with seq_len == 0 (graph padding) get zeros, in the decode kernel and in the
extend kernel (verify graphs: 1 + k query tokens per request, engine/cuda_graph.py); slots < 0
are not written. The split
merge uses a persistent zeroed counter buffer per device that must first be allocated outside a
capture (any eager split decode does it, e.g. the runner's warm-up).

Under TRITON_INTERPRET=1 (CPU tests) the kernels upcast K/V/Q to float32 right after loading,
because the interpreter of triton 3.x gets bf16 arithmetic and bf16 `tl.dot` wrong.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dlengine.kernels.common import num_sms
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.kv_quant import is_fp8
from dlengine.kernels.kv_quant_triton import quantize_fp8
from dlengine.kernels.split_kv_triton import choose_num_splits, split_counters, store_split_and_merge

LOG2E = 1.4426950408889634


def interpret_mode() -> bool:
    """Whether the kernels of this module were built for the Triton CPU interpreter."""
    return _INTERPRET


# --------------------------------------------------------------------------------------------------
# KV-cache write
# --------------------------------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
):
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // PAGE
    off = slot % PAGE
    # (broadcast the slot test to a tensor: the interpreter rejects scalar-bool & tensor masks)
    valid = (offs_h[:, None] * 0 + slot) >= 0
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM) & valid
    src_k = k_ptr + t.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = v_ptr + t.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst_k = kc_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    dst_v = vc_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    kv = tl.load(src_k, mask=mask)
    vv = tl.load(src_v, mask=mask)
    if QUANT:  # FP8 cache: x / scale, saturated and rounded
        kv = quantize_fp8(kv.to(tl.float32), tl.load(ks_ptr))
        vv = quantize_fp8(vv.to(tl.float32), tl.load(vs_ptr))
    tl.store(dst_k, kv.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_v, vv.to(vc_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=64)
def _store_blocks(num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // block_d))
    return block_h, block_d, -(-num_kv_heads // block_h)


def kv_scale_args(cache: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale pointers a kernel takes: the layer's float32 scales for an FP8 cache (1.0 when
    None), any tensor otherwise (never read)."""
    if not is_fp8(cache.dtype):
        return cache, cache
    one = None
    if k_scale is None or v_scale is None:
        one = torch.ones((), dtype=torch.float32, device=cache.device)
    return (one if k_scale is None else k_scale), (one if v_scale is None else v_scale)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """k/v [T, Hkv, D] -> k_cache/v_cache [N, block_size, Hkv, D] at slot_mapping[t] (skip if < 0).

    k/v may be strided views (e.g. of a fused qkv output) with unit stride on D; the caches need
    unit stride on D. Values are cast to the cache dtype; an FP8 cache stores k / k_scale and
    v / v_scale (float32 scalar tensors; 1.0 when None)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    block_h, block_d, h_tiles = _store_blocks(num_kv_heads, head_dim)
    kst, vst, kcs, vcs = k.stride(), v.stride(), k_cache.stride(), v_cache.stride()
    k_sc, v_sc = kv_scale_args(k_cache, k_scale, v_scale)
    _store_kv_kernel[(num_tokens, h_tiles)](
        k, v, k_cache, v_cache, slot_mapping, k_sc, v_sc,
        kst[0], kst[1], vst[0], vst[1], kcs[0], kcs[1], kcs[2], vcs[0], vcs[1], vcs[2],
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        BLOCK_H=block_h, BLOCK_D=block_d, QUANT=is_fp8(k_cache.dtype), num_warps=4,
    )


# --------------------------------------------------------------------------------------------------
# shared inner loop: one KV tile of online softmax
# --------------------------------------------------------------------------------------------------


@triton.jit
def load_kv_tile(k_ptrs, v_ptrs, n_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BOUND: tl.constexpr):
    """K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] at the given pointers; keys outside n_ok
    (BOUND only) and dims past HEAD_DIM (a padded BLOCK_D) read as 0."""
    if BOUND:
        if BLOCK_D == HEAD_DIM:
            kt = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            d_ok = offs_d < HEAD_DIM
            kt = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            kt = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_ok = offs_d < HEAD_DIM
            kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    return kt, v


@triton.jit
def _attn_tile(
    acc, l_i, m_i, q, q_pos,
    k_base, v_base, bt_row, start_n, kv_end, qk_scale,
    stride_kb, stride_ks, stride_vb, stride_vs,
    offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    BOUND: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Fold keys [start_n, start_n + BLOCK_N) into (acc, l_i, m_i).

    BOUND masks keys >= kv_end; CAUSAL additionally masks keys after each row's q_pos.
    k_base/v_base already point at this kv head of block 0 offset 0.
    """
    pos = start_n + tl.arange(0, BLOCK_N)
    n_ok = pos < kv_end  # used only when BOUND (dead code otherwise)
    if BOUND:
        blk = tl.load(bt_row + pos // PAGE, mask=n_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + pos // PAGE).to(tl.int64)
    in_blk = pos % PAGE
    k_off = blk * stride_kb + in_blk * stride_ks
    v_off = blk * stride_vb + in_blk * stride_vs
    k_ptrs = k_base + k_off[None, :] + offs_d[:, None]  # [BLOCK_D, BLOCK_N] (K transposed)
    v_ptrs = v_base + v_off[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    kt, v = load_kv_tile(k_ptrs, v_ptrs, n_ok, offs_d, HEAD_DIM, BLOCK_D, BOUND)
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    elif KV_FP8:  # dots run in q's dtype; the scales are folded in by the caller
        kt = kt.to(q.dtype)
        v = v.to(q.dtype)
    if IEEE:
        qk = tl.dot(q, kt, input_precision="ieee")
    else:
        qk = tl.dot(q, kt)
    qk = qk * qk_scale  # log2 domain
    if BOUND:
        if CAUSAL:
            ok = (pos[None, :] <= q_pos[:, None]) & n_ok[None, :]
        else:
            ok = n_ok[None, :]
        qk = tl.where(ok, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # rows with every key so far masked keep m = -inf; shift by 0 instead to avoid inf - inf
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(qk - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc += tl.dot(p, v, input_precision="ieee")
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


# --------------------------------------------------------------------------------------------------
# decode: split-KV (flash-decoding) + reduce
# --------------------------------------------------------------------------------------------------


# ints that change from step to step must not be specialised on (==1, %16), or every new batch
# shape triggers a JIT compile of ~1 s in the middle of serving
@triton.jit(do_not_specialize=["num_splits", "lse_off", "stride_bt"])
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, ws_ptr, cnt_ptr, ks_ptr, vs_ptr,
    qk_scale, num_splits, lse_off,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    DIRECT: tl.constexpr, MIXED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Grid (request, kv_head, split). With DIRECT (one split) the output is written here.
    Otherwise each split stores its normalized partial output and log2-sum-exp into the workspace
    ws ([B, H, splits, D] partials, then [B, H, splits] lse at lse_off), bumps a per-(request,
    kv head) counter, and the split that finishes last merges all partials and resets the counter
    to 0 for the next launch -- one kernel launch, no separate reduce kernel."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    tok = tl.load(qsl_ptr + b)
    if MIXED:
        if tl.load(qsl_ptr + b + 1) - tok != 1:
            return  # prefill/extend row: the extend kernel owns it
    seq_len = tl.load(seq_lens_ptr + b)
    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    start = sp * tiles_per_split * BLOCK_N
    if start >= seq_len:
        if seq_len == 0:
            if sp == 0:  # padding row (e.g. a CUDA-graph batch slot): defined output, zeros
                offs_g = tl.arange(0, BLOCK_H)
                offs_d = tl.arange(0, BLOCK_D)
                z_ptrs = (out_ptr + tok.to(tl.int64) * stride_ot + (kvh * GROUP + offs_g)[:, None] * stride_oh
                          + offs_d[None, :])
                z_mask = (offs_g[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
                tl.store(z_ptrs, tl.zeros([BLOCK_H, BLOCK_D], dtype=out_ptr.dtype.element_ty), mask=z_mask)
        return  # empty split: not counted in n_active below
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    full_end = start + ((end - start) // BLOCK_N) * BLOCK_N

    offs_g = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_g
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    q_ptrs = q_ptr + tok.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    elif not KV_FP8:
        q = q.to(kc_ptr.dtype.element_ty)  # dots run in the cache dtype (FP8 caches: in q's)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(ks_ptr)  # scores of the dequantised keys

    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_base = kc_ptr + kvh * stride_kh
    v_base = vc_ptr + kvh * stride_vh
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    q_pos = tl.zeros([BLOCK_H], dtype=tl.int32)  # unused (no causal mask in decode)
    for start_n in range(start, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, q_pos, k_base, v_base, bt_row, start_n, end, qk_scale,
                                   stride_kb, stride_ks, stride_vb, stride_vs, offs_d,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, False, False, UPCAST, IEEE, KV_FP8)
    if full_end < end:
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, q_pos, k_base, v_base, bt_row, full_end, end, qk_scale,
                                   stride_kb, stride_ks, stride_vb, stride_vs, offs_d,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, False, UPCAST, IEEE, KV_FP8)

    if KV_FP8:
        acc = acc * tl.load(vs_ptr)  # the output of the dequantised values
    st_mask = g_ok[:, None] & d_ok[None, :]
    o_ptrs = out_ptr + tok.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    if DIRECT:
        o = acc / l_i[:, None]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=st_mask)
    else:
        num_heads = tl.num_programs(1) * GROUP
        row = b.to(tl.int64) * num_heads + heads  # [BLOCK_H] (request, head) rows of the workspace
        n_active = tl.cdiv(n_tiles, tiles_per_split)
        store_split_and_merge(acc, l_i, m_i, ws_ptr, lse_off, row, offs_d, num_splits, sp, n_active,
                              cnt_ptr + b * tl.num_programs(1) + kvh, o_ptrs, g_ok, st_mask, HEAD_DIM,
                              BLOCK_H, BLOCK_D)


# --------------------------------------------------------------------------------------------------
# prefill / extend
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_q_tiles", "stride_bt"])
def _extend_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, ks_ptr, vs_ptr,
    qk_scale, num_q_tiles,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    SKIP_DECODE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    q_tile = num_q_tiles - 1 - tl.program_id(0)  # heaviest (latest) query tiles first
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if SKIP_DECODE:
        if q_len == 1:
            return  # the decode kernel owns it
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_local = q_tile * BLOCK_Q + rows // GROUP_PAD
    g = rows % GROUP_PAD
    heads = kvh * GROUP + g
    row_ok = (q_local < q_len) & (g < GROUP)
    q_pos = prefix + q_local
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tok = (q_start + q_local).to(tl.int64)
    o_ptrs = out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    if prefix < 0:  # a context shorter than its query: padding (CUDA-graph batch slot, context 0), zeros
        tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        return
    q_ptrs = q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    elif not KV_FP8:
        q = q.to(kc_ptr.dtype.element_ty)  # dots run in the cache dtype (FP8 caches: in q's)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(ks_ptr)  # scores of the dequantised keys

    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_base = kc_ptr + kvh * stride_kh
    v_base = vc_ptr + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # keys before the tile's first query are visible to every row of the tile: no masks
    first_q = prefix + q_tile * BLOCK_Q
    kv_end = tl.minimum(seq_len, prefix + tl.minimum((q_tile + 1) * BLOCK_Q, q_len))
    free_end = (first_q // BLOCK_N) * BLOCK_N
    for start_n in range(0, free_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, q_pos, k_base, v_base, bt_row, start_n, kv_end, qk_scale,
                                   stride_kb, stride_ks, stride_vb, stride_vs, offs_d,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, False, True, UPCAST, IEEE, KV_FP8)
    for start_n in range(free_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, q_pos, k_base, v_base, bt_row, start_n, kv_end, qk_scale,
                                   stride_kb, stride_ks, stride_vb, stride_vs, offs_d,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, True, UPCAST, IEEE, KV_FP8)

    if KV_FP8:
        acc = acc * tl.load(vs_ptr)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------

_INTERPRET = type(_store_kv_kernel).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=None)
def _default_config(head_dim: int, itemsize: int, interpret: bool) -> dict:
    if interpret:
        return dict(decode_block_n=16, decode_warps=4, decode_stages=1,
                    extend_block_m=32, extend_block_n=16, extend_warps=4, extend_stages=1)
    if itemsize >= 4:  # float32: IEEE fp32 FMA dots, smaller tiles
        return dict(decode_block_n=32, decode_warps=4, decode_stages=2,
                    extend_block_m=64 if head_dim <= 64 else 32, extend_block_n=32, extend_warps=4,
                    extend_stages=2)
    if head_dim <= 128:
        return dict(decode_block_n=64, decode_warps=4, decode_stages=3,
                    extend_block_m=128, extend_block_n=64, extend_warps=4, extend_stages=3)
    return dict(decode_block_n=32, decode_warps=4, decode_stages=2,
                extend_block_m=64, extend_block_n=32, extend_warps=8, extend_stages=2)


class _Plan:
    """Launch constants for one (dtypes, heads, head_dim, page, device, config) combination."""

    def __init__(self, q_dtype, kv_dtype, num_heads, num_kv_heads, head_dim, kv_head_dim, page, device_index,
                 config):
        if num_heads % num_kv_heads or head_dim != kv_head_dim:
            raise ValueError(f"q heads {num_heads} x {head_dim} vs kv heads {num_kv_heads} x {kv_head_dim}")
        itemsize = max(torch.empty((), dtype=q_dtype).element_size(), torch.empty((), dtype=kv_dtype).element_size())
        cfg = dict(_default_config(head_dim, itemsize, _INTERPRET))
        cfg.update(config)
        self.group = num_heads // num_kv_heads
        self.block_d = triton.next_power_of_2(head_dim)
        self.page = page
        self.head_dim = head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.upcast = _INTERPRET  # the interpreter mishandles bf16 arithmetic and bf16 dots
        self.kv_fp8 = is_fp8(kv_dtype)
        compute = q_dtype if self.kv_fp8 else kv_dtype  # FP8 tiles are converted to q's dtype
        self.ieee = _INTERPRET or compute == torch.float32  # no TF32 for float32 dots
        self.num_sms = num_sms(device_index)
        # decode: the GQA group padded to >= 16 rows (tl.dot's minimum M)
        self.block_h = max(16, triton.next_power_of_2(self.group))
        self.decode_block_n = cfg["decode_block_n"]
        self.decode_warps, self.decode_stages = cfg["decode_warps"], cfg["decode_stages"]
        # extend: BLOCK_M rows = BLOCK_Q query tokens x the (padded) GQA group
        self.group_pad = triton.next_power_of_2(self.group)
        self.block_m = max(cfg["extend_block_m"], self.group_pad, 16)
        self.block_q = self.block_m // self.group_pad
        self.extend_block_n = cfg["extend_block_n"]
        self.extend_warps, self.extend_stages = cfg["extend_warps"], cfg["extend_stages"]


@functools.lru_cache(maxsize=256)
def _plan(q_dtype, kv_dtype, num_heads, num_kv_heads, head_dim, kv_head_dim, page, device_index,
          config_items) -> _Plan:
    return _Plan(q_dtype, kv_dtype, num_heads, num_kv_heads, head_dim, kv_head_dim, page, device_index,
                 dict(config_items))


def _get_plan(q: torch.Tensor, k_cache: torch.Tensor, config: dict | None) -> _Plan:
    _, num_heads, head_dim = q.shape
    _, page, num_kv_heads, kv_head_dim = k_cache.shape
    dev = q.device
    return _plan(q.dtype, k_cache.dtype, num_heads, num_kv_heads, head_dim, kv_head_dim, page,
                 dev.index if dev.type == "cuda" else None, tuple(sorted(config.items())) if config else ())


# --------------------------------------------------------------------------------------------------
# host entry points
# --------------------------------------------------------------------------------------------------


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, out: torch.Tensor, *, mixed: bool = False, num_splits: int | None = None,
                 config: dict | None = None, plan: _Plan | None = None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention for the query_len == 1 rows of the batch into `out` ([T, H, D]), one launch.

    With mixed=False every row must be a decode; with mixed=True other rows are left untouched.
    FP8 caches are read with k_scale / v_scale (float32 scalar tensors; 1.0 when None).
    """
    p = plan or _get_plan(q, k_cache, config)
    k_sc, v_sc = kv_scale_args(k_cache, k_scale, v_scale)
    num_seqs = len(meta.seq_lens_cpu)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, p.num_kv_heads, meta.max_seq_len, p.decode_block_n, p.num_sms)
    if num_splits == 1:
        ws = cnt = out  # unused
        lse_off = 0
    else:
        rows = num_seqs * p.num_heads * num_splits
        ws = torch.empty(rows * (p.head_dim + 1), dtype=torch.float32, device=q.device)
        lse_off = rows * p.head_dim
        cnt = split_counters(q.device, num_seqs * p.num_kv_heads)
    qs, ks, vs, os_ = q.stride(), k_cache.stride(), v_cache.stride(), out.stride()
    _decode_split_kernel[(num_seqs, p.num_kv_heads, num_splits)](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, ws, cnt, k_sc, v_sc,
        scale * LOG2E, num_splits, lse_off,
        qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        meta.block_tables.stride(0), os_[0], os_[1],
        GROUP=p.group, BLOCK_H=p.block_h, HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_N=p.decode_block_n,
        PAGE=p.page, DIRECT=num_splits == 1, MIXED=mixed, UPCAST=p.upcast, IEEE=p.ieee, KV_FP8=p.kv_fp8,
        num_warps=p.decode_warps, num_stages=p.decode_stages,
    )
    return out


def paged_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, out: torch.Tensor, *, skip_decode: bool = False,
                 config: dict | None = None, plan: _Plan | None = None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal varlen attention over the paged context (cached prefix included) into `out`.

    Handles every row, query_len == 1 included, unless skip_decode (then those rows are left to
    `paged_decode(..., mixed=True)`). FP8 caches are read with k_scale / v_scale.
    """
    p = plan or _get_plan(q, k_cache, config)
    k_sc, v_sc = kv_scale_args(k_cache, k_scale, v_scale)
    num_q_tiles = -(-meta.max_query_len // p.block_q)
    qs, ks, vs, os_ = q.stride(), k_cache.stride(), v_cache.stride(), out.stride()
    _extend_kernel[(num_q_tiles, len(meta.seq_lens_cpu), p.num_kv_heads)](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, k_sc, v_sc,
        scale * LOG2E, num_q_tiles,
        qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        meta.block_tables.stride(0), os_[0], os_[1],
        GROUP=p.group, GROUP_PAD=p.group_pad, BLOCK_M=p.block_m,
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_N=p.extend_block_n, PAGE=p.page,
        SKIP_DECODE=skip_decode, UPCAST=p.upcast, IEEE=p.ieee, KV_FP8=p.kv_fp8,
        num_warps=p.extend_warps, num_stages=p.extend_stages,
    )
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, *, out: torch.Tensor | None = None, num_splits: int | None = None,
                    config: dict | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q [T, H, D] over each request's paged context -> [T, H, D] (q's dtype).

    Decode-only batches (max_query_len == 1) take the split-KV decode kernel; batches with longer
    rows run the extend kernel on them and, if query_len == 1 rows are present too, the decode
    kernel on those. Launch sizes come from the host-side metadata only (no device syncs).
    An FP8 cache (float8_e4m3fn) is read with the layer's k_scale / v_scale.
    """
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0 or not meta.seq_lens_cpu:
        return out
    p = _get_plan(q, k_cache, config)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if meta.max_query_len == 1:
        return paged_decode(q, k_cache, v_cache, meta, scale, out, num_splits=num_splits, plan=p, **scales)
    has_decode = 1 in meta.query_lens_cpu
    paged_extend(q, k_cache, v_cache, meta, scale, out, skip_decode=has_decode, plan=p, **scales)
    if has_decode:
        paged_decode(q, k_cache, v_cache, meta, scale, out, mixed=True, num_splits=num_splits, plan=p, **scales)
    return out


__all__ = ["store_kvcache", "paged_attention", "paged_decode", "paged_extend", "choose_num_splits",
           "interpret_mode"]
