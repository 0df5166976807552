"""Triton fused MoE vs the torch reference `fused_experts_torch` (CPU: TRITON_INTERPRET=1, tiny sizes)."""

import pytest
import torch

pytest.importorskip("triton")

from dlengine.kernels.moe import fused_moe_triton as fmt  # noqa: E402
from dlengine.kernels import selection  # noqa: E402
from dlengine.kernels.moe.fused_moe_torch import fused_experts_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: the interpreter truncates fp32 -> bf16 casts (three rounding points here), the reference rounds
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def make(t, e, k, h, i, dtype, seed=0, ids=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, generator=g) / i ** 0.5
    probs = torch.softmax(torch.randn(t, e, generator=g), dim=-1)
    if ids is None:
        weights, ids = torch.topk(probs, k, dim=-1)
    else:
        weights = torch.rand(t, k, generator=g) + 0.1  # never zero
    weights = weights / weights.sum(-1, keepdim=True)
    cast = lambda a: a.to(DEVICE, dtype)  # noqa: E731
    return cast(x), cast(w13), cast(w2), weights.to(DEVICE), ids.to(DEVICE)


def check(x, w13, w2, tw, ti, config=None):
    out = fmt.fused_experts_triton(x, w13, w2, tw, ti, config=config)
    ref = fused_experts_torch(x, w13, w2, tw, ti)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any()
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h, i", [(32, 16), (64, 48)])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("e", [4, 8])
@pytest.mark.parametrize("t", [1, 5, 33])
def test_fused_experts_random(t, e, top_k, h, i, dtype):
    check(*make(t, e, top_k, h, i, dtype, seed=t * 100 + e * 10 + top_k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_without_tokens(dtype):
    # 8 experts, only 1 and 6 get tokens; k=2 slots of a token may even hit the same expert twice
    ids = torch.tensor([[1, 6], [6, 1], [6, 6], [1, 1], [6, 1]])
    check(*make(5, 8, 2, 32, 16, dtype, seed=1, ids=ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_on_one_expert(dtype, top_k):
    t = 33  # 33 * k pairs on one expert: several full blocks plus a partial one
    ids = torch.full((t, top_k), 3)
    if top_k == 2:
        ids[:, 1] = 0
    check(*make(t, 4, top_k, 64, 48, dtype, seed=2, ids=ids))


@pytest.mark.parametrize("t, e, top_k", [(5, 4, 2), (33, 8, 2)])
def test_fp16_rounding_points(t, e, top_k):
    # the interpreter rounds fp32 -> fp16 correctly: this pins the rounding points to the reference's
    check(*make(t, e, top_k, 64, 48, torch.float16, seed=7))


def test_nan_poisoned_buffers(monkeypatch):
    """Every row of the intermediate and output buffers must be written (or not read): poison
    torch.empty with NaN."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    x, w13, w2, tw, ti = make(5, 8, 2, 32, 48, torch.float32, seed=3)
    monkeypatch.setattr(torch, "empty", nan_empty)
    check(x, w13, w2, tw, ti)


@pytest.mark.parametrize("h, config", [
    (64, dict(block_m=32, n1=16, k1=64, n2=64, k2=16)),  # block_m wider than most runs; K divisible
    (32, dict(block_m=16, n1=32, k1=64, n2=16, k2=32)),  # K tails (masked) in both GEMMs
])
def test_tile_configs(h, config):
    check(*make(33, 4, 2, h, 48, torch.float32, seed=4), config=config)


def test_zero_tokens():
    x, w13, w2, tw, ti = make(1, 4, 2, 32, 16, torch.float32)
    out = fmt.fused_experts_triton(x[:0], w13, w2, tw[:0], ti[:0])
    assert out.shape == (0, 32)


@pytest.mark.parametrize("block_m", [4, 16])
def test_moe_align_block_size(block_m):
    g = torch.Generator().manual_seed(5)
    t, k, e = 13, 3, 6
    ids = torch.randint(0, e, (t, k), generator=g)
    ids[ids == 2] = 4  # expert 2 gets nothing
    sorted_ids, expert_ids, num_post = fmt.moe_align_block_size(ids.to(DEVICE), e, block_m)
    sorted_ids, expert_ids, n = sorted_ids.cpu(), expert_ids.cpu(), int(num_post.item())
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=e)
    assert n == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert sorted_ids.numel() == expert_ids.numel() * block_m >= n
    assert (expert_ids[n // block_m:] == -1).all() and (sorted_ids[n:] == t * k).all()
    used = sorted_ids[:n]
    valid = used[used < t * k]
    assert sorted(valid.tolist()) == list(range(t * k))  # every pair exactly once
    for b in range(n // block_m):
        ex = int(expert_ids[b])
        blk = sorted_ids[b * block_m:(b + 1) * block_m]
        blk = blk[blk < t * k].long()
        assert blk.numel() > 0 and (flat[blk] == ex).all()
        assert blk.tolist() == sorted(blk.tolist())  # stable: token order kept within an expert
    assert expert_ids[: n // block_m].tolist() == sorted(expert_ids[: n // block_m].tolist())


def test_ops_dispatch_matches_reference():
    x, w13, w2, tw, ti = make(5, 4, 2, 32, 16, torch.float32, seed=6)
    out = selection.select_ops(x.device).fused_experts(x, w13, w2, tw, ti)
    ref = fused_experts_torch(x, w13, w2, tw, ti)
    if x.is_cuda and selection.HAS_FUSED_MOE:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(out, ref)  # CPU: the torch reference itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 9])
def test_clamped_swiglu_experts_match_deepseek_v4_reference(dtype, t):
    """The clamped epilogue (DeepSeek-V4: silu(min(gate, limit)) * clamp(up, -limit, limit)) against
    the per-expert reference, with a limit small enough that most gate and up values are clamped."""
    from dlengine.kernels.v4.reference import clamped_swiglu_experts

    x, w13, w2, tw, ti = make(t, 6, 2, 32, 16, dtype, seed=7 + t)
    w13 = w13 * 4  # spread gate / up well past the limit
    limit = 0.5
    out = fmt.fused_experts_clamped_triton(x, w13, w2, tw, ti, limit)
    ref = clamped_swiglu_experts(x, w13, w2, tw, ti, limit)
    gate_up = torch.einsum("th,eih->tei", x.float(), w13.float())
    assert (gate_up.abs() > limit).float().mean() > 0.5  # the clamp really acts
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    unclamped = fmt.fused_experts_triton(x, w13, w2, tw, ti)
    assert not torch.allclose(unclamped.float(), ref.float(), atol=tol, rtol=tol)
