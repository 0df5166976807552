"""Engine behaviour a user relies on: bad input, prefix-cache metrics, stop conditions, abort,
streaming, output order."""

import json
import os
import shutil

import pytest
import torch

from dlengine import ConfigError, EngineBuilder, InvalidRequestError, SamplingParams
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(request):
    return (EngineBuilder("tiny-qwen3").dtype("float32").cache(block_size=16).scheduler(max_model_len=512)
            .async_scheduling(request.param).build())


def assert_pool_full(engine):
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], GREEDY, "empty prompt"),
        ("", GREEDY, "empty prompt"),
        ([7] * 600, GREEDY, "max_model_len"),
        ([5, 6], dict(max_tokens=0), "max_tokens"),
        ([5, 6], dict(max_tokens=-3), "max_tokens"),
        ([5, 6, 100000], GREEDY, "token ids"),
        ([5, 6], dict(top_p=0.0), "top_p"),
        (3.5, GREEDY, "string or a list"),
    ],
)
def test_bad_requests_raise_and_others_keep_running(engine, prompt, params, match):
    good = [engine.add_request([7, 8, 9], GREEDY), engine.add_request("hello world", GREEDY)]
    with pytest.raises(InvalidRequestError, match=match):
        # bad sampling parameters (given as keywords) are refused when built, since they are range-checked then
        engine.add_request(prompt, SamplingParams(**params) if isinstance(params, dict) else params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == sorted(good)
    assert all(len(o.token_ids) == 8 for o in finished.values())
    assert_pool_full(engine)


def test_generate_reports_bad_prompt_by_index(engine):
    with pytest.raises(InvalidRequestError, match="prompt 1: empty prompt"):
        engine.generate([[5, 6], [], [7]], GREEDY)
    assert_pool_full(engine)  # nothing was admitted
    outs = engine.generate([[5, 6], [], [7]], GREEDY, raise_on_error=False)
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert "empty prompt" in outs[1].error
    assert outs[0].token_ids == engine.generate([[5, 6]], GREEDY)[0].token_ids


def test_unknown_model_path():
    with pytest.raises(ConfigError, match="/no/such/model"):
        EngineBuilder("/no/such/model").build()


def test_bad_checkpoints(tmp_path):
    src = tiny_checkpoint("qwen3")
    missing = tmp_path / "no-config"
    shutil.copytree(src, missing)
    os.remove(missing / "config.json")
    with pytest.raises(ConfigError, match="config.json"):
        EngineBuilder(str(missing)).build()
    foreign = tmp_path / "foreign"
    shutil.copytree(src, foreign)
    cfg = json.loads((foreign / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (foreign / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="FooForCausalLM"):
        EngineBuilder(str(foreign)).build()
    no_weights = tmp_path / "no-weights"
    shutil.copytree(src, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ConfigError, match="safetensors"):
        EngineBuilder(str(no_weights)).build()
    # ... but dummy weights need only the config
    engine = EngineBuilder(str(no_weights)).load_format("dummy").build()
    assert len(engine.generate([[3, 4]], GREEDY)[0].token_ids) == 8


@pytest.mark.parametrize(
    "configure, match",
    [
        (lambda b: b.cache(block_size=12), "power of two"),
        (lambda b: b.cache(block_size=16, num_blocks=10), "too small for one max-length request"),
        (lambda b: b.scheduler(max_num_seqs=0), "max_num_seqs"),
        (lambda b: b.cache(bogus=1), "bogus"),
        (lambda b: b.role("sideways"), "unknown role"),
        (lambda b: b.max_model_len(100000), "max_position_embeddings"),
        (lambda b: b.dtype("int3"), "dtype"),
        (lambda b: b.attention("nope"), "attention backend"),
    ],
)
def test_impossible_settings_fail_at_build(configure, match):
    with pytest.raises(ConfigError, match=match):
        configure(EngineBuilder("tiny-qwen3")).build()


# ------------------------------------------------------------------ prefix caching
def test_shared_prefix_computes_only_new_tokens():
    engine = EngineBuilder("tiny-qwen3").dtype("float32").cache(block_size=16).build()
    [prefix] = make_prompts(1, lengths=(200,), seed=5)
    a, b = prefix + [11, 12, 13], prefix + [21, 22, 23, 24, 25]
    first = engine.generate([a], GREEDY)[0]
    before = engine.stats.num_prompt_tokens_computed
    second = engine.generate([b], GREEDY)[0]
    cached = (200 // 16) * 16
    assert second.metrics.num_cached_tokens == cached
    assert engine.stats.num_prompt_tokens_computed - before == len(b) - cached
    assert second.metrics.num_computed_prompt_tokens == len(b) - cached
    # same tokens as an engine that computes everything
    cold = EngineBuilder("tiny-qwen3").dtype("float32").cache(block_size=16, prefix_caching=False).build()
    assert cold.generate([a, b], GREEDY)[0].token_ids == first.token_ids
    assert cold.generate([b], GREEDY)[0].token_ids == second.token_ids
    assert cold.stats.num_cached_tokens == 0


def test_fully_cached_prompt_still_computes_its_last_token():
    engine = EngineBuilder("tiny-qwen3").dtype("float32").cache(block_size=16).build()
    prompt = make_prompts(1, lengths=(64,), seed=9)[0]
    first = engine.generate([prompt], GREEDY)[0]
    again = engine.generate([prompt], GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.metrics.num_cached_tokens == 48  # the last block is recomputed to get logits


# ------------------------------------------------------------------ stop conditions
def test_stop_conditions(engine):
    base = engine.generate([[5, 9, 33]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    toks = base.token_ids
    assert base.finish_reason == "length" and len(toks) == 12
    target = toks[5]
    first = toks.index(target)
    out = engine.generate([[5, 9, 33]], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[target]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == target and out.token_ids == toks[: first + 1]
    # eos: pretend the model's eos is that token through min_tokens/ignore_eos interplay
    out = engine.generate([[5, 9, 33]], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[target],
                                                        min_tokens=first + 2))[0]
    assert len(out.token_ids) > first + 1


def test_stop_strings(engine):
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    base = engine.generate(["hello world"], params)[0]
    text = base.text
    assert len(text) > 6
    stop = text[3:6]
    out = engine.generate(["hello world"], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert len(out.token_ids) < 30
    keep = engine.generate(["hello world"], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop],
                                                           include_stop_str_in_output=True))[0]
    assert keep.text == text[: text.index(stop) + len(stop)]


def test_eos_stops_unless_ignored(tmp_path):
    # make the model's eos the token it greedily emits third
    engine = EngineBuilder("tiny-qwen3").dtype("float32").build()
    toks = engine.generate([[5, 9, 33]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0].token_ids
    src = tiny_checkpoint("qwen3")
    ckpt = tmp_path / "eos"
    shutil.copytree(src, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [toks[2]]}))
    eng2 = EngineBuilder(str(ckpt)).dtype("float32").build()
    out = eng2.generate([[5, 9, 33]], SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert out.finish_reason == "stop" and out.token_ids == toks[: toks.index(toks[2]) + 1]
    out = eng2.generate([[5, 9, 33]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == toks


# ------------------------------------------------------------------ abort, streaming, order
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_abort_at_any_point_frees_everything(async_scheduling):
    engine = (EngineBuilder("tiny-qwen3").dtype("float32").cache(block_size=16)
              .scheduler(max_num_batched_tokens=32, max_num_seqs=2).async_scheduling(async_scheduling).build())
    prompts = make_prompts(4, lengths=(100, 5, 70, 9), seed=3)
    ids = [engine.add_request(p, SamplingParams(max_tokens=20, temperature=0.0)) for p in prompts]
    outs = {}

    def step():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o

    step()  # request 0 is mid-prefill, 2 and 3 are waiting
    assert engine.abort(ids[0]) and engine.abort(ids[3])
    for _ in range(6):
        step()
    assert engine.abort(ids[1])  # mid-decode
    while engine.has_unfinished_requests():
        step()
    assert outs[ids[0]].finish_reason == "abort" and outs[ids[3]].finish_reason == "abort"
    assert outs[ids[1]].finish_reason == "abort" and 0 < len(outs[ids[1]].token_ids) < 20
    assert outs[ids[2]].finish_reason == "length"
    assert not engine.abort(ids[2]) and not engine.abort("nope")
    assert_pool_full(engine)
    ref = EngineBuilder("tiny-qwen3").dtype("float32").build()
    assert outs[ids[2]].token_ids == ref.generate([prompts[2]], SamplingParams(max_tokens=20, temperature=0.0))[0].token_ids


def test_stream_yields_increments(engine):
    prompts = [[5, 9, 33], "hello world"]
    final = engine.generate(prompts, GREEDY)
    pieces = {0: [], 1: []}
    finished = []
    ids = {}
    for out in engine.stream(prompts, GREEDY):
        key = ids.setdefault(out.request_id, len(ids))
        pieces[key].extend(out.new_token_ids)
        if out.finished:
            finished.append(key)
    assert sorted(finished) == [0, 1]
    assert [pieces[0], pieces[1]] == [f.token_ids for f in final]
    assert_pool_full(engine)


def test_stream_closed_early_aborts(engine):
    it = engine.stream([[5, 9, 33]], SamplingParams(max_tokens=50, temperature=0.0))
    next(it)
    it.close()
    engine.step()
    assert_pool_full(engine)


def test_outputs_in_input_order_and_metrics(engine):
    prompts = make_prompts(6, lengths=(300, 1, 50, 2, 120, 7), seed=11)
    outs = engine.generate(prompts, GREEDY)
    assert [o.prompt_token_ids for o in outs] == prompts
    for o in outs:
        m = o.metrics
        assert m.ttft is not None and m.ttft >= 0 and m.e2e_latency >= m.ttft
        assert m.num_prompt_tokens == len(o.prompt_token_ids)
    assert "torch" in repr(engine)


def test_memory_profile_step_runs_on_cpu():
    """The profiling forward (largest step + max_num_seqs sampling rows) runs; on CPU it measures 0."""
    from dlengine.engine.memory import profile_step_peak
    from dlengine.kernels.selection import resolve_attention_backend

    engine = EngineBuilder("tiny-qwen3").scheduler(max_num_batched_tokens=300, max_num_seqs=4, max_model_len=128).build()
    cfg = engine.config
    assert profile_step_peak(cfg, engine.model, resolve_attention_backend("torch", cfg.device), torch.float32) == 0
    assert "KV cache" in engine.memory_plan.describe(cfg.cache.block_size)


def test_config_presets_build_with_dummy_weights():
    from dlengine.builder import config_presets

    assert {"qwen3-0.6b", "qwen3-8b"} <= set(config_presets())
    with pytest.raises(ConfigError, match="dummy"):
        EngineBuilder("qwen3-0.6b").build()
    engine = (EngineBuilder("qwen3-0.6b").load_format("dummy").dtype("float32").max_model_len(64)
              .scheduler(max_num_seqs=2, max_num_batched_tokens=64).cache(num_blocks=8).build())
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 2 and out.text == ""  # no tokenizer: ids only
    assert engine.tokenizer is None


def test_describe_close_and_arrival_time():
    engine = EngineBuilder("tiny-qwen3").build()
    info = engine.describe()
    assert info["attention_backend"] == "torch" and info["num_kv_blocks"] == engine.block_manager.num_blocks
    import time

    t0 = time.perf_counter() - 5.0
    rid = engine.add_request([3, 4, 5], GREEDY, arrival_time=t0)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o
    assert outs[rid].metrics.ttft >= 5.0
    engine.add_request([3, 4, 5], GREEDY)
    engine.close()
    assert engine.kv_cache.storage is None and not engine.scheduler.running and not engine.scheduler.waiting


def test_final_only_outputs_equal_cumulative_ones():
    """output_kind="final_only" (what generate() and the offline bench use): no output before a
    request ends, and the final one (tokens, text, logprobs, stop strings) equals the cumulative
    kind's."""
    from dlengine import EngineBuilder, InvalidRequestError, SamplingParams

    engine = EngineBuilder("tiny-qwen3").dtype("float32").device("cpu").build()
    prompts = ["Hello there", "The capital of France is", "1 2 3"]
    cases = [SamplingParams(max_tokens=12, temperature=0.0),
             SamplingParams(max_tokens=12, temperature=0.0, logprobs=2),
             SamplingParams(max_tokens=30, temperature=0.0, stop=[" "], min_tokens=2)]
    for params in cases:
        finals = {}
        for kind in ("cumulative", "final_only"):
            ids = [engine.add_request(p, params, output_kind=kind) for p in prompts]
            seen = []
            while engine.has_unfinished_requests():
                seen += engine.step()
            if kind == "final_only":
                assert all(o.finished for o in seen) and len(seen) == len(prompts)
            finals[kind] = [[o for o in seen if o.request_id == rid and o.finished][-1] for rid in ids]
        for a, b in zip(finals["cumulative"], finals["final_only"]):
            assert (a.token_ids, a.text, a.finish_reason, a.stop_reason, a.logprobs) == \
                (b.token_ids, b.text, b.finish_reason, b.stop_reason, b.logprobs)
    with pytest.raises(InvalidRequestError, match="output_kind"):
        engine.add_request("x", output_kind="delta")
