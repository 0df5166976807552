"""Triton kernel of MLA's non-absorbed (expanded) prefill / extend, used by
`triton_mla._expanded` for requests with long queries.

The context of each request has been expanded through kv_b_proj into one contiguous
[S, H, nope + v] tensor (k_nope and v are column views of it, nothing is copied) and the shared,
already rotated k_pe rows stay in the gathered latent rows ([S, rope], a view). Scores are
q_nope . k_nope + q_pe . k_pe (two dots: no per-head copy of k_pe, no concatenated 192-wide key
padded to 256 lanes), the output has v's own width. Causal with the queries being the last
query_len positions of each context.

Grid (query tile, request, head): one program runs BLOCK_M query tokens of one head over the
keys up to the tile's last query, online softmax in float32 (exp2 domain). Under the
interpreter loaded values are upcast to float32, as in attention/paged_attention_triton.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

EXTEND_DEFAULTS = dict(block_m=64, block_n=64, num_warps=4, num_stages=2)  # bf16/fp16 on GPUs
EXTEND_DEFAULTS_FP32 = dict(block_m=32, block_n=32, num_warps=4, num_stages=1)
EXTEND_DEFAULTS_INTERPRET = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)


@triton.jit(do_not_specialize=["num_q_tiles", "stride_qt", "stride_qh", "stride_qpt", "stride_qph",
                               "stride_ot", "stride_oh"])
def _mla_extend_kernel(
    qn_ptr, qp_ptr, kn_ptr, kp_ptr, v_ptr, qsl_ptr, seq_ptr, ctx_ptr, out_ptr,
    qk_scale, num_q_tiles,
    stride_qt, stride_qh, stride_qpt, stride_qph,
    stride_kt, stride_kh, stride_kpt, stride_vt, stride_vh,
    stride_ot, stride_oh,
    NOPE: tl.constexpr, BLOCK_NOPE: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
    VD: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    q_tile = num_q_tiles - 1 - tl.program_id(0)  # heaviest (latest) query tiles first
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if q_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_ptr + b)
    ctx0 = tl.load(ctx_ptr + b).to(tl.int64)  # first expanded row of this request
    prefix = seq_len - q_len

    offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    q_pos = prefix + offs_m
    tok = (q_start + offs_m).to(tl.int64)
    offs_dn = tl.arange(0, BLOCK_NOPE)
    offs_r = tl.arange(0, BLOCK_R)
    offs_v = tl.arange(0, BLOCK_V)
    qn = tl.load(qn_ptr + tok[:, None] * stride_qt + h * stride_qh + offs_dn[None, :],
                 mask=m_ok[:, None] & (offs_dn[None, :] < NOPE), other=0.0)
    qp = tl.load(qp_ptr + tok[:, None] * stride_qpt + h * stride_qph + offs_r[None, :],
                 mask=m_ok[:, None] & (offs_r[None, :] < ROPE), other=0.0)
    if UPCAST:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)
    else:
        qn = qn.to(kn_ptr.dtype.element_ty)
        qp = qp.to(kn_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    kv_end = tl.minimum(seq_len, prefix + tl.minimum((q_tile + 1) * BLOCK_M, q_len))
    for start_n in range(0, kv_end, BLOCK_N):
        pos = start_n + tl.arange(0, BLOCK_N)
        n_ok = pos < kv_end
        rows = ctx0 + pos
        knt = tl.load(kn_ptr + rows[None, :] * stride_kt + h * stride_kh + offs_dn[:, None],
                      mask=n_ok[None, :] & (offs_dn[:, None] < NOPE), other=0.0)  # [BLOCK_NOPE, BLOCK_N]
        kpt = tl.load(kp_ptr + rows[None, :] * stride_kpt + offs_r[:, None],
                      mask=n_ok[None, :] & (offs_r[:, None] < ROPE), other=0.0)  # [BLOCK_R, BLOCK_N]
        v = tl.load(v_ptr + rows[:, None] * stride_vt + h * stride_vh + offs_v[None, :],
                    mask=n_ok[:, None] & (offs_v[None, :] < VD), other=0.0)  # [BLOCK_N, BLOCK_V]
        if UPCAST:
            knt = knt.to(tl.float32)
            kpt = kpt.to(tl.float32)
            v = v.to(tl.float32)
        else:
            kpt = kpt.to(kn_ptr.dtype.element_ty)
        if IEEE:
            s = tl.dot(qn, knt, input_precision="ieee")
            s = tl.dot(qp, kpt, s, input_precision="ieee")
        else:
            s = tl.dot(qn, knt)
            s = tl.dot(qp, kpt, s)
        s = s * qk_scale
        ok = (pos[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o_ptrs = out_ptr + tok[:, None] * stride_ot + h * stride_oh + offs_v[None, :]
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_v[None, :] < VD))


_INTERPRET = type(_mla_extend_kernel).__name__ == "InterpretedFunction"


def mla_extend(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
               v: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, ctx_start: torch.Tensor,
               max_query_len: int, scale: float, out: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """Causal attention of q = [q_nope | q_pe] ([T, H, nope], [T, H, rope]) over expanded
    contexts: request i's keys are rows ctx_start[i] .. ctx_start[i] + seq_lens[i] of k_nope
    [S, H, nope], k_pe [S, rope] (shared by the heads) and v [S, H, vd]; its queries are rows
    query_start_loc[i] .. [i+1] (the last positions of its context). Writes out [T, H, vd].
    Every tensor needs unit stride on its last dim; k_nope / v / k_pe may be column views."""
    num_reqs = seq_lens.shape[0]
    _, num_heads, nope = q_nope.shape
    rope, vd = q_pe.shape[-1], v.shape[-1]
    if num_reqs == 0 or q_nope.shape[0] == 0:
        return out
    if _INTERPRET:
        cfg = dict(EXTEND_DEFAULTS_INTERPRET)
    elif k_nope.dtype == torch.float32:
        cfg = dict(EXTEND_DEFAULTS_FP32)
    else:
        cfg = dict(EXTEND_DEFAULTS)
    cfg.update(config or {})
    num_q_tiles = -(-max_query_len // cfg["block_m"])
    _mla_extend_kernel[(num_q_tiles, num_reqs, num_heads)](
        q_nope, q_pe, k_nope, k_pe, v, query_start_loc, seq_lens, ctx_start, out,
        scale * LOG2E, num_q_tiles,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        k_nope.stride(0), k_nope.stride(1), k_pe.stride(0), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        NOPE=nope, BLOCK_NOPE=max(16, triton.next_power_of_2(nope)), ROPE=rope,
        BLOCK_R=max(16, triton.next_power_of_2(rope)), VD=vd, BLOCK_V=max(16, triton.next_power_of_2(vd)),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], UPCAST=_INTERPRET,
        IEEE=_INTERPRET or k_nope.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def interpret_mode() -> bool:
    return _INTERPRET


__all__ = ["mla_extend", "EXTEND_DEFAULTS", "interpret_mode"]
