"""Prefill / extend attention for Hopper (sm_90): the step's new keys read contiguously, by TMA.

During a prefill or chunked-prefill step the keys and values of the step's own tokens are at hand
contiguously in the step's k / v tensors ([T, Hkv, D], the same rows the KV write just stored in
the paged cache, rotated and normalised). This kernel reads the causal part of each request's
attention -- its keys inside the chunk -- from there, by TMA tensor-descriptor loads (one
descriptor per program, bounded by the request's own rows so nothing of a neighbour is read and
the tail reads zeros), and only the cached prefix (keys before the chunk: prefix caching, earlier
chunks) through the block table, with the portable kernel's gather (`_attn_tile` of
paged_attention_triton.py, any page size). Per program and kv head:

  1. cached prefix [0, prefix)            paged gather, no masks; the last partial tile bounded
  2. chunk keys before the tile's queries  contiguous (TMA), no masks
  3. the causal diagonal                   contiguous (TMA), causal mask

One program owns BLOCK_Q query tokens x the whole GQA group of its kv head (BLOCK_M = BLOCK_Q x
group rows, the group not padded to a power of two: 40 / 8 heads packs 25 tokens x 5 heads into
128 rows), so every K/V tile is read once per kv head. Grid (kv head, request, query tile) with
the query tiles in reverse order: CUDA starts blocks in grid order, so the heaviest (latest)
tiles of every request run first and the light ones fill the tail.

Warp specialisation (`hopper_ws=True`, FlashAttention-3's producer / consumer warp groups):
Triton 3.6's automatic pass for sm_90 (`tl.range(..., warp_specialize=True)`, num_warps=4)
only takes a single loop whose loads are all TMA, over a 2-D query tile, with no early return;
on the kernel above it silently does nothing (the prefix gather, the second loop and the GQA
reshape), and variants with those aborted the compiler. So batches without a cached prefix
(fresh prompts) can run `_fresh_ws_kernel` instead: one q head x BLOCK_M tokens a program, one
TMA loop with the causal mask on every tile; the compiler makes it a 4-warp producer plus two
64-row consumer groups (12 warps). Whether it beats the packed kernel is for the H100 sweep.

Numerics match the portable kernel: q and the new keys/values are cast to the cache dtype (what
the reference reads back from the cache), softmax in float32 in the exp2 domain, matmuls
accumulate in float32 (IEEE fp32 for float32 caches). Rows of a request with a context shorter
than its query (CUDA-graph padding, seq_len 0) get zeros. Rows with query_len == 1 are left to
the split-KV decode kernel, as `paged_attention` does.

What runs elsewhere (`prefill_attention` falls back to `paged_attention_triton.paged_attention`):
decode-only batches, FP8 caches, CUDA-graph verify batches (`meta.uniform_query_len`: 1 + k
tokens a request, nearly all prefix, and a launch that must not allocate), and calls without the
step's k / v.

TMA: `tl.make_tensor_descriptor` builds the descriptors on the device, which needs a scratch
allocator (`triton.set_allocator`); `prefill_attention` installs one (torch.empty on the device)
for the calling thread before each TMA launch. Where TMA cannot apply (k / v rows not 16-byte
aligned, no sm_90) or `hopper_tma=False`, the same kernel reads the chunk with plain masked loads.
Under TRITON_INTERPRET=1 (CPU tests) both paths run: the interpreter emulates tensor
descriptors; K/V/Q are upcast to float32 after loading (the interpreter mishandles bf16 dots).

Launch configuration: `HOPPER_KEYS` in the same `config` dict as the portable kernel's keys
(those are ignored here): hopper_block_m, hopper_block_n (chunk keys per tile),
hopper_prefix_block_n (cached keys per tile), hopper_warps, hopper_stages, hopper_tma, hopper_ws
(fresh prompts on the warp-specialised kernel, with hopper_block_m tokens of one head).
`scripts/gpu_check_attention.py --hopper-configs` times alternatives on an H100;
`scripts/sm90_prefill_build.py` builds both kernels for sm_90 on any machine (registers, spills,
shared memory, whether warp specialisation applied).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dlengine.kernels.attention import paged_attention_triton as portable
from dlengine.kernels.attention.paged_attention_triton import LOG2E, _attn_tile, load_kv_tile
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.kv_quant import is_fp8

MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y / gridDim.z


@triton.jit
def _chunk_tile(k_desc, v_desc, k_base, v_base, j0, q_len, stride_kt, stride_vt, offs_n, offs_d,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr, BOUND: tl.constexpr):
    """K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] of chunk keys j0 .. j0 + BLOCK_N (local to
    the request). TMA zero-fills rows past the request's q_len and columns past HEAD_DIM; plain
    loads mask them (rows only when BOUND)."""
    if USE_TMA:
        kt = tl.trans(k_desc.load([j0, 0]))
        v = v_desc.load([j0, 0])
    else:
        rows = j0 + offs_n
        k_ptrs = k_base + rows[None, :].to(tl.int64) * stride_kt + offs_d[:, None]
        v_ptrs = v_base + rows[:, None].to(tl.int64) * stride_vt + offs_d[None, :]
        kt, v = load_kv_tile(k_ptrs, v_ptrs, rows < q_len, offs_d, HEAD_DIM, BLOCK_D, BOUND)
    return kt, v


@triton.jit
def _softmax_step(acc, l_i, m_i, q, kt, v, qk_scale, keep,
                  MASKED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Fold one tile of keys into (acc, l_i, m_i); keys outside `keep` (MASKED only) count as -inf.
    Every row sees at least one key in the first tile it folds (the caller's loop order), so m
    never stays -inf and needs no guard."""
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    else:  # the chunk's keys in the cache dtype (q's here): what the reference reads back
        kt = kt.to(q.dtype)
        v = v.to(q.dtype)
    if IEEE:
        qk = tl.dot(q, kt, input_precision="ieee")
    else:
        qk = tl.dot(q, kt)
    if MASKED:
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["num_q_tiles", "stride_bt"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
    qk_scale, num_q_tiles,
    stride_qt, stride_qh,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NP: tl.constexpr,
    PAGE: tl.constexpr, SKIP_DECODE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    q_tile = num_q_tiles - 1 - tl.program_id(2)  # heaviest (latest) query tiles first
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if SKIP_DECODE:
        if q_len == 1:
            return  # the decode kernel owns it
    first_q = q_tile * BLOCK_Q  # the tile's first query, local to the request's chunk
    if first_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_local = first_q + rows // GROUP
    heads = kvh * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_local < q_len)
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
    else:
        q = q.to(kc_ptr.dtype.element_ty)  # dots run in the cache dtype

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 1. the cached prefix: every row sees all of it; gathered through the block table
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    kc_base = kc_ptr + kvh * stride_kch
    vc_base = vc_ptr + kvh * stride_vch
    full_prefix = (prefix // BLOCK_NP) * BLOCK_NP
    for start_n in range(0, full_prefix, BLOCK_NP):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, q_local, kc_base, vc_base, bt_row, start_n, prefix, qk_scale,
                                   stride_kcb, stride_kcs, stride_vcb, stride_vcs, offs_d,
                                   HEAD_DIM, BLOCK_D, BLOCK_NP, PAGE, False, False, UPCAST, IEEE, False)
    if full_prefix < prefix:
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, q_local, kc_base, vc_base, bt_row, full_prefix, prefix, qk_scale,
                                   stride_kcb, stride_kcs, stride_vcb, stride_vcs, offs_d,
                                   HEAD_DIM, BLOCK_D, BLOCK_NP, PAGE, True, False, UPCAST, IEEE, False)

    # 2. + 3. the chunk's own keys, read from this step's k / v (local index j = position - prefix)
    k_base = k_ptr + q_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = v_ptr + q_start.to(tl.int64) * stride_vt + kvh * stride_vh
    if USE_TMA:  # bounded by this request's rows: past q_len (and HEAD_DIM) TMA reads zeros
        k_desc = tl.make_tensor_descriptor(k_base, shape=[q_len, HEAD_DIM], strides=[stride_kt, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[q_len, HEAD_DIM], strides=[stride_vt, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
    else:
        k_desc = k_base
        v_desc = v_base
    offs_n = tl.arange(0, BLOCK_N)
    # keys before the tile's first query are visible to every row of the tile: no masks
    free_end = (first_q // BLOCK_N) * BLOCK_N
    for j0 in range(0, free_end, BLOCK_N):
        kt, v = _chunk_tile(k_desc, v_desc, k_base, v_base, j0, q_len, stride_kt, stride_vt, offs_n, offs_d,
                            HEAD_DIM, BLOCK_D, USE_TMA, False)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, kt, v, qk_scale, row_ok[:, None], False, UPCAST, IEEE)
    # the diagonal: key j is visible to query i when j <= i (and j < q_len follows for real rows)
    diag_end = tl.minimum(q_len, first_q + BLOCK_Q)
    for j0 in range(free_end, diag_end, BLOCK_N):
        kt, v = _chunk_tile(k_desc, v_desc, k_base, v_base, j0, q_len, stride_kt, stride_vt, offs_n, offs_d,
                            HEAD_DIM, BLOCK_D, USE_TMA, True)
        keep = (j0 + offs_n)[None, :] <= q_local[:, None]
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, kt, v, qk_scale, keep, True, UPCAST, IEEE)

    o = acc / l_i[:, None]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_q_tiles"])
def _fresh_ws_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
    qk_scale, num_q_tiles,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, SKIP_DECODE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    """Fresh prompts only (no cached prefix; the host checks): one q head and BLOCK_M query tokens
    per program, everything read by TMA, and one loop with the causal mask on every tile -- the
    shape Triton 3.6's automatic warp specialisation for sm_90 accepts (a producer warp group plus
    two consumer warp groups of 64 rows). A second loop, a gathered load or a reshaped (GQA-packed)
    query tile make that compiler pass give up or fail, hence this separate kernel."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    q_tile = num_q_tiles - 1 - tl.program_id(2)  # heaviest (latest) query tiles first
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    first_q = q_tile * BLOCK_M
    # no early returns (the pass asserts on unstructured control flow): programs with nothing to
    # do run an empty loop and store nothing. Padding (context shorter than the query, CUDA-graph
    # batch slot) stores zeros; decode rows are the decode kernel's when SKIP_DECODE
    live = (first_q < q_len) & (tl.load(seq_lens_ptr + b) >= q_len)
    kv_end = tl.where(live, tl.minimum(q_len, first_q + BLOCK_M), 0)
    kvh = h // GROUP
    q_desc = tl.make_tensor_descriptor(q_ptr + q_start.to(tl.int64) * stride_qt + h * stride_qh,
                                       shape=[q_len, HEAD_DIM], strides=[stride_qt, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(k_ptr + q_start.to(tl.int64) * stride_kt + kvh * stride_kh,
                                       shape=[q_len, HEAD_DIM], strides=[stride_kt, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(v_ptr + q_start.to(tl.int64) * stride_vt + kvh * stride_vh,
                                       shape=[q_len, HEAD_DIM], strides=[stride_vt, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    q = q_desc.load([first_q, 0])
    if UPCAST:
        q = q.to(tl.float32)
    else:
        q = q.to(kc_ptr.dtype.element_ty)  # dots run in the cache dtype
    offs_m = first_q + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j0 in tl.range(0, kv_end, BLOCK_N, warp_specialize=WARP_SPEC):
        kt = tl.trans(k_desc.load([j0, 0]))
        v = v_desc.load([j0, 0])
        keep = (j0 + offs_n)[None, :] <= offs_m[:, None]
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, kt, v, qk_scale, keep, True, UPCAST, IEEE)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padding: l = 0, acc = 0 -> zeros
    offs_d = tl.arange(0, BLOCK_D)
    tok = (q_start + offs_m).to(tl.int64)
    o_ptrs = out_ptr + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    row_ok = offs_m < q_len
    if SKIP_DECODE:  # (q_len broadcast to a tensor: the interpreter rejects scalar-bool & tensor masks)
        row_ok = row_ok & ((offs_m * 0 + q_len) != 1)
    st_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=st_mask)


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------

_INTERPRET = type(_prefill_kernel).__name__ == "InterpretedFunction"

HOPPER_KEYS = ("hopper_block_m", "hopper_block_n", "hopper_prefix_block_n", "hopper_warps", "hopper_stages",
               "hopper_ws", "hopper_tma")


@functools.lru_cache(maxsize=None)
def default_config(head_dim: int, itemsize: int, interpret: bool = _INTERPRET) -> dict:
    """The shipped tiles for a head dim and element size (bytes). Chosen before any H100 sweep:
    FlashAttention-3's shape of work (128 query rows on 8 warps, two warpgroups) with 64-key tiles
    that leave room for 3 pipeline stages in shared memory (Triton 3.6, sm_90, bf16, d=128: 178
    registers, no spills, 129 KB; scripts/sm90_prefill_build.py); `gpu_check_attention.py
    --hopper-configs` times the alternatives."""
    if interpret:
        return dict(hopper_block_m=32, hopper_block_n=16, hopper_prefix_block_n=16, hopper_warps=4,
                    hopper_stages=1, hopper_ws=False, hopper_tma=True)
    if itemsize >= 4:  # float32: IEEE fp32 FMA dots, smaller tiles
        return dict(hopper_block_m=64 if head_dim <= 64 else 32, hopper_block_n=32, hopper_prefix_block_n=32,
                    hopper_warps=4, hopper_stages=2, hopper_ws=False, hopper_tma=True)
    if head_dim <= 128:
        return dict(hopper_block_m=128, hopper_block_n=64, hopper_prefix_block_n=64, hopper_warps=8,
                    hopper_stages=3, hopper_ws=False, hopper_tma=True)
    # head_dim 256: 64 rows on 8 warps (4 warps spill at 255 registers with Triton 3.6)
    return dict(hopper_block_m=64, hopper_block_n=64, hopper_prefix_block_n=32, hopper_warps=8, hopper_stages=2,
                hopper_ws=False, hopper_tma=True)


class _Plan:
    """Launch constants for one (dtypes, heads, head_dim, page, config) combination."""

    def __init__(self, q_dtype, kv_dtype, num_heads, num_kv_heads, head_dim, kv_head_dim, page, config: dict):
        if num_heads % num_kv_heads or head_dim != kv_head_dim:
            raise ValueError(f"q heads {num_heads} x {head_dim} vs kv heads {num_kv_heads} x {kv_head_dim}")
        unknown = sorted(k for k in config if k.startswith("hopper_") and k not in HOPPER_KEYS)
        if unknown:
            raise ValueError(f"unknown hopper prefill config key(s) {unknown}; known: {list(HOPPER_KEYS)}")
        itemsize = max(torch.empty((), dtype=q_dtype).element_size(), torch.empty((), dtype=kv_dtype).element_size())
        cfg = dict(default_config(head_dim, itemsize, _INTERPRET))
        cfg.update({k: v for k, v in config.items() if k in HOPPER_KEYS})
        self.group = num_heads // num_kv_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_d = triton.next_power_of_2(head_dim)
        self.page = page
        self.upcast = _INTERPRET  # the interpreter mishandles bf16 arithmetic and bf16 dots
        self.ieee = _INTERPRET or kv_dtype == torch.float32  # no TF32 for float32 dots
        # BLOCK_M rows = BLOCK_Q query tokens x the (unpadded) GQA group; at least 16 rows (tl.dot's M)
        self.block_m = max(int(cfg["hopper_block_m"]), triton.next_power_of_2(self.group), 16)
        self.block_q = self.block_m // self.group
        self.block_n = int(cfg["hopper_block_n"])
        self.prefix_block_n = int(cfg["hopper_prefix_block_n"])
        self.warps, self.stages = int(cfg["hopper_warps"]), int(cfg["hopper_stages"])
        for key in ("hopper_block_m", "hopper_block_n", "hopper_prefix_block_n"):
            if cfg[key] < 16 or cfg[key] & (cfg[key] - 1):
                raise ValueError(f"{key}={cfg[key]}: tiles are powers of two >= 16 (tl.dot's minimum)")
        self.warp_spec = bool(cfg["hopper_ws"])
        self.ws_block_m = int(cfg["hopper_block_m"])  # query tokens of one head (no GQA packing)
        self.tma = bool(cfg["hopper_tma"])
        self.config = cfg


@functools.lru_cache(maxsize=256)
def _plan(q_dtype, kv_dtype, num_heads, num_kv_heads, head_dim, kv_head_dim, page, config_items) -> _Plan:
    return _Plan(q_dtype, kv_dtype, num_heads, num_kv_heads, head_dim, kv_head_dim, page, dict(config_items))


def _get_plan(q: torch.Tensor, k_cache: torch.Tensor, config: dict | None) -> _Plan:
    _, num_heads, head_dim = q.shape
    _, page, num_kv_heads, kv_head_dim = k_cache.shape
    return _plan(q.dtype, k_cache.dtype, num_heads, num_kv_heads, head_dim, kv_head_dim, page,
                 tuple(sorted(config.items())) if config else ())


def _tma_ok(t: torch.Tensor, head_dim: int) -> bool:
    """Whether TMA can read t's [rows, head_dim] slices: 16-byte aligned base, row stride and head
    offsets, and a row of at least 16 bytes."""
    if _INTERPRET:
        return True
    size = t.element_size()
    return (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9 and t.data_ptr() % 16 == 0
            and (t.stride(0) * size) % 16 == 0 and (t.stride(1) * size) % 16 == 0 and head_dim * size >= 16)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for the in-kernel TMA descriptors (torch allocations are 256-byte aligned)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def applies(meta: AttentionMetadata, k_cache: torch.Tensor) -> bool:
    """Whether `prefill_attention` runs this kernel on the batch (else the portable kernels)."""
    return meta.max_query_len > 1 and meta.uniform_query_len is None and not is_fp8(k_cache.dtype)


# --------------------------------------------------------------------------------------------------
# host entry points
# --------------------------------------------------------------------------------------------------


def prefill_extend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor, *,
                   skip_decode: bool = False, config: dict | None = None) -> torch.Tensor:
    """Causal attention of the rows with query_len > 1 into `out`, reading the chunk's keys from
    k / v ([T, Hkv, D], already stored in the cache) and the cached prefix from the cache.
    query_len == 1 rows are computed too unless skip_decode (then left untouched)."""
    p = _get_plan(q, k_cache, config)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    num_q_tiles = -(-meta.max_query_len // p.block_q)
    num_seqs = len(meta.seq_lens_cpu)
    if num_q_tiles > MAX_GRID_YZ or num_seqs > MAX_GRID_YZ:
        raise ValueError(f"prefill grid of {num_q_tiles} query tiles x {num_seqs} requests exceeds CUDA's "
                         f"{MAX_GRID_YZ}; use paged_attention_triton.paged_extend")
    use_tma = p.tma and _tma_ok(k, p.head_dim) and _tma_ok(v, p.head_dim)
    if use_tma and not _INTERPRET:
        triton.set_allocator(_scratch)  # this thread's descriptor scratch (a ContextVar in triton)
    if p.warp_spec and use_tma and _tma_ok(q, p.head_dim) and _no_cached_prefix(meta):
        return _launch_fresh_ws(q, k, v, k_cache, meta, scale, out, skip_decode, p)
    qs, ks, vs, kcs, vcs, os_ = q.stride(), k.stride(), v.stride(), k_cache.stride(), v_cache.stride(), out.stride()
    _prefill_kernel[(p.num_kv_heads, num_seqs, num_q_tiles)](
        q, k, v, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
        scale * LOG2E, num_q_tiles,
        qs[0], qs[1], ks[0], ks[1], vs[0], vs[1],
        kcs[0], kcs[1], kcs[2], vcs[0], vcs[1], vcs[2],
        meta.block_tables.stride(0), os_[0], os_[1],
        GROUP=p.group, BLOCK_Q=p.block_q, BLOCK_M=p.block_m,
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_N=p.block_n, BLOCK_NP=p.prefix_block_n, PAGE=p.page,
        SKIP_DECODE=skip_decode, UPCAST=p.upcast, IEEE=p.ieee, USE_TMA=use_tma,
        num_warps=p.warps, num_stages=p.stages,
    )
    return out


def _no_cached_prefix(meta: AttentionMetadata) -> bool:
    return all(sl <= ql for ql, sl in zip(meta.query_lens_cpu, meta.seq_lens_cpu) if ql > 1)


def _launch_fresh_ws(q, k, v, k_cache, meta, scale, out, skip_decode, p: _Plan) -> torch.Tensor:
    num_q_tiles = -(-meta.max_query_len // p.ws_block_m)
    num_heads = q.shape[1]
    qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), out.stride()
    _fresh_ws_kernel[(num_heads, len(meta.seq_lens_cpu), num_q_tiles)](
        q, k, v, k_cache, meta.seq_lens, meta.query_start_loc, out,
        scale * LOG2E, num_q_tiles,
        qs[0], qs[1], ks[0], ks[1], vs[0], vs[1], os_[0], os_[1],
        GROUP=p.group, BLOCK_M=p.ws_block_m, HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_N=p.block_n,
        SKIP_DECODE=skip_decode, UPCAST=p.upcast, IEEE=p.ieee, WARP_SPEC=not _INTERPRET,
        num_warps=4, num_stages=p.stages,  # 4: the compiler adds the producer and a second consumer group
    )
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, *,
                      out: torch.Tensor | None = None, num_splits: int | None = None, config: dict | None = None,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`paged_attention_triton.paged_attention` with this kernel for the query_len > 1 rows.

    q [T, H, D]; k / v [T, Hkv, D]: this step's keys and values, already written to the caches
    (the values the cache holds, before any FP8 quantisation). Batches the kernel does not take
    (`applies`) run the portable kernels unchanged; decode rows of a mixed batch run the split-KV
    decode kernel. Same output as the portable path, within rounding.
    """
    if not applies(meta, k_cache) or -(-meta.max_query_len // _get_plan(q, k_cache, config).block_q) > MAX_GRID_YZ:
        return portable.paged_attention(q, k_cache, v_cache, meta, scale, out=out, num_splits=num_splits,
                                        config=config, k_scale=k_scale, v_scale=v_scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0 or not meta.seq_lens_cpu:
        return out
    has_decode = 1 in meta.query_lens_cpu
    prefill_extend(q, k, v, k_cache, v_cache, meta, scale, out, skip_decode=has_decode, config=config)
    if has_decode:
        portable.paged_decode(q, k_cache, v_cache, meta, scale, out, mixed=True, num_splits=num_splits,
                              config=config)
    return out


def interpret_mode() -> bool:
    """Whether the kernel of this module was built for the Triton CPU interpreter."""
    return _INTERPRET


__all__ = ["HOPPER_KEYS", "applies", "default_config", "interpret_mode", "prefill_attention", "prefill_extend"]
