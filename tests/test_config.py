"""ModelConfig.from_pretrained on broken or unsupported checkpoints: a ConfigError naming the file,
the architecture and the problem, never a raw JSONDecodeError or KeyError."""

import json
import shutil

import pytest

from dlengine import ConfigError, EngineBuilder
from dlengine.config import ModelConfig
from dlengine.models.architectures import SUPPORTED_ARCHITECTURES
from dlengine.models.registry import MODEL_REGISTRY
from dlengine.testing import tiny_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    """A writable copy of the tiny Qwen3 checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("qwen3"), dst)
    return dst


def write_config(folder, cfg):
    (folder / "config.json").write_text(json.dumps(cfg))


def test_names_match_the_registry():
    assert sorted(SUPPORTED_ARCHITECTURES) == sorted(MODEL_REGISTRY)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_file_that_is_not_json_names_the_file(checkpoint, name):
    (checkpoint / name).write_text('{"architectures": ["Qwen3ForCausalLM"], oops')
    with pytest.raises(ConfigError, match=rf"{name} is not valid JSON: .*line 1 column"):
        ModelConfig.from_pretrained(checkpoint)
    with pytest.raises(ConfigError, match=name):
        EngineBuilder(str(checkpoint)).build()


def test_json_that_is_not_an_object(checkpoint):
    (checkpoint / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json must hold a JSON object"):
        ModelConfig.from_pretrained(checkpoint)


# multimodal families dlengine does not build (Qwen3-VL, once listed here, is supported now)
@pytest.mark.parametrize("arch", ["Qwen2_5_VLForConditionalGeneration", "Glm4vForConditionalGeneration"])
def test_nested_multimodal_config_is_reported_unsupported_before_parsing(checkpoint, arch):
    flat = json.loads((checkpoint / "config.json").read_text())
    text = {k: flat.pop(k) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")}
    write_config(checkpoint, {**flat, "architectures": [arch], "text_config": text, "vision_config": {}})
    with pytest.raises(ConfigError, match=rf"architecture '{arch}' \(its text-model fields sit under "
                                          r"'text_config'\) is not supported yet"):
        ModelConfig.from_pretrained(checkpoint)
    with pytest.raises(ConfigError, match="not supported yet"):
        EngineBuilder(str(checkpoint)).build()


def test_unknown_architecture_wins_over_missing_fields(checkpoint):
    write_config(checkpoint, {"architectures": ["FooForCausalLM"]})  # no other field at all
    with pytest.raises(ConfigError, match="'FooForCausalLM' is not supported yet; supported: .*Qwen3ForCausalLM"):
        ModelConfig.from_pretrained(checkpoint)


@pytest.mark.parametrize("field", ["num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers"])
def test_missing_field_names_field_and_architecture(checkpoint, field):
    cfg = json.loads((checkpoint / "config.json").read_text())
    del cfg[field]
    write_config(checkpoint, cfg)
    with pytest.raises(ConfigError, match=rf"'Qwen3ForCausalLM' config lacks the field '{field}'; "
                                          "such a variant is not supported yet"):
        ModelConfig.from_pretrained(checkpoint)


def test_field_of_the_wrong_kind(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg.pop("head_dim", None)
    cfg["num_attention_heads"] = "eight"
    write_config(checkpoint, cfg)
    with pytest.raises(ConfigError, match="config.json: a field has a value of the wrong kind"):
        ModelConfig.from_pretrained(checkpoint)


def test_missing_architectures(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    del cfg["architectures"]
    write_config(checkpoint, cfg)
    with pytest.raises(ConfigError, match="'architectures' is missing"):
        ModelConfig.from_pretrained(checkpoint)
