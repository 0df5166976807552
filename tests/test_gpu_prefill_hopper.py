"""GPU: the Hopper prefill / extend kernel (kernels/attention/prefill_hopper_triton.py) against the
torch reference at real sizes -- the Hopper half of scripts/gpu_check_attention.py's correctness
section (Qwen3's GQA shapes 32/8, 16/8, 64/8, 40/8, fresh prompts up to 2k, chunks over cached
prefixes of odd lengths, mixed batches with decode rows, d = 64 / 256, pages 1 / 16 / 32,
fp16 / fp32, the warp-specialised fresh-prompt kernel, the plain-load path), and the engine with
`prefill_attention("hopper")` against the default engine. Skipped without an sm_90 GPU."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

pytestmark = pytest.mark.gpu


def _require_hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Hopper prefill kernel needs sm_90")


def test_hopper_prefill_kernel_matches_the_reference_at_real_sizes():
    _require_hopper()
    import gpu_check_attention

    assert gpu_check_attention.hopper_correctness(quick=False)


def test_engine_with_the_hopper_prefill_kernel_matches_the_default_engine():
    """The tiny Qwen3 checkpoint in float32 on the GPU (IEEE dots in both kernels), chunked prefill
    and a prefix-cache hit: the same greedy tokens as the engine on the portable kernel."""
    _require_hopper()
    from dlengine import EngineBuilder, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (300, 170, 33)]
    prompts.append(prompts[0][:200] + [5, 6, 7])  # a prefix-cache hit, then a chunk over it
    params = SamplingParams(max_tokens=8, temperature=0.0)

    def tokens(kernel):
        engine = (EngineBuilder("tiny-qwen3").device("cuda").dtype("float32").attention("triton")
                  .prefill_attention(kernel).cache(block_size=16, prefix_caching=True)
                  .scheduler(max_num_batched_tokens=128).build())
        assert engine.config.prefill_attention == kernel
        first = [o.token_ids for o in engine.generate(prompts[:3], params)]
        return first + [o.token_ids for o in engine.generate(prompts[3:], params)]

    assert tokens("hopper") == tokens("triton")
