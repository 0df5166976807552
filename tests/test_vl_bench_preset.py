"""The Qwen3-VL-8B config preset runs `dlengine bench` with dummy weights (text prompts), shrunk
through hf_overrides (the text model and the vision tower) so that a CPU holds it."""

import json

from dlengine.builder import resolve_model_path
from dlengine.cli import main


def test_bench_dummy_qwen3_vl_preset(tmp_path, capsys, monkeypatch):
    from dlengine.bench import common

    with open(resolve_model_path("qwen3-vl-8b") + "/config.json") as f:
        vision = json.load(f)["vision_config"]
    vision.update(depth=2, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=256,
                  deepstack_visual_indexes=[0])
    shrink = dict(hidden_size=256, intermediate_size=512, vocab_size=1024, num_attention_heads=4,
                  num_key_value_heads=2, vision_config=vision)
    real_build = common.EngineBuilder

    class Shrunk(real_build):
        def build(self):
            self.hf_overrides(**shrink)
            return super().build()

    monkeypatch.setattr(common, "EngineBuilder", Shrunk)
    path = tmp_path / "out.json"
    rc = main(["bench", "--model", "qwen3-vl-8b", "--load-format", "dummy", "--num-layers", "2", "--num-prompts", "2",
               "--input-len", "8", "--output-len", "3", "--max-model-len", "64", "--no-progress",
               "--json", str(path)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(path.read_text())["total_output_tokens"] == 6
