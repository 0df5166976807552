"""Triton kernels for multi-head latent attention (MLA: DeepSeek-V2/V3, Kimi-K2) over the paged
latent cache, and the host logic that picks a path per request (see docs/mla.md).

Cache: per layer [num_blocks, block_size, 1, kv_lora_rank + rope_dim]; one row per token holds
`[c_kv | rotated k_pe]`, shared by every head (MLA is MQA in latent space).

Absorbed attention (decode, short extends): with W_UK/W_UV the per-head k_nope/v slices of
kv_b_proj (k_nope = W_UK c_kv, v = W_UV c_kv),
    q_lat   = q_nope W_UK                                    [T, H, kv_lora_rank]
    score   = (q_lat . c_kv + q_pe . k_pe) * scale           (= q . k of the expanded model)
    out_lat = softmax(score) c_kv                            [T, H, kv_lora_rank]
    out     = out_lat W_UV^T                                 [T, H, v_head_dim]
so the kernel reads the latent rows once for all heads and never expands them.

Kernels:
  _store_latent_kernel  scatter this step's latent rows into the cache (slot < 0: skip, CUDA-graph
                        padding)
  _mla_decode_kernel    split-KV flash-decoding of the absorbed form. Grid (row x head tile,
                        split): a "row" is one query token with its own context length (its
                        request's seq_len for a decode, prefix + i + 1 for token i of an extend),
                        BLOCK_H query heads share the M tile of the dots (all heads read the same
                        latent "kv head"), the whole latent width is one tile (acc [BLOCK_H,
                        kv_lora_rank] in float32). Splits write normalised partials + log2-sum-exp;
                        the split that arrives last merges them (an arrival counter per (row, head
                        tile), reset by the merger) -- one launch, as the GQA decode kernel in
                        attention/paged_attention_triton.py does (kernels/split_kv_triton.py).

Prefill / long extends use the non-absorbed form (expand the context through kv_b_proj, then
the expanded extend kernel of mla_extend_triton.py): see ABSORB_MAX_QUERY_LEN for the cost model.

FP8 latent caches (float8_e4m3fn, kernels/kv_quant.py; one scale per layer for c_kv and k_pe):
the write stores latent / kv_scale; the decode kernel converts each latent tile to the query's
dtype for the dots and multiplies the scores and the output by kv_scale (the latent is both K and
V); the expanded path dequantises the rows it gathers.

Under TRITON_INTERPRET=1 loaded values are upcast to float32 (the interpreter of triton 3.x gets
bf16 arithmetic and bf16 dots wrong), as in attention/paged_attention_triton.py.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from dlengine.kernels.common import num_sms
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.kv_quant import from_cache, is_fp8
from dlengine.kernels.kv_quant_triton import quantize_fp8
from dlengine.kernels.mla import mla_decode_gluon as gluon_mla
from dlengine.kernels.mla.mla_extend_triton import mla_extend
from dlengine.kernels.mla.mla_torch import MLAWeights, absorb_query, latent_to_v
from dlengine.kernels.split_kv_triton import choose_num_splits, split_counters, store_split_and_merge

LOG2E = 1.4426950408889634

# Per request, queries of at most this many tokens run absorbed (one kernel row per token, the
# latent context is read from L2/HBM per token row); longer ones expand their context. Cost per
# request at DeepSeek-V3 dims (H=128, C=512, nope=rope*2=128, v=128), context S, q new tokens:
#   expand  = 2*S*C*H*(nope+v) = 33.5 MFLOP * S       (a dense GEMM, once per request)
#   absorbed attention     2*q*S*H*(C+rope + C) = 0.28 MFLOP * q*S
#   non-absorbed attention 2*q*S*H*(nope+rope + v) = 0.08 MFLOP * q*S
# -> absorbing wins below q ~ 170 on FLOPs; the absorbed rows do not share key tiles between
# tokens of one request, so the crossover is set lower, where the re-reads stay cheap.
ABSORB_MAX_QUERY_LEN = 32

# The expanded path materialises [S, H, nope + v] for the S context rows of its requests (64 KB
# a row at DeepSeek-V3 dims), which the memory plan does not budget for long contexts. Expanded
# requests run in groups of at most this many context rows (~1 GB transient at 16k); a single
# request with a longer context runs absorbed instead (more FLOPs, no expansion).
EXPAND_MAX_CONTEXT = 16384

# Tiles of the decode kernel on GPUs (bf16/fp16). The acc [BLOCK_H, kv_lora_rank] fp32 lives in
# registers: BLOCK_H=32 x 512 over 8 warps is 64 registers a thread. Override per call with
# `config=` (scripts/gpu_check_mla.py --configs sweeps a few).
# best of the H100 tile sweep at batch 64 x 8k (scripts/gpu_check_mla.py; docs/performance.md): BLOCK_H 64
# lets Triton use Hopper's wgmma; BLOCK_N 128 exceeds shared memory
DECODE_DEFAULTS = dict(block_h=64, block_n=64, num_warps=8, num_stages=2)
DECODE_DEFAULTS_FP32 = dict(block_h=16, block_n=16, num_warps=4, num_stages=1)
DECODE_DEFAULTS_INTERPRET = dict(block_h=16, block_n=16, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------------------
# latent cache write
# --------------------------------------------------------------------------------------------------


@triton.jit
def _store_latent_kernel(src_ptr, cache_ptr, slot_ptr, scale_ptr, stride_st, stride_cb, stride_cs,
                         WIDTH: tl.constexpr, BLOCK: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (offs < WIDTH) & ((offs * 0 + slot) >= 0)  # tensor-shaped slot test (interpreter)
    row = tl.load(src_ptr + t.to(tl.int64) * stride_st + offs, mask=mask)
    if QUANT:  # FP8 cache: latent / scale, saturated and rounded
        row = quantize_fp8(row.to(tl.float32), tl.load(scale_ptr))
    dst = cache_ptr + (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + offs
    tl.store(dst, row.to(cache_ptr.dtype.element_ty), mask=mask)


def _scale_arg(cache: torch.Tensor, kv_scale: torch.Tensor | None) -> torch.Tensor:
    """The scale pointer a kernel takes: kv_scale for an FP8 cache (1.0 when None), else unused."""
    if not is_fp8(cache.dtype):
        return cache
    return kv_scale if kv_scale is not None else torch.ones((), dtype=torch.float32, device=cache.device)


def store_latent(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                 kv_scale: torch.Tensor | None = None) -> None:
    """latent [T, kv_lora_rank + rope_dim] -> cache [N, block_size, 1, width] at slot_mapping[t];
    rows with a negative slot are skipped (capturable: no host syncs). An FP8 cache stores
    latent / kv_scale (a float32 scalar tensor; 1.0 when None)."""
    if latent.shape[0] == 0:
        return
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    width = cache.shape[-1]
    _store_latent_kernel[(latent.shape[0],)](
        latent, cache, slot_mapping, _scale_arg(cache, kv_scale), latent.stride(0), cache.stride(0), cache.stride(1),
        WIDTH=width, BLOCK=triton.next_power_of_2(width), PAGE=cache.shape[1], QUANT=is_fp8(cache.dtype),
        num_warps=4)


# --------------------------------------------------------------------------------------------------
# absorbed split-KV decode
# --------------------------------------------------------------------------------------------------


@triton.jit
def _softmax_step(s, n_ok, acc, l_i, m_i, qk_scale, BOUND: tl.constexpr):
    """Online softmax over one key tile: scores s [H, N] (masked to n_ok when BOUND) -> the tile's
    probabilities p, the rescaled accumulator, l and the new running max (log2 domain)."""
    s = s * qk_scale  # log2 domain
    if BOUND:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, acc * alpha[:, None], l_i, m_new


@triton.jit
def _mla_tile(acc, l_i, m_i, q_lat, q_pe, cache_ptr, bt_row, start_n, kv_end, qk_scale,
              stride_cb, stride_cs, offs_c, offs_r,
              KV_LORA: tl.constexpr, BLOCK_C: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_N: tl.constexpr, PAGE: tl.constexpr, BOUND: tl.constexpr, UPCAST: tl.constexpr,
              IEEE: tl.constexpr, KV_FP8: tl.constexpr):
    """Fold latent rows [start_n, start_n + BLOCK_N) into (acc, l_i, m_i); BOUND masks rows >= kv_end."""
    pos = start_n + tl.arange(0, BLOCK_N)
    n_ok = pos < kv_end
    if BOUND:
        blk = tl.load(bt_row + pos // PAGE, mask=n_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + pos // PAGE).to(tl.int64)
    row = cache_ptr + blk * stride_cb + (pos % PAGE) * stride_cs  # [BLOCK_N] row starts
    c_mask = offs_c[None, :] < KV_LORA
    r_mask = offs_r[:, None] < ROPE
    if BOUND:
        c_mask = c_mask & n_ok[:, None]
        r_mask = r_mask & n_ok[None, :]
    ckv = tl.load(row[:, None] + offs_c[None, :], mask=c_mask, other=0.0)  # [BLOCK_N, BLOCK_C]
    kpe_t = tl.load(row[None, :] + KV_LORA + offs_r[:, None], mask=r_mask, other=0.0)  # [BLOCK_R, BLOCK_N]
    if UPCAST:
        ckv = ckv.to(tl.float32)
        kpe_t = kpe_t.to(tl.float32)
    elif KV_FP8:  # dots run in the query's dtype; the scale is folded in by the caller
        ckv = ckv.to(q_lat.dtype)
        kpe_t = kpe_t.to(q_lat.dtype)
    if IEEE:
        s = tl.dot(q_lat, tl.trans(ckv), input_precision="ieee")
        s = tl.dot(q_pe, kpe_t, s, input_precision="ieee")
    else:
        s = tl.dot(q_lat, tl.trans(ckv))
        s = tl.dot(q_pe, kpe_t, s)
    p, acc, l_i, m_new = _softmax_step(s, n_ok, acc, l_i, m_i, qk_scale, BOUND)
    if IEEE:
        acc = tl.dot(p, ckv, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(ckv.dtype), ckv, acc)
    return acc, l_i, m_new


# ints whose divisibility changes from step to step must not be specialised on (==1, %16): a new
# class would JIT-compile. The q / out strides (T * dims) keep theirs, and knowing them multiples of
# 16 lets the query loads and output stores move 16 B at a time instead of 2
@triton.jit(do_not_specialize=["num_splits", "lse_off", "stride_bt"])
def _mla_decode_kernel(
    qlat_ptr, qpe_ptr, cache_ptr, bt_ptr, row_tok_ptr, row_len_ptr, row_req_ptr, out_ptr, ws_ptr, cnt_ptr,
    scale_ptr, qk_scale, num_splits, lse_off,
    stride_ql_t, stride_ql_h, stride_qp_t, stride_qp_h,
    stride_cb, stride_cs, stride_bt, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_TILES: tl.constexpr,
    KV_LORA: tl.constexpr, BLOCK_C: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, ROW_REQ: tl.constexpr, DIRECT: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Grid (row x head tile, split), head tiles of a row adjacent so that they run together and
    share the row's latent tiles through L2 (the latent context is read from HBM once). Row r is query token row_tok[r] attending the first
    row_len[r] context rows of request row_req[r] (r itself without ROW_REQ: decode batches pass
    query_start_loc and seq_lens). out [.., token, head, KV_LORA] by strides. With splits, ws holds
    [rows, H, splits, KV_LORA] partials then [rows, H, splits] lse at lse_off."""
    pid = tl.program_id(0)
    r = pid // HEAD_TILES
    ht = pid % HEAD_TILES
    sp = tl.program_id(1)
    tok = tl.load(row_tok_ptr + r).to(tl.int64)
    seq_len = tl.load(row_len_ptr + r)
    if ROW_REQ:
        b = tl.load(row_req_ptr + r).to(tl.int64)
    else:
        b = r.to(tl.int64)
    heads = ht * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < NUM_HEADS
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < KV_LORA
    st_mask = h_ok[:, None] & c_ok[None, :]
    o_ptrs = out_ptr + tok * stride_ot + heads[:, None] * stride_oh + offs_c[None, :]

    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    start = sp * tiles_per_split * BLOCK_N
    if start >= seq_len:
        if seq_len == 0:
            if sp == 0:  # padding row (CUDA-graph batch slot): defined output, zeros
                tl.store(o_ptrs, tl.zeros([BLOCK_H, BLOCK_C], dtype=out_ptr.dtype.element_ty), mask=st_mask)
        return  # empty split: not counted in n_active below
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    full_end = start + ((end - start) // BLOCK_N) * BLOCK_N

    q_row = qlat_ptr + tok * stride_ql_t + heads[:, None] * stride_ql_h
    q_lat = tl.load(q_row + offs_c[None, :], mask=st_mask, other=0.0)
    q_pe = tl.load(qpe_ptr + tok * stride_qp_t + heads[:, None] * stride_qp_h + offs_r[None, :],
                   mask=h_ok[:, None] & (offs_r[None, :] < ROPE), other=0.0)
    if UPCAST:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    elif KV_FP8:  # dots run in the query's dtype (the latent tiles are converted to it)
        q_pe = q_pe.to(q_lat.dtype)
    else:  # dots run in the cache dtype
        q_lat = q_lat.to(cache_ptr.dtype.element_ty)
        q_pe = q_pe.to(cache_ptr.dtype.element_ty)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(scale_ptr)  # scores of the dequantised latent

    bt_row = bt_ptr + b * stride_bt
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    for start_n in range(start, full_end, BLOCK_N):
        acc, l_i, m_i = _mla_tile(acc, l_i, m_i, q_lat, q_pe, cache_ptr, bt_row, start_n, end, qk_scale,
                                  stride_cb, stride_cs, offs_c, offs_r, KV_LORA, BLOCK_C, ROPE, BLOCK_R,
                                  BLOCK_N, PAGE, False, UPCAST, IEEE, KV_FP8)
    if full_end < end:
        acc, l_i, m_i = _mla_tile(acc, l_i, m_i, q_lat, q_pe, cache_ptr, bt_row, full_end, end, qk_scale,
                                  stride_cb, stride_cs, offs_c, offs_r, KV_LORA, BLOCK_C, ROPE, BLOCK_R,
                                  BLOCK_N, PAGE, True, UPCAST, IEEE, KV_FP8)

    if KV_FP8:
        acc = acc * tl.load(scale_ptr)  # the latent is the value too
    if DIRECT:
        tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=st_mask)
    else:
        ws_row = r.to(tl.int64) * NUM_HEADS + heads  # [BLOCK_H] (row, head) rows of the workspace
        # one counter per (row, head tile)
        store_split_and_merge(acc, l_i, m_i, ws_ptr, lse_off, ws_row, offs_c, num_splits, sp,
                              tl.cdiv(n_tiles, tiles_per_split), cnt_ptr + pid, o_ptrs, h_ok, st_mask,
                              KV_LORA, BLOCK_H, BLOCK_C)


_INTERPRET = type(_mla_decode_kernel).__name__ == "InterpretedFunction"


def interpret_mode() -> bool:
    return _INTERPRET


def decode_config(cache_dtype: torch.dtype, config: dict | None = None) -> dict:
    if _INTERPRET:
        cfg = dict(DECODE_DEFAULTS_INTERPRET)
    elif cache_dtype == torch.float32:
        cfg = dict(DECODE_DEFAULTS_FP32)
    else:
        cfg = dict(DECODE_DEFAULTS)
    cfg.update(config or {})
    return cfg


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
               row_tok: torch.Tensor, row_len: torch.Tensor, out_lat: torch.Tensor, scale: float, *,
               max_seq_len: int, row_req: torch.Tensor | None = None, num_splits: int | None = None,
               config: dict | None = None, kernel: str = "auto", kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA for len(row_len) query rows into out_lat, one launch.

    q_lat / out_lat [T, H, kv_lora_rank] and q_pe [T, H, rope] are indexed by strides (any
    layout with unit stride on the last dim, e.g. transposed [H, T, C] bmm outputs). Row r is
    token row_tok[r] attending the first row_len[r] cached rows of block-table row row_req[r]
    (or r). `max_seq_len` (host) only sizes the split count; correctness never depends on it.

    kernel: "triton" (this file), "gluon" (mla_decode_gluon.py: Hopper, DeepSeek dims, bf16/fp16
    cache, one row per request, no tile config; ValueError elsewhere) or "auto": gluon
    where it applies, else triton. An FP8 cache is read with kv_scale (1.0 when None)."""
    num_rows = row_len.shape[0]
    _, num_heads, kv_lora = q_lat.shape
    rope = q_pe.shape[-1]
    if num_rows == 0:
        return out_lat
    assert cache.shape[-1] == kv_lora + rope and cache.shape[2] == 1, (cache.shape, kv_lora, rope)
    if kernel not in ("auto", "triton", "gluon"):
        raise ValueError(f"unknown MLA decode kernel {kernel!r}: 'auto', 'triton' or 'gluon'")
    if kernel != "triton":
        if _INTERPRET:
            why = "does not run under TRITON_INTERPRET (Gluon has no CPU interpreter)"
        else:
            why = gluon_mla.supported(q_lat.device, cache.dtype, kv_lora, rope) or gluon_mla.cache_layout_problem(cache)
        if why is None and row_req is not None:
            why = "runs decode rows only (one query token per request)"
        if why is None and config is not None:
            why = "takes no Triton tile config"
        if why is None:
            return gluon_mla.mla_decode_gluon(q_lat, q_pe, cache, block_tables, row_tok, row_len, out_lat, scale,
                                              max_seq_len=max_seq_len, num_splits=num_splits)
        if kernel == "gluon":
            raise ValueError(f"the gluon MLA decode kernel {why}")
    kv_fp8 = is_fp8(cache.dtype)
    compute = q_lat.dtype if kv_fp8 else cache.dtype  # what the dots run in
    cfg = decode_config(compute, config)
    block_h = min(cfg["block_h"], max(16, triton.next_power_of_2(num_heads)))
    head_tiles = -(-num_heads // block_h)
    dev = q_lat.device
    if num_splits is None:
        num_splits = choose_num_splits(num_rows, head_tiles, max_seq_len, cfg["block_n"],
                                       num_sms(dev.index if dev.type == "cuda" else None))
    if num_splits == 1:
        ws = cnt = out_lat  # unused
        lse_off = 0
    else:
        n = num_rows * num_heads * num_splits
        ws = torch.empty(n * (kv_lora + 1), dtype=torch.float32, device=dev)
        lse_off = n * kv_lora
        cnt = split_counters(dev, num_rows * head_tiles)
    qls, qps, os_ = q_lat.stride(), q_pe.stride(), out_lat.stride()
    _mla_decode_kernel[(num_rows * head_tiles, num_splits)](
        q_lat, q_pe, cache, block_tables, row_tok, row_len, row_req if row_req is not None else row_len,
        out_lat, ws, cnt, _scale_arg(cache, kv_scale), scale * LOG2E, num_splits, lse_off,
        qls[0], qls[1], qps[0], qps[1], cache.stride(0), cache.stride(1), block_tables.stride(0), os_[0], os_[1],
        NUM_HEADS=num_heads, BLOCK_H=block_h, HEAD_TILES=head_tiles, KV_LORA=kv_lora,
        BLOCK_C=triton.next_power_of_2(kv_lora),
        ROPE=rope, BLOCK_R=max(16, triton.next_power_of_2(rope)), BLOCK_N=cfg["block_n"], PAGE=cache.shape[1],
        ROW_REQ=row_req is not None, DIRECT=num_splits == 1,
        UPCAST=_INTERPRET, IEEE=_INTERPRET or compute == torch.float32, KV_FP8=kv_fp8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out_lat


# --------------------------------------------------------------------------------------------------
# whole-layer attention: path choice per request
# --------------------------------------------------------------------------------------------------


def _absorbed(q_nope, q_pe, cache, w: MLAWeights, scale, config, num_splits, kernel="auto", kv_scale=None,
              **rows) -> torch.Tensor:
    """q_lat = q_nope W_UK ([H, T, C] from one batched GEMM), the decode kernel over `rows`, then
    out_lat W_UV^T -> [T, H, v] (rows not covered by `rows` hold garbage)."""
    q_lat = absorb_query(q_nope, w)  # [T, H, C] view of [H, T, C]
    out_lat = torch.empty_like(q_lat.transpose(0, 1)).transpose(0, 1)  # same layout: the W_UV GEMM reads it as is
    mla_decode(q_lat, q_pe, cache, out_lat=out_lat, scale=scale, num_splits=num_splits, config=config, kernel=kernel,
               kv_scale=kv_scale, **rows)
    return latent_to_v(out_lat, w)  # [T, H, v]


def _expanded(q_nope, q_pe, cache, meta: AttentionMetadata, w: MLAWeights, scale, reqs: list[int],
              qsl: np.ndarray, kv_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-absorbed MLA for requests `reqs`: gather their latent contexts (cached prefix included)
    into rows, expand c_kv through kv_b_proj into [S, H, nope + v] (k_nope and v are views of it)
    and run the expanded extend kernel with the shared k_pe rows. Returns (token indices,
    out [len, H, v]). FP8 latent rows are dequantised (x kv_scale) into q's dtype as they are gathered."""
    dev = q_nope.device
    page = cache.shape[1]
    c = cache.shape[-1] - q_pe.shape[-1]
    seq = [meta.seq_lens_cpu[i] for i in reqs]
    qlen = [meta.query_lens_cpu[i] for i in reqs]
    req_of_row = np.repeat(np.asarray(reqs, dtype=np.int64), seq)
    pos = np.concatenate([np.arange(s, dtype=np.int64) for s in seq])
    tok = np.concatenate([np.arange(qsl[i], qsl[i + 1], dtype=np.int64) for i in reqs])
    req_t, pos_t, tok_t = (torch.from_numpy(a).to(dev, non_blocking=True) for a in (req_of_row, pos, tok))
    slots = meta.block_tables[req_t, pos_t // page].long() * page + pos_t % page
    latent = cache.view(-1, cache.shape[-1])[slots]  # [S, C + R]
    if is_fp8(latent.dtype):
        latent = from_cache(latent, kv_scale).to(q_nope.dtype)
    h, nope, vd = w.num_heads, w.qk_nope_head_dim, w.v_head_dim
    kv = torch.nn.functional.linear(latent[:, :c].to(w.kv_b.dtype), w.kv_b).view(-1, h, nope + vd)
    small = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int32)).to(dev)  # noqa: E731
    out = q_nope.new_empty(len(tok), h, vd)
    mla_extend(q_nope[tok_t], q_pe[tok_t], kv[..., :nope], latent[:, c:], kv[..., nope:],
               small(np.concatenate([[0], np.cumsum(qlen)])), small(seq), small(np.concatenate([[0], np.cumsum(seq)[:-1]])),
               max(qlen), scale, out)
    return tok_t, out


def uniform_rows(meta: AttentionMetadata, num_tokens: int) -> dict:
    """The absorbed kernel's rows for a batch where every request owns `meta.uniform_query_len` = q
    consecutive query tokens (CUDA-graph verify steps: 1 + k tokens a request), built on the device
    so that a graph captures them (the host lists hold placeholders there): token t is request
    t // q's query t % q, at context position seq_len - q + t % q, so it attends the first
    seq_len - q + 1 + t % q latent rows; a padding request (seq_len 0) attends none (zeros)."""
    q = meta.uniform_query_len
    tok = torch.arange(num_tokens, dtype=torch.int32, device=meta.seq_lens.device)
    req = tok // q
    lens = (meta.seq_lens[req] - q + 1 + tok % q).clamp_(min=0).to(torch.int32)
    return dict(block_tables=meta.block_tables, row_tok=tok, row_len=lens, row_req=req, max_seq_len=meta.max_seq_len)


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                  weights: MLAWeights, scale: float, *, config: dict | None = None,
                  num_splits: int | None = None, absorb_max_query_len: int = ABSORB_MAX_QUERY_LEN,
                  expand_max_context: int = EXPAND_MAX_CONTEXT, decode_kernel: str = "auto",
                  kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """MLA of q_nope [T, H, nope], q_pe [T, H, rope] (rotated) over the paged latent cache ->
    [T, H, v_head_dim]. The cache already holds this step's latents.

    Decode-only batches (CUDA graphs included): one absorbed launch, rows = requests, no host
    work. Batches with `meta.uniform_query_len` (CUDA-graph verify steps, 1 + k tokens a
    request): one absorbed launch of the Triton kernel, a row per token, the rows built on the
    device (`uniform_rows`), no host work. Otherwise requests with query_len <=
    absorb_max_query_len (or a context longer than expand_max_context) run absorbed (one row per token, context = prefix + its position + 1),
    the others non-absorbed (`_expanded`), in groups of at most expand_max_context context rows.
    `decode_kernel` ("auto" / "triton" / "gluon", see mla_decode) runs the decode-only launch; the
    absorbed rows of extends (several rows a request: `row_req`) always run the Triton kernel.
    An FP8 latent cache is read with kv_scale (float32 scalar tensor; 1.0 when None)."""
    num_tokens = q_nope.shape[0]
    if num_tokens == 0 or not meta.seq_lens_cpu:
        return q_nope.new_zeros(num_tokens, weights.num_heads, weights.v_head_dim)
    if meta.max_query_len == 1:
        return _absorbed(q_nope, q_pe, cache, weights, scale, config, num_splits, decode_kernel, kv_scale,
                         block_tables=meta.block_tables, row_tok=meta.query_start_loc, row_len=meta.seq_lens,
                         max_seq_len=meta.max_seq_len)
    if meta.uniform_query_len is not None:  # a captured verify step: its rows come from device metadata
        return _absorbed(q_nope, q_pe, cache, weights, scale, config, num_splits, "triton", kv_scale,
                         **uniform_rows(meta, num_tokens))
    qsl = np.concatenate([[0], np.cumsum(meta.query_lens_cpu)])
    expand = [ql > absorb_max_query_len and sl <= expand_max_context
              for ql, sl in zip(meta.query_lens_cpu, meta.seq_lens_cpu)]
    short = [i for i, e in enumerate(expand) if not e]
    long_ = [i for i, e in enumerate(expand) if e]
    if short:
        toks = np.concatenate([np.arange(qsl[i], qsl[i + 1]) for i in short]).astype(np.int32)
        lens = np.concatenate([np.arange(meta.seq_lens_cpu[i] - meta.query_lens_cpu[i] + 1,
                                         meta.seq_lens_cpu[i] + 1) for i in short]).astype(np.int32)
        reqs = np.repeat(np.asarray(short, dtype=np.int32), [meta.query_lens_cpu[i] for i in short])
        dev = q_nope.device
        out = _absorbed(q_nope, q_pe, cache, weights, scale, config, num_splits,
                        "triton", kv_scale, block_tables=meta.block_tables, row_tok=torch.from_numpy(toks).to(dev),
                        row_len=torch.from_numpy(lens).to(dev), row_req=torch.from_numpy(reqs).to(dev),
                        max_seq_len=max(meta.seq_lens_cpu[i] for i in short))
    else:
        out = q_nope.new_empty(num_tokens, weights.num_heads, weights.v_head_dim)
    if long_:
        out = out.contiguous()
        group: list[int] = []
        for j, i in enumerate(long_):
            group.append(i)
            nxt = long_[j + 1] if j + 1 < len(long_) else None
            rows = sum(meta.seq_lens_cpu[k] for k in group)
            if nxt is None or rows + meta.seq_lens_cpu[nxt] > expand_max_context:
                tok, part = _expanded(q_nope, q_pe, cache, meta, weights, scale, group, qsl, kv_scale)
                out[tok] = part.to(out.dtype)
                group = []
    return out


__all__ = ["store_latent", "mla_decode", "mla_attention", "uniform_rows", "MLAWeights", "ABSORB_MAX_QUERY_LEN",
           "DECODE_DEFAULTS", "interpret_mode"]
