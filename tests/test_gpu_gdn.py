"""GPU checks of the Gated DeltaNet kernels and a hybrid engine (need a CUDA device, e.g. an H100;
skipped on CPU).

At the released Qwen3.5-MoE head dims (Dk = Dv = 128, two value heads per key head), bf16
activations and float32 states: the Triton chunk kernel (with and without a prefix-cache
checkpoint inside a request), the recurrent update and both conv1d kernels against the torch
references, and against fla-core's chunk kernel when it imports; the decode kernels (Triton and
the torch references) captured in a CUDA graph and replayed with other slots and padded rows; a
tiny Qwen3.5-MoE engine on the GPU (decode from CUDA graphs, the default) against transformers
(float32 logits) with prefix-cache hits on a second round; tiny Qwen3.5-MoE and Qwen3-Next engines
with cuda_graphs(True) against cuda_graphs(False): the same greedy tokens for 3 and 5 requests
(padded batches), one finishing mid-batch, and a second round resuming prefix-cache checkpoints.
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
    from hf_reference import hf_logits_torch_only as hf_logits  # fla-core is installed here

    path = tiny_checkpoint("qwen3.5-moe")
    engine = EngineBuilder(path).device("cuda").dtype("float32").cache(block_size=16).build()
    assert engine.describe()["kernels"]["gdn"] != "torch"
    assert engine.runner.graph_runner is not None  # hybrids decode from CUDA graphs by default
    prompts = make_prompts(6, lengths=(1, 17, 64, 100, 200, 300))
    for p in prompts[-2:]:
        assert rel(engine.prompt_logits(p).cpu(), hf_logits(path, p)) < 1e-3
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    first = [o.token_ids for o in engine.generate(prompts, greedy)]
    engine.stats.reset()
    assert [o.token_ids for o in engine.generate(prompts, greedy)] == first
    assert engine.stats.num_cached_tokens > 0


def test_torch_reference_decode_captures_in_a_cuda_graph():
    """The torch references of the decode ops (what DLENGINE_DISABLE_TRITON_OPS=1 runs) have no
    host sync either: captured with padded rows, replayed with other slots, they equal an eager
    call on the live rows and leave every other slot bit for bit as it was."""
    B, n_slots = 8, 16
    q, k, v, g, beta = gdn_inputs(B, seed=3)
    x = torch.randn(B, D_CONV, device="cuda").bfloat16()
    w = torch.randn(D_CONV, K, device="cuda").bfloat16()
    conv = torch.randn(n_slots, D_CONV, K - 1, device="cuda").bfloat16()
    ssm = torch.randn(n_slots, HV, DK, DV, device="cuda") * 0.1
    slots = torch.full((B,), -1, dtype=torch.int64, device="cuda")
    resume = torch.zeros(B, dtype=torch.bool, device="cuda")

    def step():
        y = causal_conv1d_torch.causal_conv1d_update(x, w, conv, slots, resume)
        o = gated_delta_rule_torch.recurrent_gated_delta_rule_update(q, k, v, g, beta, ssm, slots, resume)
        return y, o

    before = conv.clone(), ssm.clone()
    step()  # all rows padded: nothing may change
    assert torch.equal(conv, before[0]) and torch.equal(ssm, before[1])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_out, o_out = step()
    live_slots = [9, 0, 15, 4, 7]  # slot 0 (the padded rows' rewrite target) and the last slot among them
    slots.copy_(torch.tensor(live_slots + [-1] * (B - len(live_slots)), device="cuda"))
    resume.copy_(torch.tensor([True, False, True, True, True, False, True, False], device="cuda"))
    conv_ref, ssm_ref = conv.clone(), ssm.clone()
    graph.replay()
    n = len(live_slots)
    y_ref = causal_conv1d_torch.causal_conv1d_update(x[:n], w, conv_ref, slots[:n], resume[:n])
    o_ref = gated_delta_rule_torch.recurrent_gated_delta_rule_update(q[:n], k[:n], v[:n], g[:n], beta[:n], ssm_ref,
                                                                      slots[:n], resume[:n])
    assert rel(y_out[:n], y_ref) < 1e-2 and rel(o_out[:n], o_ref) < 1e-2  # bf16 outputs (other GEMM batch)
    assert not y_out[n:].any() and not o_out[n:].any()  # padded rows: zeros
    assert rel(conv[live_slots], conv_ref[live_slots]) < 1e-2 and rel(ssm[live_slots], ssm_ref[live_slots]) < 1e-5
    others = [s for s in range(n_slots) if s not in live_slots]
    assert torch.equal(conv[others], before[0][others]) and torch.equal(ssm[others], before[1][others])


@pytest.mark.parametrize("kind", ["qwen3.5-moe", "qwen3-next"])
@pytest.mark.parametrize("num_requests", [3, 5])
def test_engine_with_cuda_graphs_matches_eager(kind, num_requests):
    """Greedy tokens of a tiny hybrid engine decoding from CUDA graphs equal the eager engine's:
    mixed prompt lengths, 3 or 5 requests (replayed at 4 and 8 rows: padded), request 1 finishing
    after 4 tokens (the batch shrinks mid-way), then a second round of the same prompts whose
    prefix-cache hits restore state checkpoints (one-token steps: graph steps) first."""
    from dlengine import EngineBuilder, SamplingParams
    from dlengine.testing import tiny_checkpoint

    from conftest import make_prompts

    path = tiny_checkpoint(kind)
    prompts = make_prompts(num_requests, lengths=(17, 1, 64, 5, 100), seed=5)
    params = [SamplingParams(max_tokens=4 if i == 1 else 24, temperature=0.0, ignore_eos=True)
              for i in range(num_requests)]
    tokens = {}
    for graphs in (False, True):
        engine = (EngineBuilder(path).device("cuda").dtype("float32").attention("triton").cuda_graphs(graphs)
                  .cache(block_size=16).build())
        rounds = []
        for _ in range(2):
            engine.stats.reset()
            rounds.append([o.token_ids for o in engine.generate(prompts, params)])
        assert engine.stats.num_cached_tokens > 0  # the second round resumed checkpoints
        runner = engine.runner
        if graphs:
            g = runner.graph_runner
            assert g is not None and g.padded_size(num_requests) > num_requests
            assert runner.num_graph_steps > 0 and g.num_replays[1] == runner.num_graph_steps  # graphs really ran
        else:
            assert runner.graph_runner is None and runner.num_graph_steps == 0
        bm = engine.block_manager
        assert bm.state_slots.num_free == bm.state_slots.num_slots
        tokens[graphs] = rounds
        engine.close()
    assert tokens[True] == tokens[False]
    assert tokens[True][0] == tokens[True][1]
