"""The tiny DeepSeek-V4 checkpoint with its prompt steps on the Triton prefill attention
(kernels/v4/prefill_triton.py, under TRITON_INTERPRET=1 without CUDA) and every other op on the
torch references: prompt logits equal the torch-ops engine's (whole prompts and chunks that split
windows and compression periods), and greedy tokens equal transformers' with chunked prefill
mixing several requests' prompt chunks and decodes in a step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from dlengine import EngineBuilder  # noqa: E402
from dlengine.kernels import selection  # noqa: E402
from dlengine.kernels.v4 import prefill_triton  # noqa: E402
from dlengine.kernels.v4.decode_triton import interpret_mode  # noqa: E402
from dlengine.testing import tiny_checkpoint  # noqa: E402

from conftest import make_prompts  # noqa: E402
from hf_reference import SCHEDULING_SETUPS, check_greedy_setup, relative_error  # noqa: E402

KIND = "deepseek-v4"

if not torch.cuda.is_available() and not interpret_mode():
    pytest.skip("the Triton prefill kernel needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture
def triton_prefill(monkeypatch):
    """Engines built now take the torch ops with only `v4_prefill_attention` on Triton."""
    ops = dataclasses.replace(selection.TORCH_OPS, v4_prefill_attention=prefill_triton.prefill_attention)
    monkeypatch.setattr(selection, "select_ops", lambda device, use_triton=True: ops)


def build(block_size: int = 16, **scheduler):
    b = EngineBuilder(tiny_checkpoint(KIND)).dtype("float32").cache(block_size=block_size)
    return (b.scheduler(**scheduler) if scheduler else b).build()


@pytest.fixture(scope="module")
def torch_engine():
    return build()


@pytest.mark.parametrize("chunk", [None, 7])
def test_prompt_logits_equal_torch_ops(triton_prefill, torch_engine, chunk):
    """chunk None: the whole prompt in one step (shorter and longer than the 16-token window);
    7 splits CSA (4) and HCA (16) windows across steps, so chunks start mid-sequence reading the
    ring. (Chunks longer than the window: the 32-token steps below.)"""
    engine = build()
    attn = engine.core.model.layers[0].attn
    assert attn.ops.v4_prefill_attention is prefill_triton.prefill_attention
    for prompt in make_prompts(2, lengths=(11, 70), seed=3):
        ours = engine.prompt_logits(prompt, chunk_size=chunk)
        ref = torch_engine.prompt_logits(prompt, chunk_size=chunk)
        assert relative_error(ours, ref) < 1e-5


def test_greedy_tokens_equal_transformers(triton_prefill):
    """Chunked prefill (32-token steps): several requests' chunks and decodes share steps."""
    prompts = make_prompts(4, lengths=(3, 40, 75, 17), seed=4)
    check_greedy_setup(KIND, "chunked-32", SCHEDULING_SETUPS["chunked-32"], prompts, 6)
