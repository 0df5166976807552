"""A tensor-parallel decode engine on GPUs (needs 2 CUDA devices; skipped otherwise): a tp=1
prefill engine on GPU 0 hands off over DLSlime tcp (pinned host staging) to a tp=2 decode engine
on GPUs 0 and 1, whose ranks agree on ready requests over NCCL. Tokens equal a hybrid engine's
(float32); every decode rank's pool is full afterwards and the prefill side frees every pin.
The CPU version, failures included: tests/test_pd_tp_decode.py."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices", allow_module_level=True)
pytest.importorskip("dlslime", reason="the KV travels over DLSlime tcp")

from dlengine import EngineBuilder, SamplingParams  # noqa: E402
from dlengine.disagg import PDRouter  # noqa: E402

from conftest import make_prompts  # noqa: E402
from test_pd_tp_decode import assert_decode_pools_full, wait_prefill_released  # noqa: E402

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = make_prompts(6, lengths=(1, 16, 17, 64, 100, 300))


def gpu_builder(model):
    return EngineBuilder(model).device("cuda").dtype("float32").cache(block_size=16).scheduler(max_model_len=512)


@pytest.mark.parametrize("model", ["tiny-qwen3", "tiny-deepseek-v3"])
def test_tp2_decode_on_gpus_equals_hybrid(model):
    expected = [o.token_ids for o in gpu_builder(model).build().generate(PROMPTS, GREEDY)]
    prefill = gpu_builder(model).role("prefill").transfer("dlslime", transport="tcp").build()
    decode = gpu_builder(model).parallel(tp=2).role("decode").transfer("dlslime", transport="tcp").build()
    try:
        outs = PDRouter(prefill, decode).generate(PROMPTS, GREEDY)
        for i, (out, exp) in enumerate(zip(outs, expected)):
            assert out.error is None, out.error
            assert out.token_ids == exp, f"prompt {i}"
        assert_decode_pools_full(decode)
        wait_prefill_released(prefill)
    finally:
        prefill.close()
        decode.close()
