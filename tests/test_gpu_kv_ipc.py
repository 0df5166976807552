"""PD with the cuda_ipc transfer engine on one GPU (needs CUDA; skipped on CPU): a prefill engine in
a child process, a decode engine here, the KV copied GPU to GPU through CUDA IPC mappings of each
other's staging. Tokens equal one hybrid engine's (float32 on the GPU); a decode engine of the
other backend is refused at the handshake; the prefill side frees every pinned block."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("dlslime", reason="the control records travel over DLSlime tcp")

from dlengine import EngineBuilder, SamplingParams  # noqa: E402
from dlengine.disagg import PDRouter  # noqa: E402
from dlengine.disagg.worker import WorkerEngine  # noqa: E402

from conftest import make_prompts  # noqa: E402
from test_pd_disagg import assert_pool_full, wait_worker_pool_full  # noqa: E402

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = make_prompts(6, lengths=(1, 16, 17, 64, 100, 300))


@pytest.mark.parametrize("model", ["tiny-qwen3", "tiny-deepseek-v3"])
def test_cuda_ipc_pd_equals_hybrid(model):
    hybrid = EngineBuilder(model).device("cuda").dtype("float32").cache(block_size=16).scheduler(max_model_len=512)
    expected = [o.token_ids for o in hybrid.build().generate(PROMPTS, GREEDY)]
    worker = WorkerEngine({"model": model, "role": "prefill", "device": "cuda", "dtype": "float32",
                           "cache": {"block_size": 16}, "scheduler": {"max_model_len": 512},
                           "transfer": {"backend": "cuda_ipc", "pin_timeout_s": 3.0}})
    decode = None
    try:
        decode = (EngineBuilder(model).device("cuda").dtype("float32").cache(block_size=16)
                  .scheduler(max_model_len=512).role("decode").transfer("cuda_ipc").build())
        assert decode.connector.region.tensor.is_cuda  # staging on the GPU: no host copy
        router = PDRouter(worker, decode)
        outs = router.generate(PROMPTS, GREEDY)
        for i, (out, exp) in enumerate(zip(outs, expected)):
            assert out.error is None, out.error
            assert out.token_ids == exp, f"prompt {i}"
        assert_pool_full(decode)
        wait_worker_pool_full(worker)
        # a DLSlime-only decode engine cannot read GPU staging: refused at the handshake, clearly
        plain = (EngineBuilder(model).device("cuda").dtype("float32").cache(block_size=16)
                 .scheduler(max_model_len=512).role("decode").transfer("dlslime").build())
        [bad] = PDRouter(worker, plain).generate(PROMPTS[:1], GREEDY)
        assert bad.finish_reason == "error" and "cuda_ipc" in (bad.error or "")
        plain.close()
        wait_worker_pool_full(worker, timeout=20.0)  # the refused request's blocks: on the pin timeout
    finally:
        worker.close()
        if decode is not None:
            decode.close()
