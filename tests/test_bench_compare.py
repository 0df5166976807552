"""`dlengine bench throughput --compare transformers`: the same prompts through transformers'
continuous batching (`generate_batch`), actually run on CPU with the tiny model."""

import json

import pytest

from dlengine import EngineBuilder
from dlengine.bench import BenchError, compare_transformers, run_throughput
from dlengine.cli import main

pytest.importorskip("transformers")
GIVEN = {"peak_bandwidth_gbps": 50.0, "peak_tflops": 0.5}


@pytest.fixture(scope="module")
def engine():
    return EngineBuilder("tiny-qwen3").cache(num_blocks=64).scheduler(max_num_seqs=8, max_model_len=128).build()


def test_compare_transformers_runs_generate_batch_on_the_same_prompts(engine):
    res = run_throughput(num_prompts=4, input_len=16, output_len=4, range_ratio=0.5, num_warmup=0, progress=False,
                         engine=engine, compare="transformers", compare_num_prompts=3, **GIVEN)
    c = res["compare"]
    assert c["error"] is None, c.get("traceback")
    assert c["framework"] == "transformers" and c["transformers_version"]
    assert c["attn_implementation"] == "eager" and c["device"] == "cpu" and c["dtype"] == "float32"
    # the first 3 requests, each for their mean output length (rounded)
    outs = [r["output_len"] for r in res["requests"][:3]]
    assert c["num_requests"] == 3 and c["max_new_tokens"] == max(1, round(sum(outs) / 3))
    assert c["total_input_tokens"] == sum(r["prompt_len"] for r in res["requests"][:3])
    assert c["total_output_tokens"] == c["expected_output_tokens"] == 3 * c["max_new_tokens"]  # eos disabled
    assert c["elapsed_s"] > 0 and c["wall_s"] >= c["elapsed_s"]
    assert c["output_tokens_per_s"] == pytest.approx(c["total_output_tokens"] / c["elapsed_s"])
    assert c["ratio"] == pytest.approx(res["output_tokens_per_s"] / c["output_tokens_per_s"])
    assert c["ratio_wall"] > 0
    assert not engine.has_unfinished_requests()


def test_compare_via_cli_and_failures_are_reported_not_raised(tmp_path, capsys):
    path = tmp_path / "cmp.json"
    rc = main(["bench", "throughput", "--num-prompts", "2", "--input-len", "8", "--output-len", "3",
               "--max-model-len", "128", "--no-progress", "--peak-bandwidth-gbps", "50", "--peak-tflops", "0.5",
               "--compare", "transformers", "--compare-attn-implementation", "no-such-attention",
               "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(path.read_text())
    assert res["total_output_tokens"] == 6 and res["output_tokens_per_s"] > 0  # our numbers survive
    c = res["compare"]
    assert c["error"] and "no-such-attention" in c["error"] and c["ratio"] is None
    assert "compare: transformers" in out and "error:" in out


def test_compare_transformers_directly_with_dummy_weights_falls_back_to_the_next_attention(monkeypatch):
    from dlengine.bench import compare as compare_mod
    from dlengine.builder import resolve_model_path

    # as on CUDA ("paged|sdpa", then "sdpa"): a first implementation that fails, then one that works
    monkeypatch.setattr(compare_mod, "default_attn_implementations", lambda device: ["no-such-attention", "eager"])
    path = resolve_model_path("tiny-qwen3")
    res = compare_transformers(path, [[5, 6, 7, 8], [9, 10, 11]], 3, dtype="float32", device="cpu",
                               load_format="dummy")
    assert res["error"] is None, res.get("traceback")
    assert res["attn_implementation"] == "eager" and res["load_format"] == "dummy"
    assert len(res["failed_attempts"]) == 1 and res["failed_attempts"][0].startswith("no-such-attention:")
    assert res["total_output_tokens"] == 6 and res["output_tokens_per_s"] > 0 and res["timing"] == "lifespan"


def test_unknown_compare_framework_is_a_config_error(engine):
    with pytest.raises(BenchError, match="compare framework"):
        run_throughput(num_prompts=1, input_len=4, output_len=2, progress=False, engine=engine, compare="vllm")
