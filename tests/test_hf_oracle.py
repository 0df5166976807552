"""The torch-only oracle (tests/hf_oracle_torch_only.py) gives transformers' own logits: GPU
runs, where fla-core is installed, compare the Gated DeltaNet models against it."""

import torch

from dlengine.testing import tiny_checkpoint
from hf_reference import hf_logits, hf_logits_torch_only


def test_torch_only_oracle_equals_the_in_process_one():
    path = tiny_checkpoint("qwen3.5-moe")
    prompt = [3, 17, 42, 99, 5, 8, 13, 21, 34]
    out = hf_logits_torch_only(path, prompt)
    assert out.shape == (len(prompt), hf_logits(path, prompt).shape[-1])
    torch.testing.assert_close(out, hf_logits(path, prompt), rtol=1e-5, atol=1e-5)
