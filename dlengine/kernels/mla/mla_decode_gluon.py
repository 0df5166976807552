"""Hopper (sm_90) MLA decode kernel in Gluon, Triton's lower-level dialect (explicit layouts,
shared memory, TMA, mbarriers, warpgroup MMAs and warp specialisation), used for absorbed MLA
decode at DeepSeek's dims (kv_lora_rank 512, rope 64, bf16/fp16 latent cache); see docs/mla.md.

One program = one (query row, 64 heads, KV split); three partitions share its shared memory:

  loader  (1 warp)    TMA-gathers each 64-key tile of the paged latent cache (any power-of-two
                      page size >= 8) into one of two slots, in three parts (latent columns
                      0-255, 256-511, rope) with an mbarrier each, once both groups freed the slot
  scores  (4 warps)   Q into shared memory first (by cp.async where the query allows it; the
                      loader's first tiles are on their way meanwhile), then S = Q K^T for the
                      whole [64 heads x 64 keys] tile (N = 64: each score MMA step reads Q once
                      per 64 keys), the online softmax, P into the tile's rope rows (spent once
                      S is done) plus the rescale factor for the other group, then P V for
                      output columns 256-511
  values  (4 warps)   this program's own warps: per tile, rescale and add P V for output columns
                      0-255 (P read from shared memory)

Both groups release a slot as soon as their P V on it is done, so the load of tile k + 2 has a
whole tile's compute to arrive in. Measured on the H100 (docs/performance.md): the earlier
design of this kernel (both warp groups computing 32 keys of S each, cp.async gathers issued by
the compute warps) reached 45-52% of copy bandwidth; FlashMLA's "seesaw" split (each group the
scores of every other tile, P exchanged) 41-48%, because both slots were then busy computing and
the next loads waited; overlapping P V(k) with S(k + 1) also left the loads no time (45-50%).
This schedule -- FlashInfer's sm90 MLA split, with a TMA producer warp -- reaches 69-84% at batch
>= 32, ctx >= 8k (page 64). Not HBM bounds it (scripts/probe_mla_decode.py):
with every tile served from L2 a tile still takes 1.8 us, against 1.9-2.0 from HBM -- the tile's
trip from L2 into shared memory and its MMAs do, and every KV tile makes that trip twice (into
the SMs of both head tiles). One trip per pair needs TMA multicast across a 2-CTA cluster, which
Gluon does not offer in Triton 3.6 ("NYI: Support multicast" in its TMA lowering).

Splits write normalised partials + log2-sum-exp, merged by `_merge_kernel` (a second launch, 5 us
at batch 32 x 8k: three in-kernel merges measured slower, docs/performance.md). Only compiled on CUDA
(Gluon has no CPU interpreter): scripts/bench_mla_decode.py checks it against a float32 reference on
the H100; CPU CI builds it for sm_90 (tests/test_sm90_build.py) and runs the Triton kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dlengine.kernels.common import num_sms
from dlengine.kernels.mla.latent import DEEPSEEK_LATENT, latent_cache_problem

try:  # Gluon ships with triton >= 3.4; anything missing means "not available"
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # TMA global -> shared: `async_load` from triton 3.7 on, `async_copy_global_to_shared` before
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # cp.async global -> shared: the same rename
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    # a barrier among the warps of the calling partition: `barrier` from 3.7 on, `thread_barrier` before
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    GLUON_IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001
    GLUON_IMPORT_ERROR = f"{type(e).__name__}: {e}"

KV_LORA, ROPE = DEEPSEEK_LATENT  # the latent dims this kernel is built for
BLOCK_H = 64  # heads per program (the warpgroup MMA's M)
BLOCK_N = 64  # keys per tile; two tile slots + Q = 216 KB of the H100's 227 KB shared memory
NUM_WARPS = 4  # the value group; + 4 (scores) + 1 (loader) worker warps
CONSUMER_REGS, LOADER_REGS, MAX_REGS = 232, 40, 168  # per thread: 232 x 2 groups + 40 <= 512
LOG2E = 1.4426950408889634
# The score group loads Q while the loader's first tiles are on their way (measured against the
# prologue loading it before the partitions start, same bits: 32 x 8k 148.1 vs 150.3 us, 32 x 16k
# 277 vs 284 us, 1 x 8k 41.4 vs 43.2 us), by cp.async, all five chunks in flight at once, where the
# query allows it (`_q_async_ok`; else through registers, one round trip a chunk). On the H100, CUDA graphs of both alternated 40 times
# (scripts/probe_mla_decode.py --ab Q_CP_ASYNC --wide): 32 x 1k 35.3 vs 37.7 us, 8 x 8k 53.9 vs 56.0,
# 32 x 4k 83.2 vs 85.5, 32 x 8k 148.7 vs 150.1, 128 x 8k 562.8 vs 567.0, 32 x 16k / 32k level
Q_CP_ASYNC = True
# `choose_num_splits`: the fewest keys a split gets (a split pays its start-up and partial). With
# the merge loading all splits at once, 128 beat 512 / 256 / 64 at batch 1-16 (CUDA graphs
# alternated, `probe_mla_decode.py --ab MIN_KEYS_PER_SPLIT=512,256,128,64 --small`): 1 x 1k 12.8
# vs 21.8 us at 512, 1 x 4k 15.1 vs 23.1, 1 x 8k 19.8 vs 23.4 (256: 18.4), 4 x 4k 22.6 vs 25.2
MIN_KEYS_PER_SPLIT = 128


def _q_async_ok(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor) -> bool:
    """cp.async moves bytes as they are (no dtype conversion) at least 4 at a time: the query must be
    in the cache's dtype, and its token / head strides multiples of 16 elements -- what Triton's
    argument specialisation can see (a stride of 520 is 16-byte aligned, but the compiler only knows
    "not a multiple of 16": 2-byte accesses, which cp.async cannot do)."""
    return all(t.dtype == cache.dtype and t.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in t.stride()[:2])
               for t in (q_lat, q_pe))


@functools.lru_cache(maxsize=None)  # asked on every eager decode launch: answer once per shape
def supported(device: torch.device, cache_dtype: torch.dtype, kv_lora: int, rope: int) -> str | None:
    """None when this kernel can run these shapes here, else why not (a short reason)."""
    if GLUON_IMPORT_ERROR is not None:
        return f"triton.experimental.gluon does not import ({GLUON_IMPORT_ERROR})"
    if device.type != "cuda":
        return "needs a CUDA device"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return "needs a Hopper GPU (sm_90: TMA, warpgroup MMA)"
    return latent_cache_problem(cache_dtype, kv_lora, rope)


def cache_layout_problem(cache: torch.Tensor) -> str | None:
    """None when the latent cache [blocks, page, (1,) 576] can be read by TMA as one 2-D tensor of
    rows: unit stride inside a row, 16-byte-aligned rows, blocks back to back, and a power-of-two
    page size >= 8 (a TMA box is min(page, 64) rows)."""
    page = cache.shape[1]
    if cache.dim() == 4 and cache.shape[2] != 1:
        return f"needs one latent head, not {cache.shape[2]}"
    if page < 8 or page & (page - 1):
        return f"needs a power-of-two page size >= 8, not {page}"
    row = cache.stride(1)
    if cache.stride(-1) != 1 or row * cache.element_size() % 16 or cache.data_ptr() % 16:
        return f"needs 16-byte-aligned cache rows (strides {tuple(cache.stride())})"
    if cache.stride(0) != page * row:
        return f"needs the cache blocks back to back (strides {tuple(cache.stride())})"
    return None


def _cache_descriptor(cache: torch.Tensor) -> "TensorDescriptor":
    """The cache as TMA sees it: [blocks * page rows, 576], boxes of min(page, 64) rows x 64 columns
    (128 B, the swizzle width the MMAs read)."""
    rows = cache.as_strided((cache.shape[0] * cache.shape[1], cache.shape[-1]), (cache.stride(1), 1))
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8 * cache.element_size(), rank=2)
    return TensorDescriptor.from_tensor(rows, [min(cache.shape[1], BLOCK_N), 64], layout)


if GLUON_IMPORT_ERROR is None:

    @gluon.jit
    def _loader(desc, bt_ptr, kv_smem, pe_smem, bars, r, t0, t1, seq_len, stride_bt, PAGE):
        """One warp: TMA-gathers 64-key tile k into slot k % 2 once both warp groups released it, in
        three parts (latent cols 0-255, 256-511, rope) with a ready barrier each, so the score MMAs
        start on the first part while the rest arrives. The tile's page ids are read before waiting."""
        BOX: gl.constexpr = desc.block_type.shape[0]  # rows a TMA box moves: min(page size, 64)
        NB: gl.constexpr = 64 // BOX
        IL: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        bt_row = bt_ptr + r.to(gl.int64) * stride_bt
        last = seq_len - 1
        box = gl.arange(0, NB, layout=IL)
        for k in range(t1 - t0):
            slot = k % 2
            start = (t0 + k) * 64
            # rows past the sequence end read the last page's (finite) rows; the consumers zero them
            pages = gl.load(bt_row + gl.minimum(start + box * BOX, last) // PAGE)
            rows = pages * PAGE + (start + box * BOX) % PAGE
            mbarrier.wait(bars.index(6 + slot), ((k // 2) & 1) ^ 1)
            fence_async_shared()  # the consumers' generic-proxy accesses of this slot come first
            mbarrier.expect(bars.index(0 + slot), 64 * 256 * 2)
            mbarrier.expect(bars.index(2 + slot), 64 * 256 * 2)
            mbarrier.expect(bars.index(4 + slot), 64 * 64 * 2)
            for i in gl.static_range(NB):  # box by box: one page-id extraction per box
                row = gl.sum(gl.where(box == i, rows, 0), 0)
                for c in gl.static_range(9):  # latent 0-255 (ready 0), 256-511 (ready 2), rope (ready 4)
                    if c < 8:
                        dst = kv_smem.index(slot).slice(c * 64, 64, dim=1).slice(i * BOX, BOX, dim=0)
                    else:
                        dst = pe_smem.index(slot).slice(i * BOX, BOX, dim=0)
                    _tma_load(desc, [row, c * 64], bars.index(2 * (c // 4) + slot), dst)


    @gluon.jit
    def _stamp(times_ptr, slot: gl.constexpr, TIMES: gl.constexpr):
        """Diagnostics (TIMES): the global timer (ns) into times[program, slot] (8 slots a program)."""
        if TIMES:
            prog = gl.program_id(0) * gl.num_programs(1) + gl.program_id(1)
            now = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                            pack=1)
            gl.store(times_ptr + prog * 8 + slot, now)


    @gluon.jit
    def _zero_tail(buf, valid, num_warps: gl.constexpr):
        """Zero rows >= valid of a [64, 256] latent half (the last tile's rows past the sequence end may
        hold anything; P is 0 there but 0 * NaN is not)."""
        ZL: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
        for c in gl.static_range(2):
            part = buf.slice(c * 128, 128, dim=1)
            v = part.load(ZL)
            rows = gl.arange(0, 64, layout=gl.SliceLayout(1, ZL))
            part.store(gl.where(gl.expand_dims(rows < valid, 1), v, gl.zeros_like(v)))
        fence_async_shared()
        _cta_barrier()


    @gluon.jit
    def _q_pointers(qlat_ptr, qpe_ptr, ht, tok, stride_ql_t, stride_ql_h, stride_qp_t, stride_qp_h, NUM_HEADS):
        """Where the program's 64 query heads are: 4 latent chunks [64, 128] and the rope [64, 64], 16
        B a thread, and which rows are real heads."""
        QL: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        heads = ht * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, QL))
        h_ok = gl.expand_dims(heads < NUM_HEADS, 1)
        cq = gl.arange(0, 128, layout=gl.SliceLayout(0, QL))
        lat = qlat_ptr + tok * stride_ql_t + gl.expand_dims(heads, 1) * stride_ql_h + gl.expand_dims(cq, 0)
        cr = gl.arange(0, 64, layout=gl.SliceLayout(0, QL))
        pe = qpe_ptr + tok * stride_qp_t + gl.expand_dims(heads, 1) * stride_qp_h + gl.expand_dims(cr, 0)
        return lat, pe, h_ok


    @gluon.jit
    def _load_q(qlat_ptr, qpe_ptr, q_smem, qpe_smem, ht, tok, stride_ql_t, stride_ql_h, stride_qp_t, stride_qp_h,
                NUM_HEADS):
        """The program's 64 query heads (latent 512 + rope 64) into shared memory, by 4 warps, through
        registers (any dtype, any strides; one memory round trip a chunk)."""
        dtype: gl.constexpr = q_smem.dtype
        lat, pe, h_ok = _q_pointers(qlat_ptr, qpe_ptr, ht, tok, stride_ql_t, stride_ql_h, stride_qp_t, stride_qp_h,
                                    NUM_HEADS)
        for c in gl.static_range(4):
            q_smem.slice(c * 128, 128, dim=1).store(gl.load(lat + c * 128, mask=h_ok, other=0.0).to(dtype))
        qpe_smem.store(gl.load(pe, mask=h_ok, other=0.0).to(dtype))
        fence_async_shared()
        _cta_barrier()


    @gluon.jit
    def _load_q_async(qlat_ptr, qpe_ptr, q_smem, qpe_smem, ht, tok, stride_ql_t, stride_ql_h, stride_qp_t,
                      stride_qp_h, NUM_HEADS):
        """The same by cp.async, all five chunks in flight at once (one memory round trip, no registers):
        for q in the cache's dtype, 16-byte aligned, strides of 16 elements (`_q_async_ok`). Measured
        at batch 32 x 8k: Q in shared memory 3.5 us after the start instead of 6.6 with `_load_q`,
        whose chunks each wait behind the first tiles' loads."""
        lat, pe, h_ok = _q_pointers(qlat_ptr, qpe_ptr, ht, tok, stride_ql_t, stride_ql_h, stride_qp_t, stride_qp_h,
                                    NUM_HEADS)
        for c in gl.static_range(4):
            _cp_async(q_smem.slice(c * 128, 128, dim=1), lat + c * 128, mask=h_ok)
        _cp_async(qpe_smem, pe, mask=h_ok)
        async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()
        _cta_barrier()


    @gluon.jit
    def _store_out(acc, l_tot, m_i, ME: gl.constexpr, out_ptr, ws_ptr, lse_ptr, r, ht, sp, tok, num_splits,
                   stride_ot, stride_oh, NUM_HEADS, DIRECT):
        O_L: gl.constexpr = acc.type.layout
        ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
        out = acc / gl.expand_dims(gl.convert_layout(l_tot, ROW_O), 1)
        heads = ht * 64 + gl.arange(0, 64, layout=ROW_O)
        cols = ME * 256 + gl.arange(0, 256, layout=gl.SliceLayout(0, O_L))
        ok = gl.expand_dims(heads < NUM_HEADS, 1)
        if DIRECT:
            ptrs = out_ptr + tok * stride_ot + gl.expand_dims(heads, 1) * stride_oh + gl.expand_dims(cols, 0)
            gl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            rows = (r * NUM_HEADS + heads).to(gl.int64) * num_splits + sp
            gl.store(ws_ptr + gl.expand_dims(rows, 1) * 512 + gl.expand_dims(cols, 0), out, mask=ok)
            if ME == 1:
                lse = gl.convert_layout(m_i + gl.log2(l_tot), ROW_O)
                gl.store(lse_ptr + rows, lse, mask=heads < NUM_HEADS)


    @gluon.jit
    def _score_group(q_smem, qpe_smem, kv_smem, pe_smem, xs_smem, bars, out_ptr, ws_ptr, lse_ptr,
                     r, ht, sp, tok, seq_len, t0, t1, qk_scale, num_splits, stride_ot, stride_oh, NUM_HEADS, DIRECT,
                     times_ptr, TIMES):
        """Warp group 1 (Q already in shared memory, see the score workers): scores and online softmax of every tile (S = Q K^T with N = 64 keys: no
        duplicated MMA), P and the rescale factor handed to group 0 through shared memory, and the
        output columns 256-511; the row max / sum for both groups at the end."""
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
        dtype: gl.constexpr = q_smem.dtype
        n = t1 - t0
        tail = seq_len - (t1 - 1) * 64  # valid rows of the split's last tile (64 unless the sequence ends there)
        acc = gl.zeros([64, 256], gl.float32, O_L)
        l_i = gl.zeros([64], gl.float32, ROW_S)
        m_i = gl.full([64], float("-inf"), gl.float32, ROW_S)
        keys0 = gl.arange(0, 64, layout=gl.SliceLayout(0, S_L))
        _stamp(times_ptr, 1, TIMES)
        for k in range(n):
            slot = k % 2
            ph = (k // 2) & 1
            kv = kv_smem.index(slot)
            mbarrier.wait(bars.index(0 + slot), ph)
            if TIMES:
                if k == 0:
                    _stamp(times_ptr, 2, TIMES)
            s = warpgroup_mma(q_smem.slice(0, 256, dim=1), kv.slice(0, 256, dim=1).permute((1, 0)),
                              gl.zeros([64, 64], gl.float32, S_L), use_acc=False, is_async=True)
            mbarrier.wait(bars.index(2 + slot), ph)
            s = warpgroup_mma(q_smem.slice(256, 256, dim=1), kv.slice(256, 256, dim=1).permute((1, 0)), s,
                              is_async=True)
            mbarrier.wait(bars.index(4 + slot), ph)
            s = warpgroup_mma(qpe_smem, pe_smem.index(slot).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(0, deps=[s])
            s = gl.where(gl.expand_dims((t0 + k) * 64 + keys0 < seq_len, 0), s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - gl.expand_dims(m_new, 1))
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            pb = p.to(dtype)
            pe_smem.index(slot).store(pb)  # the rope rows are spent: P goes there for group 0
            if slot == 0:  # (shared-memory slices take constant offsets)
                xs_smem.slice(0, 64).store(alpha)
            else:
                xs_smem.slice(64, 64).store(alpha)
            fence_async_shared()
            _cta_barrier()
            mbarrier.arrive(bars.index(8 + slot))
            v = kv.slice(256, 256, dim=1)
            if k == n - 1:
                if tail < 64:
                    _zero_tail(v, tail, 4)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_L)), 1)
            acc = warpgroup_mma(gl.convert_layout(pb, P_L), v, acc, is_async=True)
            # release the slot now rather than under S(k + 1): the load of tile k + 2 then has a whole
            # tile's compute to arrive in (overlapping PV(k) with S(k + 1) left it only the softmax)
            acc = warpgroup_mma_wait(0, deps=[acc])
            _cta_barrier()
            mbarrier.arrive(bars.index(6 + slot))
        _stamp(times_ptr, 3, TIMES)
        xs_smem.slice(2 * 64, 64).store(m_i)
        xs_smem.slice(3 * 64, 64).store(l_i)
        _cta_barrier()
        mbarrier.arrive(bars.index(10))
        _store_out(acc, l_i, m_i, 1, out_ptr, ws_ptr, lse_ptr, r, ht, sp, tok, num_splits, stride_ot, stride_oh,
                   NUM_HEADS, DIRECT)
        _stamp(times_ptr, 4, TIMES)


    @gluon.jit
    def _value_group(q_smem, qpe_smem, kv_smem, pe_smem, xs_smem, bars, out_ptr, ws_ptr, lse_ptr,
                     r, ht, sp, tok, seq_len, t0, t1, qk_scale, num_splits, stride_ot, stride_oh,
                     NUM_HEADS: gl.constexpr, DIRECT: gl.constexpr, times_ptr, TIMES: gl.constexpr):
        """Warp group 0: output columns 0-255: per tile, rescale by group 1's factor and add P . V_lo
        (P read from shared memory), then release the slot."""
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
        ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
        n = t1 - t0
        tail = seq_len - (t1 - 1) * 64
        acc = gl.zeros([64, 256], gl.float32, O_L)
        for k in range(n):
            slot = k % 2
            ph = (k // 2) & 1
            kv = kv_smem.index(slot)
            mbarrier.wait(bars.index(8 + slot), ph)
            mbarrier.wait(bars.index(0 + slot), ph)
            if slot == 0:
                alpha = xs_smem.slice(0, 64).load(ROW_O)
            else:
                alpha = xs_smem.slice(64, 64).load(ROW_O)
            v = kv.slice(0, 256, dim=1)
            if k == n - 1:
                if tail < 64:
                    _zero_tail(v, tail, 4)
            acc = acc * gl.expand_dims(alpha, 1)
            acc = warpgroup_mma(pe_smem.index(slot), v, acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
            _cta_barrier()
            mbarrier.arrive(bars.index(6 + slot))
        _stamp(times_ptr, 7, TIMES)
        mbarrier.wait(bars.index(10), 0)
        m_i = xs_smem.slice(2 * 64, 64).load(ROW_O)
        l_i = xs_smem.slice(3 * 64, 64).load(ROW_O)
        _store_out(acc, l_i, m_i, 0, out_ptr, ws_ptr, lse_ptr, r, ht, sp, tok, num_splits, stride_ot, stride_oh,
                   NUM_HEADS, DIRECT)
        _stamp(times_ptr, 5, TIMES)


    # Worker partitions get one argument list (Triton 3.6 wants the workers' signatures alike). The
    # score group comes as two workers, Q through registers or by cp.async, chosen at compile time:
    # Triton 3.6 hands worker partitions their constexprs as runtime values, so a branch inside one
    # would build the cp.async path for queries it cannot take, which fails to compile
    @gluon.jit
    def _score_worker(desc, bt_ptr, q_smem, qpe_smem, kv_smem, pe_smem, xs_smem, bars, out_ptr, ws_ptr, lse_ptr,
                      r, ht, sp, tok, seq_len, t0, t1, qk_scale, num_splits, stride_bt, stride_ot, stride_oh,
                      NUM_HEADS, DIRECT, PAGE, qlat_ptr, qpe_ptr, stride_ql_t, stride_ql_h, stride_qp_t,
                      stride_qp_h, times_ptr, TIMES):
        _load_q(qlat_ptr, qpe_ptr, q_smem, qpe_smem, ht, tok, stride_ql_t, stride_ql_h, stride_qp_t, stride_qp_h,
                NUM_HEADS)
        _score_group(q_smem, qpe_smem, kv_smem, pe_smem, xs_smem, bars, out_ptr, ws_ptr, lse_ptr, r, ht, sp, tok,
                     seq_len, t0, t1, qk_scale, num_splits, stride_ot, stride_oh, NUM_HEADS, DIRECT, times_ptr, TIMES)


    @gluon.jit
    def _score_worker_cp(desc, bt_ptr, q_smem, qpe_smem, kv_smem, pe_smem, xs_smem, bars, out_ptr, ws_ptr, lse_ptr,
                         r, ht, sp, tok, seq_len, t0, t1, qk_scale, num_splits, stride_bt, stride_ot, stride_oh,
                         NUM_HEADS, DIRECT, PAGE, qlat_ptr, qpe_ptr, stride_ql_t, stride_ql_h, stride_qp_t,
                         stride_qp_h, times_ptr, TIMES):
        _load_q_async(qlat_ptr, qpe_ptr, q_smem, qpe_smem, ht, tok, stride_ql_t, stride_ql_h, stride_qp_t,
                      stride_qp_h, NUM_HEADS)
        _score_group(q_smem, qpe_smem, kv_smem, pe_smem, xs_smem, bars, out_ptr, ws_ptr, lse_ptr, r, ht, sp, tok,
                     seq_len, t0, t1, qk_scale, num_splits, stride_ot, stride_oh, NUM_HEADS, DIRECT, times_ptr, TIMES)


    @gluon.jit
    def _load_worker(desc, bt_ptr, q_smem, qpe_smem, kv_smem, pe_smem, xs_smem, bars, out_ptr, ws_ptr, lse_ptr,
                     r, ht, sp, tok, seq_len, t0, t1, qk_scale, num_splits, stride_bt, stride_ot, stride_oh,
                     NUM_HEADS, DIRECT, PAGE, qlat_ptr, qpe_ptr, stride_ql_t, stride_ql_h, stride_qp_t,
                     stride_qp_h, times_ptr, TIMES):
        _loader(desc, bt_ptr, kv_smem, pe_smem, bars, r, t0, t1, seq_len, stride_bt, PAGE)
        _stamp(times_ptr, 6, TIMES)


    # the q / out strides stay specialised: knowing them multiples of 16 lets the query loads and the
    # output stores move 16 B at a time (unspecialised: 2-byte accesses, 320 loads a thread for Q);
    # they change with the batch (T * 512) but their divisibility does not, so nothing recompiles
    @gluon.jit(do_not_specialize=["num_splits", "stride_bt"])
    def _mla_decode_gluon_kernel(
        desc, qlat_ptr, qpe_ptr, bt_ptr, row_tok_ptr, row_len_ptr, out_ptr, ws_ptr, lse_ptr,
        qk_scale, num_splits,
        stride_ql_t, stride_ql_h, stride_qp_t, stride_qp_h, stride_bt, stride_ot, stride_oh,
        NUM_HEADS: gl.constexpr, HEAD_TILES: gl.constexpr, PAGE: gl.constexpr, DIRECT: gl.constexpr,
        Q_ASYNC: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
        times_ptr, TIMES: gl.constexpr,
    ):
        """Grid (row x head tile, split): row r = request r, query token row_tok[r], context
        row_len[r]; desc = the cache's TMA descriptor (`_cache_descriptor`). DIRECT: write out here;
        else ws [rows * H, splits, 512] fp32 partials and lse [rows * H, splits] (log2 domain) for
        `_merge_kernel`. Shared memory: Q (64 x 576), two tile slots (64 x 576 each, P overwrites a
        slot's rope rows), the exchange vectors xs (alpha of slot 0 / 1, final m, final l) and the
        mbarriers: 0-5 tile parts ready (latent low / high / rope x slot; TMA byte counts), 6-7 slot
        empty (count 2: both groups), 8-9 P of slot ready, 10 final m / l ready."""
        SMEM_L: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        QL: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])  # [64, 128] chunks, 4 warps
        dtype: gl.constexpr = desc.dtype

        _stamp(times_ptr, 0, TIMES)
        pid = gl.program_id(0)
        r = pid // HEAD_TILES
        ht = pid % HEAD_TILES
        sp = gl.program_id(1)
        tok = gl.load(row_tok_ptr + r).to(gl.int64)
        seq_len = gl.load(row_len_ptr + r)
        n_tiles = gl.cdiv(seq_len, 64)
        per_split = gl.cdiv(n_tiles, num_splits)
        t0 = sp * per_split
        t1 = gl.minimum(t0 + per_split, n_tiles)
        if t0 >= t1:
            if DIRECT:  # empty context (CUDA-graph padding row): zeros
                heads_z = ht * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, QL))
                for c in gl.static_range(4):
                    cz = c * 128 + gl.arange(0, 128, layout=gl.SliceLayout(0, QL))
                    gl.store(out_ptr + tok * stride_ot + gl.expand_dims(heads_z, 1) * stride_oh + gl.expand_dims(cz, 0),
                             gl.zeros([64, 128], dtype, QL), mask=gl.expand_dims(heads_z < NUM_HEADS, 1))
            return

        q_smem = gl.allocate_shared_memory(dtype, [64, 512], SMEM_L)
        qpe_smem = gl.allocate_shared_memory(dtype, [64, 64], SMEM_L)
        kv_smem = gl.allocate_shared_memory(dtype, [2, 64, 512], SMEM_L)
        pe_smem = gl.allocate_shared_memory(dtype, [2, 64, 64], SMEM_L)
        xs_smem = gl.allocate_shared_memory(gl.float32, [4 * 64], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        bars = gl.allocate_shared_memory(gl.int64, [11, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(6):
            mbarrier.init(bars.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(bars.index(6 + i), count=2)
        for i in gl.static_range(3):
            mbarrier.init(bars.index(8 + i), count=1)

        # (both argument tuples are written out: through a tuple variable triton 3.6's lowering
        # crashes; constexprs reach worker partitions as plain values, hence desc's block shape)
        worker_args = (desc, bt_ptr, q_smem, qpe_smem, kv_smem, pe_smem, xs_smem, bars, out_ptr, ws_ptr, lse_ptr,
                       r, ht, sp, tok, seq_len, t0, t1, qk_scale, num_splits, stride_bt, stride_ot, stride_oh,
                       NUM_HEADS, DIRECT, PAGE, qlat_ptr, qpe_ptr, stride_ql_t, stride_ql_h, stride_qp_t,
                       stride_qp_h, times_ptr, TIMES)
        # this program's 4 warps are warp group 0 (value group); the score group and a one-warp TMA
        # loader are workers
        gl.warp_specialize([
            (_value_group, (q_smem, qpe_smem, kv_smem, pe_smem, xs_smem, bars, out_ptr, ws_ptr, lse_ptr,
                            r, ht, sp, tok, seq_len, t0, t1, qk_scale, num_splits, stride_ot, stride_oh,
                            NUM_HEADS, DIRECT, times_ptr, TIMES)),
            (_score_worker_cp if Q_ASYNC else _score_worker, worker_args),
            (_load_worker, worker_args),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


@triton.jit(do_not_specialize=["num_splits", "lse_off"])
def _merge_kernel(ws_ptr, lse_off, row_tok_ptr, row_len_ptr, out_ptr, num_splits, stride_ot, stride_oh,
                  NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, KV_LORA: tl.constexpr, BLOCK_N: tl.constexpr,
                  PAIR: tl.constexpr, SPLITS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (row x head block x column block): merge the splits that had keys (the first n_active:
    the kernel gives each split a contiguous run of tiles) by log-sum-exp; a row without keys
    (CUDA-graph padding) gets zeros. All loads go out at once: PAIR (num_splits == 2) two partials,
    else (SPLITS, a power of two >= num_splits) all of them as one [heads, splits, columns] block.
    The Triton decode kernels' merge loop (`split_kv_triton.merge_split_partials`), which waits on
    memory once a split, measured slower: 6.6-7.7 vs 5.0 us at batch 32 x 8k (2 splits), 83.9 vs
    33.9 us for a whole batch 1 x 32k call (64 splits), 35.1 vs 23.3 at 1 x 8k, 53.9 vs 48.9 at 8 x
    8k (CUDA graphs of both alternated)."""
    pid = tl.program_id(0)
    blocks: tl.constexpr = (NUM_HEADS + BLOCK_H - 1) // BLOCK_H
    col_blocks: tl.constexpr = KV_LORA // BLOCK_C
    r = pid // (blocks * col_blocks)
    heads = (pid // col_blocks) % blocks * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < NUM_HEADS
    cols = pid % col_blocks * BLOCK_C + tl.arange(0, BLOCK_C)
    st_mask = h_ok[:, None]
    o_ptrs = out_ptr + tl.load(row_tok_ptr + r).to(tl.int64) * stride_ot + heads[:, None] * stride_oh + cols[None, :]
    n_tiles = tl.cdiv(tl.load(row_len_ptr + r), BLOCK_N)
    if n_tiles == 0:
        tl.store(o_ptrs, tl.zeros([BLOCK_H, BLOCK_C], dtype=out_ptr.dtype.element_ty), mask=st_mask)
    else:
        n_active = tl.cdiv(n_tiles, tl.cdiv(n_tiles, num_splits))
        rows = r.to(tl.int64) * NUM_HEADS + heads
        if PAIR:
            h2 = h_ok & (heads * 0 + n_active > 1)  # split 1 has keys
            lse0 = tl.load(ws_ptr + lse_off + rows * 2, mask=h_ok, other=0.0)
            lse1 = tl.load(ws_ptr + lse_off + rows * 2 + 1, mask=h2, other=float("-inf"))
            o0 = tl.load(ws_ptr + (rows[:, None] * 2) * KV_LORA + cols[None, :], mask=st_mask, other=0.0)
            o1 = tl.load(ws_ptr + (rows[:, None] * 2 + 1) * KV_LORA + cols[None, :], mask=h2[:, None], other=0.0)
            m = tl.maximum(lse0, lse1)
            w0 = tl.math.exp2(lse0 - m)
            w1 = tl.math.exp2(lse1 - m)
            o = (o0 * w0[:, None] + o1 * w1[:, None]) / (w0 + w1)[:, None]
        else:
            sp = tl.arange(0, SPLITS)
            ok = h_ok[:, None] & (sp < n_active)[None, :]  # splits past n_active were never written
            lse = tl.load(ws_ptr + lse_off + rows[:, None] * num_splits + sp[None, :], mask=ok, other=float("-inf"))
            m = tl.where(h_ok, tl.max(lse, 1), 0.0)  # (a row past the heads has no finite lse)
            w = tl.math.exp2(lse - m[:, None])
            parts = tl.load(ws_ptr + ((rows[:, None, None] * num_splits + sp[None, :, None]) * KV_LORA
                                      + cols[None, None, :]), mask=ok[:, :, None], other=0.0)
            o = tl.sum(parts * w[:, :, None], 1) / tl.where(h_ok, tl.sum(w, 1), 1.0)[:, None]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=st_mask)


def choose_num_splits(num_rows: int, head_tiles: int, max_seq_len: int, num_sms: int,
                      min_keys_per_split: int = MIN_KEYS_PER_SPLIT, max_splits: int = 64) -> int:
    """One program per SM (this kernel's shared memory allows one), so aim at one full wave:
    rows x head tiles x splits <= num_sms, at least `min_keys_per_split` keys a split."""
    base = max(1, num_rows * head_tiles)
    want = max(1, num_sms // base)
    cap = max(1, max_seq_len // min_keys_per_split)
    splits = max(1, min(want, cap, max_splits))
    return 1 << (splits.bit_length() - 1)


def mla_decode_gluon(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                     row_tok: torch.Tensor, row_len: torch.Tensor, out_lat: torch.Tensor, scale: float, *,
                     max_seq_len: int, num_splits: int | None = None,
                     times: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA decode (one query token per row r: token row_tok[r] over the first row_len[r]
    cached rows of block-table row r) into out_lat [T, H, 512]; the contract of
    mla_triton.mla_decode without row_req (`supported` and `cache_layout_problem` say when it applies).
    times (diagnostics, scripts/probe_mla_decode.py): int64 [programs, 8] to receive the global
    timer at points of each program's run (a separate build of the kernel)."""
    num_rows = row_len.shape[0]
    num_heads = q_lat.shape[1]
    if num_rows == 0:
        return out_lat
    assert q_lat.stride(-1) == 1 and q_pe.stride(-1) == 1 and out_lat.stride(-1) == 1
    head_tiles = -(-num_heads // BLOCK_H)
    if num_splits is None:
        num_splits = choose_num_splits(num_rows, head_tiles, max_seq_len, num_sms(q_lat.device.index),
                                       min_keys_per_split=MIN_KEYS_PER_SPLIT)
    if num_splits == 1:
        ws = lse = out_lat  # unused
    else:  # the Triton decode kernels' workspace layout: partials, then lse at n * KV_LORA
        n = num_rows * num_heads * num_splits
        ws = torch.empty(n * (KV_LORA + 1), dtype=torch.float32, device=q_lat.device)
        lse = ws[n * KV_LORA:]
    qls, qps, os_ = q_lat.stride(), q_pe.stride(), out_lat.stride()
    _mla_decode_gluon_kernel[(num_rows * head_tiles, num_splits)](
        _cache_descriptor(cache), q_lat, q_pe, block_tables, row_tok, row_len, out_lat, ws, lse, scale * LOG2E,
        num_splits, qls[0], qls[1], qps[0], qps[1], block_tables.stride(0), os_[0], os_[1],
        NUM_HEADS=num_heads, HEAD_TILES=head_tiles, PAGE=cache.shape[1], DIRECT=num_splits == 1,
        Q_ASYNC=Q_CP_ASYNC and _q_async_ok(q_lat, q_pe, cache),
        CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, times_ptr=out_lat if times is None else times,
        TIMES=times is not None, num_warps=NUM_WARPS, maxnreg=MAX_REGS)
    if num_splits > 1:
        _launch_merge(ws, row_tok, row_len, out_lat, num_splits)
    return out_lat


def _launch_merge(ws: torch.Tensor, row_tok: torch.Tensor, row_len: torch.Tensor, out_lat: torch.Tensor,
                  num_splits: int, pair: bool | None = None) -> None:
    """`_merge_kernel` over the workspace ws (partials [rows * heads, splits, width], then lse) into
    out_lat [T, heads, width] (pair: the two-split path; default when num_splits == 2)."""
    num_rows, num_heads, width = row_len.shape[0], out_lat.shape[1], out_lat.shape[2]
    pair = num_splits == 2 if pair is None else pair
    if pair and num_splits != 2:
        raise ValueError(f"the pair merge takes exactly 2 splits, not {num_splits}")
    if pair:
        splits_p2, block_c, merge_heads = 2, width, 8
    else:  # [heads, splits, 128 columns] blocks of <= 8k elements: 64 a thread
        splits_p2 = triton.next_power_of_2(num_splits)
        block_c = min(128, width)
        merge_heads = max(1, min(16, 8192 // (splits_p2 * block_c)))
    grid = num_rows * -(-num_heads // merge_heads) * (width // block_c)
    _merge_kernel[(grid,)](
        ws, num_rows * num_heads * num_splits * width, row_tok, row_len, out_lat, num_splits, out_lat.stride(0),
        out_lat.stride(1), NUM_HEADS=num_heads, BLOCK_H=merge_heads, KV_LORA=width, BLOCK_N=BLOCK_N, PAIR=pair,
        SPLITS=splits_p2, BLOCK_C=block_c, num_warps=4)


__all__ = ["GLUON_IMPORT_ERROR", "cache_layout_problem", "choose_num_splits", "mla_decode_gluon", "supported"]
