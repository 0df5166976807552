"""Fused Triton ops vs their torch references (CPU: TRITON_INTERPRET=1, tiny sizes)."""

import pytest
import torch

pytest.importorskip("triton")

from dlengine.kernels.norm_rope import norm_rope_torch as ops_torch, norm_rope_triton as triton_ops  # noqa: E402
from dlengine.models.layers.rotary import RotaryEmbedding  # noqa: E402
from dlengine.config import RopeConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def close(a, b, dtype):
    assert not torch.isnan(a).any()
    torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 16), (7, 64), (5, 3, 48)])
def test_rms_norm(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    res = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype)
    close(triton_ops.rms_norm(x, w, 1e-6), ops_torch.rms_norm(x, w, 1e-6), dtype)
    out, r = triton_ops.rms_norm(x, w, 1e-6, res)
    ref_out, ref_r = ops_torch.rms_norm(x, w, 1e-6, res)
    close(out, ref_out, dtype)
    close(r, ref_r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (7, 96), (3, 5, 48)])
def test_zero_centred_rms_norm(dtype, shape):
    """Weights stored as the offset from 1 (Qwen3-Next / Qwen3.5): the Triton kernel matches the
    reference and transformers' formula, norm(x) * (1 + w) in float32, rounded once."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    res = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (0.3 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype)
    xf = x.float()
    hf = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.float())).to(dtype)
    torch.testing.assert_close(ops_torch.rms_norm(x, w, 1e-6, zero_centred=True), hf, rtol=0, atol=0)
    close(triton_ops.rms_norm(x, w, 1e-6, zero_centred=True), hf, dtype)
    out, r = triton_ops.rms_norm(x, w, 1e-6, res, zero_centred=True)
    ref_out, ref_r = ops_torch.rms_norm(x, w, 1e-6, res, zero_centred=True)
    close(out, ref_out, dtype)
    close(r, ref_r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
@pytest.mark.parametrize("shape", [(1, 16), (6, 4, 32)])
def test_gated_rms_norm(dtype, weight_dtype, shape):
    """Gated DeltaNet's output norm: the Triton kernel against the reference (transformers'
    RMSNormGated), weights in the activation dtype or float32."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    gate = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype if weight_dtype == "same" else weight_dtype)
    close(triton_ops.gated_rms_norm(x, gate, w, 1e-6), ops_torch.gated_rms_norm(x, gate, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, d", [(1, 8), (9, 96), (4, 1500)])
def test_silu_and_mul(dtype, rows, d):
    x = torch.randn(rows, 2 * d, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    close(triton_ops.silu_and_mul(x), ops_torch.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (2, 2, 32), (8, 1, 64)])
def test_rope_write_kv(dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(2)
    t, block_size, num_blocks = 11, 4, 8
    rope = RotaryEmbedding(head_dim, 256, RopeConfig(rope_type="yarn", theta=1e4, factor=4.0,
                                                     original_max_position_embeddings=64)).to(DEVICE)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(t, heads, head_dim).contiguous()
    k = k.reshape(t, kv_heads, head_dim).contiguous()
    v = v.reshape(t, kv_heads, head_dim)  # strided view, as the model passes it
    positions = torch.randint(0, 256, (t,), generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t].to(DEVICE)
    slots[3] = -1  # padding token: must not be written
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    ref_q, ref_k = ops_torch.rope(q, k, positions, rope.cos_cached, rope.sin_cached)
    triton_ops.rope_write_kv(q, k, v, positions, rope.cos_cached, rope.sin_cached, slots, k_cache, v_cache)
    close(q, ref_q, dtype)
    close(k, ref_k, dtype)
    flat_k = k_cache.view(-1, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    keep = slots >= 0
    close(flat_k[slots[keep]], ref_k[keep], dtype)
    close(flat_v[slots[keep]], v[keep], dtype)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slots[keep]] = True
    assert torch.isnan(flat_k[~written]).all()  # nothing else touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_write_kv_on_qkv_views(dtype):
    """Fused QK-norm + RoPE + KV write, in place on views of a fused qkv projection (as Qwen3 calls it)."""
    g = torch.Generator().manual_seed(3)
    t, heads, kv_heads, head_dim, block_size, num_blocks = 9, 4, 2, 16, 4, 8
    rope = RotaryEmbedding(head_dim, 128, RopeConfig()).to(DEVICE)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim)
    qw = (1 + 0.3 * torch.randn(head_dim, generator=g)).to(DEVICE, dtype)
    kw = (1 + 0.3 * torch.randn(head_dim, generator=g)).to(DEVICE, dtype)
    positions = torch.randint(0, 128, (t,), generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t].to(DEVICE)
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    ref_q, ref_k = ops_torch.rope(ops_torch.rms_norm(q, qw, 1e-6), ops_torch.rms_norm(k, kw, 1e-6),
                                  positions, rope.cos_cached, rope.sin_cached)
    ref_v = v.clone()
    triton_ops.rope_write_kv(q, k, v, positions, rope.cos_cached, rope.sin_cached, slots, k_cache, v_cache,
                             qw, kw, 1e-6)
    close(q, ref_q, dtype)
    close(k, ref_k, dtype)
    close(k_cache.view(-1, kv_heads, head_dim)[slots], ref_k, dtype)
    close(v_cache.view(-1, kv_heads, head_dim)[slots], ref_v, dtype)
