"""Config-only presets of released models, hf_overrides / --num-layers, and the MoE- and
MLA-aware roofline (ModelCost) checked against the published parameter counts."""

import json

import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.bench.roofline import ModelCost
from dlengine.builder import config_presets, resolve_model_path
from dlengine.cli import main
from dlengine.config import ConfigError, ModelConfig
from dlengine.models.registry import get_model_class
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts

# (preset, total parameters, parameters a token passes through), as published by the model
# authors: DeepSeek-V3 "671B total, 37B activated" (the MTP module's 14B is not in the main
# model), Kimi-K2 "1T total, 32B activated", Qwen3-30B-A3B "30.5B total, 3.3B activated".
PUBLISHED = [("deepseek-v3", 671e9, 37e9), ("kimi-k2", 1.03e12, 32.5e9), ("qwen3-30b-a3b", 30.5e9, 3.3e9)]


def meta_model(preset: str, **overrides):
    cfg = ModelConfig.from_pretrained(resolve_model_path(preset), overrides)
    with torch.device("meta"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            return get_model_class(cfg)(cfg, max_position=4096), cfg
        finally:
            torch.set_default_dtype(prev)


def test_presets_are_listed():
    assert {"qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b", "deepseek-v3", "kimi-k2"} <= set(config_presets())


@pytest.mark.parametrize("preset,total,active", PUBLISHED)
def test_preset_parameter_counts_match_published(preset, total, active):
    model, cfg = meta_model(preset)
    cost = ModelCost.from_model(model, cfg, torch.bfloat16)
    assert cost.num_params == pytest.approx(total, rel=0.03)
    # active = body passed through + embedding row + LM head: the published "activated" counts
    # include the embedding and LM head tables
    embed = cost.lm_head_params
    assert cost.active_body_params + 2 * embed == pytest.approx(active, rel=0.05)
    assert cost.moe_layers == cfg.num_hidden_layers - cfg.hf_config.get("first_k_dense_replace", 0)


def test_mla_cost_uses_latent_cache_and_absorbed_dims():
    model, cfg = meta_model("deepseek-v3", num_hidden_layers=4)
    cost = ModelCost.from_model(model, cfg, torch.bfloat16)
    assert cost.kv_bytes_per_token == 4 * (512 + 64) * 2  # latent + rope dims, one "head", bf16
    assert cost.attn_flops_per_pair == 2 * 4 * 128 * (192 + 128)
    assert cost.moe_layers == 1 and cost.num_experts == 256 and cost.top_k == 8


def test_moe_weight_bytes_grow_with_tokens_up_to_all_experts():
    model, cfg = meta_model("qwen3-30b-a3b", num_hidden_layers=2)
    c = ModelCost.from_model(model, cfg, torch.bfloat16)
    per_layer_experts = c.num_experts * c.expert_bytes
    dense_part = c.decode_weight_bytes - c.moe_layers * per_layer_experts
    one = c.weight_bytes_for_tokens(1)
    assert one == pytest.approx(dense_part + c.moe_layers * c.top_k * c.expert_bytes)
    sizes = [c.weight_bytes_for_tokens(n) for n in (1, 2, 8, 64, 4096)]
    assert sizes == sorted(sizes)
    assert sizes[-1] == pytest.approx(c.decode_weight_bytes, rel=1e-6)
    # a step of n tokens reads one expert set per token at most
    assert c.weight_bytes_for_tokens(2) <= dense_part + 2 * c.moe_layers * c.top_k * c.expert_bytes + 1


def test_dense_cost_unchanged_by_moe_terms():
    model, cfg = meta_model("qwen3-8b", num_hidden_layers=2)
    c = ModelCost.from_model(model, cfg, torch.bfloat16)
    assert c.moe_layers == 0 and c.active_body_params == c.body_params
    assert c.weight_bytes_for_tokens(7) == c.decode_weight_bytes


def test_hf_overrides_truncate_a_real_checkpoint_like_transformers():
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("qwen3")
    engine = EngineBuilder(path).dtype("float32").hf_overrides(num_hidden_layers=1).build()
    assert engine.config.model.num_hidden_layers == 1 and len(engine.model.model.layers) == 1
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, num_hidden_layers=1,
                                               attn_implementation="eager").eval()
    prompt = make_prompts()[3]
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0]
    got = engine.prompt_logits(prompt)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    out = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert len(out.token_ids) == 4


def test_hf_overrides_errors_name_the_field():
    with pytest.raises(ConfigError, match="no field 'num_layerz'"):
        EngineBuilder("tiny-qwen3").hf_overrides(num_layerz=2).build()
    with pytest.raises(ConfigError, match="num_hidden_layers='2'"):
        EngineBuilder("tiny-qwen3").hf_overrides(num_hidden_layers="2").build()


@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "deepseek-v3"])
def test_bench_dummy_moe_preset_with_few_layers(preset, tmp_path, capsys, monkeypatch):
    """Real-size configs run with dummy weights and a layer override; shrunk through hf_overrides
    of the expert count too (a CPU cannot hold even one real DeepSeek-V3 MoE layer in float32)."""
    from dlengine.bench import common

    shrink = {"qwen3-30b-a3b": dict(hidden_size=256, num_experts=8, vocab_size=1024),
              "deepseek-v3": dict(hidden_size=256, n_routed_experts=16, n_group=4, topk_group=2,
                                  first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                                  vocab_size=1024, intermediate_size=512, moe_intermediate_size=64)}[preset]
    real_build = common.EngineBuilder

    class Shrunk(real_build):
        def build(self):
            self.hf_overrides(**shrink)
            return super().build()

    monkeypatch.setattr(common, "EngineBuilder", Shrunk)
    path = tmp_path / "out.json"
    rc = main(["bench", "--model", preset, "--load-format", "dummy", "--num-layers", "2", "--num-prompts", "2",
               "--input-len", "8", "--output-len", "3", "--max-model-len", "64", "--no-progress",
               "--json", str(path)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(path.read_text())
    assert res["total_output_tokens"] == 6
    assert res["model_cost"]["num_layers"] == 2 and res["model_cost"]["moe_layers"] >= 1
