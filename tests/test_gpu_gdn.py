"""GPU checks of the Gated DeltaNet kernels and a hybrid engine (need a CUDA device, e.g. an H100;
skipped on CPU).

At the released Qwen3.5-MoE head dims (Dk = Dv = 128, two value heads per key head), bf16
activations and float32 states: the Triton chunk kernel (with and without a prefix-cache
checkpoint inside a request), the recurrent update and both conv1d kernels against the torch
references, and against fla-core's chunk kernel when it imports; the decode kernels captured in a
CUDA graph and replayed with other slots; a tiny Qwen3.5-MoE engine on the GPU against
transformers (float32 logits) with prefix-cache hits on a second round.
"""

import pytest
import torch

from dlengine.kernels.gdn import (causal_conv1d_torch, causal_conv1d_triton, gated_delta_rule_torch,
                                  gated_delta_rule_triton)
from dlengine.kernels.selection import HAS_FLA

pytestmark = pytest.mark.gpu
HK, HV, DK, DV, D_CONV, K = 4, 8, 128, 128, 1024, 4
LENS = [1, 63, 64, 300, 1000]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()


def gdn_inputs(T: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, HK, DK, device="cuda", generator=g).bfloat16()
    k = torch.randn(T, HK, DK, device="cuda", generator=g).bfloat16()
    v = torch.randn(T, HV, DV, device="cuda", generator=g).bfloat16()
    decay = -torch.rand(T, HV, device="cuda", generator=g) * 0.3
    beta = torch.rand(T, HV, device="cuda", generator=g).bfloat16()
    return q, k, v, decay, beta


@pytest.mark.parametrize("checkpoint", [False, True])
def test_chunk_kernel_matches_reference(checkpoint):
    q, k, v, g, beta = gdn_inputs(sum(LENS))
    slots, resume = [4, 0, 2, 1, 3], [False, True, True, False, True]
    states = torch.randn(8, HV, DK, DV, device="cuda") * 0.1
    ck = dict(checkpoint_slots=[-1, 5, -1, 6, 7], checkpoint_offsets=[0, 17, 0, 128, 999]) if checkpoint else {}
    s_ref, s_tri = states.clone(), states.clone()
    ref = gated_delta_rule_torch.gated_delta_rule_varlen(q, k, v, g, beta, s_ref, LENS, slots, resume, **ck)
    out = gated_delta_rule_triton.gated_delta_rule_varlen(q, k, v, g, beta, s_tri, LENS, slots, resume, **ck)
    assert rel(out, ref) < 1e-2  # bf16 outputs
    assert rel(s_tri, s_ref) < 1e-4  # float32 states
    if HAS_FLA and not checkpoint:
        from dlengine.kernels.gdn import gated_delta_rule_fla

        s_fla = states.clone()
        fla = gated_delta_rule_fla.gated_delta_rule_varlen(q, k, v, g, beta, s_fla, LENS, slots, resume)
        assert rel(fla, ref) < 2e-2 and rel(s_fla, s_ref) < 1e-2


def test_conv_kernels_match_reference():
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(sum(LENS), D_CONV, device="cuda", generator=gen).bfloat16()
    w = torch.randn(D_CONV, K, device="cuda", generator=gen).bfloat16()
    states = torch.randn(8, D_CONV, K - 1, device="cuda", generator=gen).bfloat16()
    args = (LENS, [4, 0, 2, 1, 3], [False, True, True, False, True])
    ck = dict(checkpoint_slots=[-1, 5, -1, 6, 7], checkpoint_offsets=[0, 2, 0, 128, 999])
    s_ref, s_tri = states.clone(), states.clone()
    ref = causal_conv1d_torch.causal_conv1d_varlen(x, w, s_ref, *args, **ck)
    out = causal_conv1d_triton.causal_conv1d_varlen(x, w, s_tri, *args, **ck)
    assert rel(out, ref) < 1e-2 and torch.equal(s_tri, s_ref)
    xb = x[:6]
    slots, res = torch.tensor([3, 0, 7, 1, 2, 6], device="cuda"), torch.tensor([1, 0, 1, 1, 0, 1], device="cuda").bool()
    s_ref, s_tri = states.clone(), states.clone()
    ref = causal_conv1d_torch.causal_conv1d_update(xb, w, s_ref, slots, res)
    out = causal_conv1d_triton.causal_conv1d_update(xb, w, s_tri, slots, res)
    assert rel(out, ref) < 1e-2 and torch.equal(s_tri, s_ref)


def test_decode_step_captures_in_a_cuda_graph():
    """conv update + recurrent update captured once, replayed with other slots and inputs written
    into the same buffers: equals the references, and padded rows (slot -1) write nothing."""
    B = 16
    q, k, v, g, beta = gdn_inputs(B, seed=2)
    x = torch.randn(B, D_CONV, device="cuda").bfloat16()
    w = torch.randn(D_CONV, K, device="cuda").bfloat16()
    conv = torch.randn(32, D_CONV, K - 1, device="cuda").bfloat16()
    ssm = torch.randn(32, HV, DK, DV, device="cuda") * 0.1
    slots = torch.arange(B, device="cuda")
    resume = torch.ones(B, dtype=torch.bool, device="cuda")

    def step():
        y = causal_conv1d_triton.causal_conv1d_update(x, w, conv, slots, resume)
        o = gated_delta_rule_triton.recurrent_gated_delta_rule_update(q, k, v, g, beta, ssm, slots, resume)
        return y, o

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_out, o_out = step()
    new_slots = torch.randperm(32, device="cuda")[:B]
    new_slots[-2:] = -1  # padded rows
    slots.copy_(new_slots)
    x.copy_(torch.randn_like(x))
    conv_ref, ssm_ref = conv.clone(), ssm.clone()
    graph.replay()
    live = new_slots >= 0
    y_ref = causal_conv1d_torch.causal_conv1d_update(x[live], w, conv_ref, new_slots[live], resume[live])
    o_ref = gated_delta_rule_torch.recurrent_gated_delta_rule_update(q[live], k[live], v[live], g[live], beta[live],
                                                                      ssm_ref, new_slots[live], resume[live])
    assert rel(y_out[live], y_ref) < 1e-2 and rel(o_out[live], o_ref) < 1e-2
    assert torch.equal(conv, conv_ref) and rel(ssm, ssm_ref) < 1e-5


def test_tiny_hybrid_engine_on_gpu_matches_transformers():
    from dlengine import EngineBuilder, SamplingParams
    from dlengine.testing import tiny_checkpoint

    from conftest import make_prompts
    from hf_reference import hf_logits

    path = tiny_checkpoint("qwen3.5-moe")
    engine = EngineBuilder(path).device("cuda").dtype("float32").cache(block_size=16).build()
    assert engine.describe()["kernels"]["gdn"] != "torch"
    prompts = make_prompts(6, lengths=(1, 17, 64, 100, 200, 300))
    for p in prompts[-2:]:
        assert rel(engine.prompt_logits(p).cpu(), hf_logits(path, p)) < 1e-3
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    first = [o.token_ids for o in engine.generate(prompts, greedy)]
    engine.stats.reset()
    assert [o.token_ids for o in engine.generate(prompts, greedy)] == first
    assert engine.stats.num_cached_tokens > 0
