"""GPU check of MLA in the whole engine (run through the device tool; skipped on CPU).

Greedy tokens of the tiny DeepSeek-V3 on the triton backend in float32 (IEEE dots), with and
without CUDA graphs (decode steps replay the absorbed MLA decode kernel), equal the CPU float32
torch reference, or first differ where the float32 logits have a near tie. bf16 is only run, not
compared token by token: the tiny MoE model is chaotic under bf16 rounding (a router near-tie
flips an expert and the continuation changes; see tests/test_fp8.py), so a bf16-vs-fp32 token
comparison would test the model, not the kernels; the kernels' bf16 accuracy is checked at real
dims by scripts/gpu_check_mla.py.
"""

import pytest

from dlengine import EngineBuilder, SamplingParams

from conftest import make_prompts
from test_gpu_engine import check_against_reference

pytestmark = pytest.mark.gpu
PROMPTS = make_prompts()
MAX_NEW = 32


@pytest.fixture(scope="module")
def cpu_reference():
    engine = EngineBuilder("tiny-deepseek-v3").device("cpu").dtype("float32").attention("torch").build()
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    return engine, [o.token_ids for o in outs]


@pytest.mark.parametrize("graphs", [True, False])
def test_mla_triton_fp32_greedy_matches_cpu_fp32(cpu_reference, graphs):
    ref_engine, ref_tokens = cpu_reference
    engine = (EngineBuilder("tiny-deepseek-v3").device("cuda").dtype("float32").attention("triton")
              .cuda_graphs(graphs).scheduler(max_num_batched_tokens=128).build())
    assert engine.runner.backend.name == "triton"
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    outs = engine.generate(PROMPTS, params)
    assert check_against_reference(ref_engine, PROMPTS, outs, ref_tokens) >= len(PROMPTS) - 1
    if graphs:
        assert engine.runner.num_graph_steps > 0
    # a second round hits the prefix cache (extends over cached blocks on the GPU path)
    engine.stats.reset()
    again = engine.generate(PROMPTS[-3:], params)
    assert engine.stats.num_cached_tokens > 0
    check_against_reference(ref_engine, PROMPTS[-3:], again, ref_tokens[-3:])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_mla_triton_bf16_runs_with_graphs_and_frees_everything():
    engine = (EngineBuilder("tiny-deepseek-v3").device("cuda").dtype("bfloat16").attention("triton")
              .scheduler(max_num_batched_tokens=128).build())
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True))
    assert all(len(o.token_ids) == MAX_NEW for o in outs)
    assert engine.runner.num_graph_steps > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_gluon_mla_decode_kernel_in_the_engine_matches_the_triton_kernel(monkeypatch):
    """DeepSeek's MLA dims (kv_lora_rank 512, rope 64) on the tiny model's other dims, all layers
    dense (no router near-ties), bf16, dummy weights, CUDA graphs: the Hopper Gluon decode kernel
    (kernels/gluon_mla.py, what "auto" picks there) gives the Triton kernel's greedy tokens."""
    import torch

    from dlengine.kernels import gluon_mla, triton_mla

    why = gluon_mla.supported(torch.device("cuda"), torch.bfloat16, 512, 64)
    if why:
        pytest.skip(f"gluon MLA kernel: {why}")

    def greedy(kernel: str) -> list[list[int]]:
        monkeypatch.setattr(triton_mla, "DECODE_KERNEL", kernel)
        engine = (EngineBuilder("tiny-deepseek-v3").device("cuda").dtype("bfloat16").attention("triton")
                  .load_format("dummy").seed(0)
                  .hf_overrides(kv_lora_rank=512, qk_rope_head_dim=64, first_k_dense_replace=99).build())
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        assert engine.runner.num_graph_steps > 0
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        return [o.token_ids for o in outs]

    ours, ref = greedy("auto"), greedy("triton")  # auto: gluon for decode steps, triton for extends
    same = sum(a == b for a, b in zip(ours, ref))
    print(f"gluon vs triton MLA decode: {same}/{len(PROMPTS)} prompts' greedy tokens identical")
    assert same >= len(PROMPTS) - 1
