"""dlengine vs transformers on a tiny Qwen3-MoE checkpoint (8 experts, top-2, one dense layer):
float32 logits close at every prompt position, greedy tokens equal under chunked prefill, prefix
cache hits and preemption; expert weights load from per-expert and fused checkpoint layouts."""

import json
import os

import pytest
import torch

from dlengine import EngineBuilder
from dlengine.config import ConfigError
from dlengine.kernels.moe.fused_moe_torch import fused_experts_dense, fused_experts_torch
from dlengine.models.layers.moe import SoftmaxTopKRouter
from dlengine.models.qwen3 import Qwen3MLP
from dlengine.models.qwen3_moe import Qwen3MoeSparseBlock
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts
from hf_reference import (
    SCHEDULING_SETUPS,
    check_greedy_setup,
    checkpoint_tensors,
    copy_checkpoint,
    hf_logits,
    reference_greedy,
    relative_error,
)

KIND = "qwen3-moe"
MAX_NEW = 24
PROMPTS = make_prompts()


def reference_outputs() -> tuple:
    return reference_greedy(KIND, tuple(map(tuple, PROMPTS)), MAX_NEW)


def test_prompt_logits_match_transformers():
    path = tiny_checkpoint(KIND)
    engine = EngineBuilder(path).dtype("float32").cache(block_size=16).build()
    kinds = [type(layer.mlp) for layer in engine.model.model.layers]
    assert kinds == [Qwen3MoeSparseBlock, Qwen3MLP, Qwen3MoeSparseBlock]  # mlp_only_layers=[1]
    for prompt in PROMPTS:
        ours = engine.prompt_logits(prompt)
        ref = hf_logits(path, prompt)
        assert ours.shape == ref.shape
        assert relative_error(ours, ref) < 1e-4  # every position, i.e. the whole prefill


@pytest.mark.parametrize("setup", list(SCHEDULING_SETUPS))
def test_greedy_tokens_match_transformers(setup):
    check_greedy_setup(KIND, setup, SCHEDULING_SETUPS[setup], PROMPTS, MAX_NEW)


def test_fused_expert_layout_loads_the_same_weights(tmp_path):
    """transformers 5 keeps experts as 3-D tensors (gate_up_proj [E, 2I, H], down_proj [E, H, I]);
    a checkpoint stored that way gives the same logits as the per-expert one."""
    path = tiny_checkpoint(KIND)
    with open(os.path.join(path, "config.json")) as f:
        num_experts = json.load(f)["num_local_experts"]
    fused: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, list]] = {}
    for name, t in checkpoint_tensors(path).items():
        if ".mlp.experts." not in name:
            fused[name] = t
            continue
        prefix, rest = name.split(".mlp.experts.")
        e, proj, _ = rest.split(".")
        experts.setdefault(prefix, {}).setdefault(proj, [None] * num_experts)[int(e)] = t
    assert experts, "the tiny checkpoint should store per-expert tensors"
    for prefix, projs in experts.items():
        gate, up = torch.stack(projs["gate_proj"]), torch.stack(projs["up_proj"])
        fused[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        fused[f"{prefix}.mlp.experts.down_proj"] = torch.stack(projs["down_proj"]).contiguous()
    out = copy_checkpoint(path, str(tmp_path / "fused"), fused)

    prompt = PROMPTS[7]
    ref = EngineBuilder(path).dtype("float32").build().prompt_logits(prompt)
    ours = EngineBuilder(out).dtype("float32").build().prompt_logits(prompt)
    assert torch.equal(ours, ref)


def test_missing_expert_tensor_is_an_error(tmp_path):
    path = tiny_checkpoint(KIND)
    tensors = checkpoint_tensors(path)
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    out = copy_checkpoint(path, str(tmp_path / "partial"), tensors)
    with pytest.raises(ConfigError, match=r"model\.layers\.2\.mlp\.experts\.w13_weight#up\.5"):
        EngineBuilder(out).dtype("float32").build()


def test_fused_experts_reference_matches_per_token_loop():
    """The sorted-by-expert reference and the capture-safe dense variant against the definition:
    for each token, sum over its k experts of weight * down(silu(gate(x)) * up(x))."""
    g = torch.Generator().manual_seed(0)
    t, h, i, e, k = 37, 16, 8, 6, 3
    x = torch.randn(t, h, generator=g)
    w13, w2 = torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g)
    weights, ids = SoftmaxTopKRouter(k, renormalize=True)(torch.randn(t, e, generator=g) * 2)
    assert torch.allclose(weights.sum(-1), torch.ones(t))
    expected = torch.zeros(t, h)
    for tok in range(t):
        for slot in range(k):
            ex = ids[tok, slot]
            gu = w13[ex] @ x[tok]
            expected[tok] += weights[tok, slot] * (w2[ex] @ (torch.nn.functional.silu(gu[:i]) * gu[i:]))
    assert torch.allclose(fused_experts_torch(x, w13, w2, weights, ids), expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(fused_experts_dense(x, w13, w2, weights, ids), expected, atol=1e-4, rtol=1e-4)
