"""dlengine vs transformers on tiny DeepSeek-V3 and Kimi-K2 checkpoints (DeepseekV3ForCausalLM: MLA
attention over a latent KV cache, interleaved decoupled RoPE with YaRN mscale, grouped sigmoid
routing with a score-correction bias, shared experts, a dense first layer): float32 logits close
at every prompt position, greedy tokens equal under chunked prefill and prefix-cache hits."""

import pytest
import torch

from dlengine import EngineBuilder
from dlengine.config import ConfigError
from dlengine.models.deepseek_v3 import DeepseekV3MoE
from dlengine.models.layers.moe import GroupedTopKRouter
from dlengine.models.qwen3 import Qwen3MLP
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts
from hf_reference import (
    SCHEDULING_SETUPS,
    check_greedy_setup,
    checkpoint_tensors,
    copy_checkpoint,
    hf_logits,
    relative_error,
)

KINDS = ["deepseek-v3", "kimi-k2"]
MAX_NEW = 24
PROMPTS = make_prompts()


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_logits_match_transformers(kind):
    path = tiny_checkpoint(kind)
    engine = EngineBuilder(path).dtype("float32").cache(block_size=16).build()
    kinds = [type(layer.mlp) for layer in engine.model.model.layers]
    assert kinds == [Qwen3MLP, DeepseekV3MoE, DeepseekV3MoE]  # first_k_dense_replace=1
    # the latent cache: one "head" of kv_lora_rank + qk_rope_head_dim per token, no V
    hf = engine.config.model.hf_config
    k_cache, v_cache = engine.kv_cache.layers[0]
    assert k_cache.shape[2:] == (1, hf["kv_lora_rank"] + hf["qk_rope_head_dim"])
    assert v_cache.numel() == 0
    for prompt in PROMPTS:
        ours = engine.prompt_logits(prompt)
        ref = hf_logits(path, prompt)
        assert ours.shape == ref.shape
        assert relative_error(ours, ref) < 1e-4  # every position, i.e. the whole prefill


SETUPS = ["default", "chunked-32", "prefix-cache-twice"]


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers(kind, setup):
    check_greedy_setup(kind, setup, SCHEDULING_SETUPS[setup], PROMPTS, MAX_NEW)


def test_mla_attention_backends():
    path = tiny_checkpoint("deepseek-v3")
    # FlashInfer's MLA kernel only takes DeepSeek-V3's latent dims (512 + 64); triton
    # (tests/test_triton_mla.py) and torch take any
    with pytest.raises(ConfigError, match="flashinfer.*kv_lora_rank 512"):
        EngineBuilder(path).dtype("float32").attention("flashinfer").build()
    engine = EngineBuilder(path).dtype("float32").attention("auto").build()
    assert engine.runner.backend.name == "torch"


def test_mtp_layers_in_a_checkpoint_are_skipped(tmp_path):
    """Released DeepSeek-V3 checkpoints carry the MTP module as layer num_hidden_layers; it is not
    loaded (and its presence is no error). Other unknown tensors still are errors."""
    path = tiny_checkpoint("deepseek-v3")
    tensors = checkpoint_tensors(path)
    mtp = dict(tensors)
    for name, t in tensors.items():
        if name.startswith("model.layers.2."):
            mtp[name.replace("model.layers.2.", "model.layers.3.")] = t.clone()
    mtp["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    out = copy_checkpoint(path, str(tmp_path / "mtp"), mtp)
    prompt = PROMPTS[5]
    ref = EngineBuilder(path).dtype("float32").build().prompt_logits(prompt)
    assert torch.equal(EngineBuilder(out).dtype("float32").build().prompt_logits(prompt), ref)

    bad = dict(tensors, **{"model.layers.1.self_attn.bogus.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match="bogus"):
        EngineBuilder(copy_checkpoint(path, str(tmp_path / "bad"), bad)).dtype("float32").build()


def test_missing_score_correction_bias_is_an_error(tmp_path):
    path = tiny_checkpoint("deepseek-v3")
    tensors = checkpoint_tensors(path)
    del tensors["model.layers.2.mlp.gate.e_score_correction_bias"]
    out = copy_checkpoint(path, str(tmp_path / "partial"), tensors)
    with pytest.raises(ConfigError, match=r"model\.layers\.2\.mlp\.experts\.router\.e_score_correction_bias"):
        EngineBuilder(out).dtype("float32").build()


def test_grouped_router_matches_its_definition():
    """Per token: choose by sigmoid + bias within the topk_group best groups (a group scores its
    two best biased scores), weight by the unbiased sigmoid, renormalise, scale."""
    g = torch.Generator().manual_seed(0)
    t, e, k, groups, keep, factor = 29, 12, 3, 4, 2, 2.5
    router = GroupedTopKRouter(e, k, groups, keep, renormalize=True, routed_scaling_factor=factor)
    router.e_score_correction_bias.copy_(0.3 * torch.randn(e, generator=g))
    logits = 2 * torch.randn(t, e, generator=g)
    weights, ids = router(logits)
    bias = router.e_score_correction_bias
    for tok in range(t):
        s = logits[tok].sigmoid()
        c = (s + bias).view(groups, e // groups)
        best_groups = c.topk(2, dim=-1)[0].sum(-1).topk(keep)[1]
        eligible = torch.full_like(c, float("-inf"))
        eligible[best_groups] = c[best_groups]
        expect_ids = eligible.flatten().topk(k)[1]
        assert sorted(ids[tok].tolist()) == sorted(expect_ids.tolist())
        w = s[ids[tok]]
        assert torch.allclose(weights[tok], w / w.sum() * factor)
