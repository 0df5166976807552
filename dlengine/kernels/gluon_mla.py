"""Hopper (sm_90) MLA decode kernel in Gluon, Triton's lower-level dialect (explicit layouts,
shared memory and asynchronous warpgroup MMAs), used for absorbed MLA decode at DeepSeek's
dims (kv_lora_rank 512, rope 64, bf16/fp16 latent cache) when it imports; see docs/mla.md.

Why not the plain Triton kernel (triton_mla.py): its compiler gives a 64-head x 512 tile's two
chained dots the same warp layout, so both warp groups compute the whole [64 heads x 64 keys]
score tile (the QK product, 53% of the FLOPs, runs twice) and the program spills registers
(255 + a stack frame). Here the layouts are chosen by hand, as FlashMLA does:

  scores  S [64 heads, 64 keys]  = Q [64, 512 | 64] . K^T   warps [4, 2]: each warp group owns
                                                              32 keys (no duplicated work)
  output  O [64 heads, 512]     += P [64, 64] . V [64, 512]  warps [4, 2]: each warp group owns
                                                              256 output columns (128 fp32
                                                              registers a thread)

Q (64 x 576 bf16) sits in shared memory for the whole program; latent rows arrive in two
shared-memory stages by cp.async (page-table gathers: pages can be any size), the next tile
loading while this one is multiplied. The PV product of tile i runs asynchronously while the
program waits for tile i+1 and issues its QK product. One program = one (query row, 64 heads,
KV split); splits write normalised partials + log2-sum-exp, merged by `_merge_kernel`.

Only compiled on CUDA (Gluon has no CPU interpreter): tests/test_gpu_mla.py checks it against the
torch reference on the H100 (scripts/gpu_check_mla.py times it); CPU CI runs the Triton kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dlengine.kernels.triton_attention import merge_split_partials

try:  # Gluon ships with triton >= 3.4; anything missing means "not available"
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_init, warpgroup_mma_wait)

    # cp.async global -> shared: `async_load` from triton 3.7 on, `async_copy_global_to_shared` before
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
    # a CTA-wide barrier: `barrier` from triton 3.7 on, `thread_barrier` before
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    GLUON_IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001
    GLUON_IMPORT_ERROR = f"{type(e).__name__}: {e}"

KV_LORA = 512
ROPE = 64
BLOCK_H = 64
NUM_WARPS = 8
# Tiles: 64 keys, 2 shared-memory stages. Shared memory = Q 72 KB + STAGES x BLOCK_N x 1,152 B
# = 216 KB of the H100's 227. Measured and dropped (docs/performance.md): 32-key tiles in 4 stages
# with FlashAttention-3's in-warpgroup overlap (softmax of tile t under PV(t-1)): 20-25% slower
# (16-wide score MMAs per warp group); waiting for PV(t-1) first so that two tiles are in flight:
# no faster.
BLOCK_N = 64
STAGES = 2
LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=None)  # asked on every eager decode launch: answer once per shape
def supported(device: torch.device, cache_dtype: torch.dtype, kv_lora: int, rope: int) -> str | None:
    """None when this kernel can run these shapes here, else why not (a short reason)."""
    if GLUON_IMPORT_ERROR is not None:
        return f"triton.experimental.gluon does not import ({GLUON_IMPORT_ERROR})"
    if device.type != "cuda":
        return "needs a CUDA device"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return "needs a Hopper GPU (sm_90: warpgroup MMA)"
    if cache_dtype not in (torch.bfloat16, torch.float16):
        return f"needs a bf16/fp16 latent cache, not {cache_dtype}"
    if (kv_lora, rope) != (KV_LORA, ROPE):
        return f"is built for kv_lora_rank {KV_LORA} + rope {ROPE}, not {kv_lora} + {rope}"
    return None


def cache_layout_problem(cache: torch.Tensor) -> str | None:
    """None when the latent cache's rows can be gathered with 16-byte cp.async (what the kernel is
    compiled for: row and block strides multiples of 16 elements, unit stride inside a row)."""
    if cache.stride(-1) != 1 or cache.stride(0) % 16 or cache.stride(1) % 16 or cache.data_ptr() % 16:
        return f"needs 16-element-aligned cache rows (strides {tuple(cache.stride())})"
    return None


if GLUON_IMPORT_ERROR is None:

    @gluon.jit
    def _tile_blocks(bt_row, start_n, kv_end, BLOCK_N: gl.constexpr, PAGE: gl.constexpr, L: gl.constexpr):
        """Cache block of each row of tile [start_n, start_n + BLOCK_N) ([BLOCK_N] in rows-of-L),
        0 past kv_end. Loaded a tile ahead of its use so the page-table read stays off the
        critical path."""
        pos = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L))
        return gl.load(bt_row + pos // PAGE, mask=pos < kv_end, other=0).to(gl.int64)

    @gluon.jit
    def _issue_tile(kv_smem, pe_smem, cache_ptr, blk_kv, blk_pe, start_n, kv_end, stride_cb, stride_cs,
                    KV_LORA: gl.constexpr, ROPE: gl.constexpr, BLOCK_N: gl.constexpr, PAGE: gl.constexpr,
                    KV_L: gl.constexpr, PE_L: gl.constexpr):
        """cp.async latent rows [start_n, start_n + BLOCK_N) (cache blocks blk_*) into a stage, as
        one commit group; rows past kv_end are zero-filled (and read nothing)."""
        pos = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, KV_L))
        row = cache_ptr + blk_kv * stride_cb + (pos % PAGE) * stride_cs
        cols = gl.arange(0, KV_LORA, layout=gl.SliceLayout(0, KV_L))
        _async_load(kv_smem, gl.expand_dims(row, 1) + gl.expand_dims(cols, 0),
                                       mask=gl.expand_dims(pos < kv_end, 1))
        pos_r = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, PE_L))
        row_r = cache_ptr + blk_pe * stride_cb + (pos_r % PAGE) * stride_cs + KV_LORA
        cols_r = gl.arange(0, ROPE, layout=gl.SliceLayout(0, PE_L))
        _async_load(pe_smem, gl.expand_dims(row_r, 1) + gl.expand_dims(cols_r, 0),
                                       mask=gl.expand_dims(pos_r < kv_end, 1))
        cp.commit_group()

    @gluon.jit
    def _scores(q_smem, qpe_smem, kv, pe, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, S_L: gl.constexpr):
        """Issue S = q_lat . c_kv^T + q_pe . k_pe^T for one stage (asynchronous)."""
        s = warpgroup_mma(q_smem, kv.permute((1, 0)), gl.zeros([BLOCK_H, BLOCK_N], gl.float32, S_L),
                          use_acc=False, is_async=True)
        return warpgroup_mma(qpe_smem, pe.permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _softmax(s, m_i, l_i, t, seq_len, qk_scale, BLOCK_N: gl.constexpr, S_L: gl.constexpr):
        """Online softmax of one score tile (log2 domain): (p, alpha, m, l). Every tile a split
        visits holds >= 1 valid key, so the new max is finite."""
        keys = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
        s = gl.where(gl.expand_dims(keys < seq_len, 0), s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit(do_not_specialize=["num_splits", "stride_bt", "stride_ql_t", "stride_ql_h", "stride_qp_t",
                                  "stride_qp_h", "stride_ot", "stride_oh"])
    def _mla_decode_gluon_kernel(
        qlat_ptr, qpe_ptr, cache_ptr, bt_ptr, row_tok_ptr, row_len_ptr, out_ptr, ws_ptr, lse_ptr,
        qk_scale, num_splits,
        stride_ql_t, stride_ql_h, stride_qp_t, stride_qp_h,
        stride_cb, stride_cs, stride_bt, stride_ot, stride_oh,
        NUM_HEADS: gl.constexpr, HEAD_TILES: gl.constexpr, PAGE: gl.constexpr, DIRECT: gl.constexpr,
        KV_LORA: gl.constexpr, ROPE: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        """Grid (row x head tile, split): row r = request r, query token row_tok[r], context
        row_len[r]. DIRECT: write out here; else ws [rows * H, splits, KV_LORA] fp32 partials and
        lse [rows * H, splits] (log2 domain) for `_merge_kernel`. Tiles arrive STAGES - 1 ahead
        (with 2 stages: tile t+1 loads while tile t is multiplied) and PV(t) runs on the tensor
        cores while the program waits for tile t+1 and issues its scores."""
        # ---- layouts (8 warps = two warp groups side by side along N) ----
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                      instr_shape=[16, BLOCK_N // 2, 16])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                      instr_shape=[16, KV_LORA // 2, 16])
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
        KV_L: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [8, 1], [1, 0])  # 16 B a thread, rows of 512
        PE_L: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])  # rows of 64
        SMEM_L: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        dtype: gl.constexpr = cache_ptr.dtype.element_ty

        pid = gl.program_id(0)
        r = pid // HEAD_TILES
        ht = pid % HEAD_TILES
        sp = gl.program_id(1)
        tok = gl.load(row_tok_ptr + r).to(gl.int64)
        seq_len = gl.load(row_len_ptr + r)

        n_tiles = gl.cdiv(seq_len, BLOCK_N)
        tiles_per_split = gl.cdiv(n_tiles, num_splits)
        t0 = sp * tiles_per_split
        t1 = gl.minimum(t0 + tiles_per_split, n_tiles)
        end_n = gl.minimum(seq_len, t1 * BLOCK_N)  # this split's last row (loads past it read nothing)

        heads_o = ht * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, O_L))
        cols_o = gl.arange(0, KV_LORA, layout=gl.SliceLayout(0, O_L))
        ho_ok = gl.expand_dims(heads_o < NUM_HEADS, 1)
        if t0 >= t1:
            if DIRECT:  # empty context (CUDA-graph padding row): defined output, zeros
                o_ptrs = out_ptr + tok * stride_ot + gl.expand_dims(heads_o, 1) * stride_oh + gl.expand_dims(cols_o, 0)
                gl.store(o_ptrs, gl.zeros([BLOCK_H, KV_LORA], dtype, O_L), mask=ho_ok)
            return  # an empty split (the last ones of a short row): the merge reads only splits with keys

        # ---- Q -> shared memory, once ----
        heads_q = ht * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, KV_L))
        cq = gl.arange(0, KV_LORA, layout=gl.SliceLayout(0, KV_L))
        q_lat = gl.load(qlat_ptr + tok * stride_ql_t + gl.expand_dims(heads_q, 1) * stride_ql_h + gl.expand_dims(cq, 0),
                        mask=gl.expand_dims(heads_q < NUM_HEADS, 1), other=0.0).to(dtype)
        heads_p = ht * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, PE_L))
        cr = gl.arange(0, ROPE, layout=gl.SliceLayout(0, PE_L))
        q_pe = gl.load(qpe_ptr + tok * stride_qp_t + gl.expand_dims(heads_p, 1) * stride_qp_h + gl.expand_dims(cr, 0),
                       mask=gl.expand_dims(heads_p < NUM_HEADS, 1), other=0.0).to(dtype)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, KV_LORA], SMEM_L, q_lat)
        qpe_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, ROPE], SMEM_L, q_pe)
        kv_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, KV_LORA], SMEM_L)
        pe_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, ROPE], SMEM_L)
        bt_row = bt_ptr + r.to(gl.int64) * stride_bt

        # ---- prologue: tiles t0 .. t0 + STAGES - 2 in flight, the next one's blocks in registers ----
        for i in gl.static_range(STAGES - 1):
            _issue_tile(kv_smem.index(i), pe_smem.index(i), cache_ptr,
                        _tile_blocks(bt_row, (t0 + i) * BLOCK_N, end_n, BLOCK_N, PAGE, KV_L),
                        _tile_blocks(bt_row, (t0 + i) * BLOCK_N, end_n, BLOCK_N, PAGE, PE_L),
                        (t0 + i) * BLOCK_N, end_n, stride_cb, stride_cs, KV_LORA, ROPE, BLOCK_N, PAGE, KV_L, PE_L)
        nxt = (t0 + STAGES - 1) * BLOCK_N
        blk_kv = _tile_blocks(bt_row, nxt, end_n, BLOCK_N, PAGE, KV_L)
        blk_pe = _tile_blocks(bt_row, nxt, end_n, BLOCK_N, PAGE, PE_L)

        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(1, S_L))
        l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(1, S_L))
        acc = warpgroup_mma_init(gl.zeros([BLOCK_H, KV_LORA], gl.float32, O_L))
        for t in range(t0, t1):
            stage = (t - t0) % STAGES
            kv = kv_smem.index(stage)
            cp.wait_group(STAGES - 2)  # this tile's rows
            _cta_barrier()  # ... from every thread
            fence_async_shared()  # visible to the tensor cores (async proxy)
            s = _scores(q_smem, qpe_smem, kv, pe_smem.index(stage), BLOCK_H, BLOCK_N, S_L)
            s, acc = warpgroup_mma_wait(0, deps=[s, acc])  # also the previous tile's PV product
            _cta_barrier()  # both warp groups are done with the stage refilled next
            # (issuing this load earlier, under the scores -- wait down to 2 outstanding MMA groups
            # retires PV(t-1) -- was measured 5-10% slower: the copies compete with the score MMAs,
            # which read both operands from shared memory)
            ahead = (t + STAGES - 1) * BLOCK_N
            free = (t + STAGES - 1 - t0) % STAGES
            _issue_tile(kv_smem.index(free), pe_smem.index(free), cache_ptr, blk_kv, blk_pe, ahead, end_n,
                        stride_cb, stride_cs, KV_LORA, ROPE, BLOCK_N, PAGE, KV_L, PE_L)
            blk_kv = _tile_blocks(bt_row, ahead + BLOCK_N, end_n, BLOCK_N, PAGE, KV_L)
            blk_pe = _tile_blocks(bt_row, ahead + BLOCK_N, end_n, BLOCK_N, PAGE, PE_L)
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, t, seq_len, qk_scale, BLOCK_N, S_L)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_L)), 1)
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), P_L), kv, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        cp.wait_group(0)

        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, O_L))
        out = acc / gl.expand_dims(l_o, 1)
        if DIRECT:
            o_ptrs = out_ptr + tok * stride_ot + gl.expand_dims(heads_o, 1) * stride_oh + gl.expand_dims(cols_o, 0)
            gl.store(o_ptrs, out.to(dtype), mask=ho_ok)
        else:
            rows = (r * NUM_HEADS + heads_o).to(gl.int64) * num_splits + sp
            gl.store(ws_ptr + gl.expand_dims(rows, 1) * KV_LORA + gl.expand_dims(cols_o, 0), out, mask=ho_ok)
            lse = gl.convert_layout(m_i + gl.log2(l_i), gl.SliceLayout(1, O_L))
            gl.store(lse_ptr + rows, lse, mask=heads_o < NUM_HEADS)


@triton.jit(do_not_specialize=["num_splits", "lse_off", "stride_ot", "stride_oh"])
def _merge_kernel(ws_ptr, lse_off, row_tok_ptr, row_len_ptr, out_ptr, num_splits, stride_ot, stride_oh,
                  NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, KV_LORA: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (row x head block): merge the splits that had keys (the first n_active: the kernel
    gives each split a contiguous run of tiles) with the Triton decode kernels' merge; a row
    without keys (CUDA-graph padding) gets zeros."""
    pid = tl.program_id(0)
    blocks: tl.constexpr = (NUM_HEADS + BLOCK_H - 1) // BLOCK_H
    r = pid // blocks
    heads = (pid % blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < NUM_HEADS
    cols = tl.arange(0, KV_LORA)
    st_mask = h_ok[:, None]
    o_ptrs = out_ptr + tl.load(row_tok_ptr + r).to(tl.int64) * stride_ot + heads[:, None] * stride_oh + cols[None, :]
    n_tiles = tl.cdiv(tl.load(row_len_ptr + r), BLOCK_N)
    if n_tiles == 0:
        tl.store(o_ptrs, tl.zeros([BLOCK_H, KV_LORA], dtype=out_ptr.dtype.element_ty), mask=st_mask)
    else:
        n_active = tl.cdiv(n_tiles, tl.cdiv(n_tiles, num_splits))
        o = merge_split_partials(ws_ptr, lse_off, r.to(tl.int64) * NUM_HEADS + heads, cols, num_splits, n_active,
                                 h_ok, st_mask, KV_LORA, BLOCK_H, KV_LORA)
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=st_mask)


def choose_num_splits(num_rows: int, head_tiles: int, max_seq_len: int, num_sms: int,
                      min_keys_per_split: int = 512, max_splits: int = 64) -> int:
    """One program per SM (this kernel's shared memory allows one), so aim at one full wave:
    rows x head tiles x splits <= num_sms, at least `min_keys_per_split` keys a split."""
    base = max(1, num_rows * head_tiles)
    want = max(1, num_sms // base)
    cap = max(1, max_seq_len // min_keys_per_split)
    splits = max(1, min(want, cap, max_splits))
    return 1 << (splits.bit_length() - 1)


def mla_decode_gluon(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                     row_tok: torch.Tensor, row_len: torch.Tensor, out_lat: torch.Tensor, scale: float, *,
                     max_seq_len: int, num_splits: int | None = None) -> torch.Tensor:
    """Absorbed MLA decode (one query token per row r: token row_tok[r] over the first row_len[r]
    cached rows of block-table row r) into out_lat [T, H, 512]; the contract of
    triton_mla.mla_decode without row_req (see `supported` for when it applies)."""
    num_rows = row_len.shape[0]
    num_heads = q_lat.shape[1]
    if num_rows == 0:
        return out_lat
    assert q_lat.stride(-1) == 1 and q_pe.stride(-1) == 1 and out_lat.stride(-1) == 1
    head_tiles = -(-num_heads // BLOCK_H)
    if num_splits is None:
        from dlengine.kernels.triton_attention import _num_sms

        num_splits = choose_num_splits(num_rows, head_tiles, max_seq_len, _num_sms(q_lat.device.index))
    if num_splits == 1:
        ws = lse = out_lat  # unused
    else:  # the Triton decode kernels' workspace layout: partials, then lse at n * KV_LORA
        n = num_rows * num_heads * num_splits
        ws = torch.empty(n * (KV_LORA + 1), dtype=torch.float32, device=q_lat.device)
        lse = ws[n * KV_LORA:]
    qls, qps, os_ = q_lat.stride(), q_pe.stride(), out_lat.stride()
    _mla_decode_gluon_kernel[(num_rows * head_tiles, num_splits)](
        q_lat, q_pe, cache, block_tables, row_tok, row_len, out_lat, ws, lse, scale * LOG2E, num_splits,
        qls[0], qls[1], qps[0], qps[1], cache.stride(0), cache.stride(1), block_tables.stride(0), os_[0], os_[1],
        NUM_HEADS=num_heads, HEAD_TILES=head_tiles, PAGE=cache.shape[1], DIRECT=num_splits == 1,
        KV_LORA=KV_LORA, ROPE=ROPE, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, STAGES=STAGES,
        num_warps=NUM_WARPS)
    if num_splits > 1:
        merge_heads = 16
        _merge_kernel[(num_rows * -(-num_heads // merge_heads),)](
            ws, n * KV_LORA, row_tok, row_len, out_lat, num_splits, os_[0], os_[1],
            NUM_HEADS=num_heads, BLOCK_H=merge_heads, KV_LORA=KV_LORA, BLOCK_N=BLOCK_N, num_warps=4)
    return out_lat


__all__ = ["GLUON_IMPORT_ERROR", "cache_layout_problem", "choose_num_splits", "mla_decode_gluon", "supported"]
