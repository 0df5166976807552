"""One API for every engine: the same checks drive a local engine, a tensor-parallel engine
(tp=2, also with async scheduling) and an attention-DP x expert-parallel engine (attention_dp=2, ffn_ep=2) through
add_request / step / stream / abort / generate (CPU, gloo, spawned workers), against the
single-process engine's greedy tokens."""

import pytest

from dlengine import EngineBuilder, InvalidRequestError, SamplingParams

from conftest import make_prompts

MODEL = "tiny-qwen3-moe"  # MoE: tp shards the experts, dp x ep exchanges tokens
PROMPTS = make_prompts(6, lengths=(1, 5, 17, 40, 64, 100))
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
LAYOUTS = {"local": {}, "tp2": dict(tp=2), "dp2-ep2": dict(attention_dp=2, ffn_ep=2),
           # async scheduling (each step applies the previous step's tokens) on every rank
           "tp2-async": dict(tp=2, async_=True)}


@pytest.fixture(scope="module")
def reference():
    engine = EngineBuilder(MODEL).dtype("float32").build()
    outs = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    engine.close()
    return outs


@pytest.fixture(scope="module", params=list(LAYOUTS))
def engine(request):
    b = EngineBuilder(MODEL).dtype("float32")
    layout = dict(LAYOUTS[request.param])
    if layout.pop("async_", False):
        b.async_scheduling(True)
    if layout:
        b.parallel(timeout_s=180, **layout)
    engine = b.build()
    yield engine
    engine.close()


def drive(engine, rids: set, limit: int = 500) -> dict:
    finals = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert rids <= set(finals), f"unfinished: {rids - set(finals)}"
    assert not engine.has_unfinished_requests()
    return finals


def test_add_request_and_step(engine, reference):
    rids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    finals = drive(engine, set(rids))
    assert [finals[r].token_ids for r in rids] == reference
    assert all(finals[r].finish_reason == "length" for r in rids)


def test_stream_yields_tokens_as_they_come(engine, reference):
    seen: dict[str, list[int]] = {}
    order = []
    for out in engine.stream(PROMPTS[:3], GREEDY):
        seen.setdefault(out.request_id, []).extend(out.new_token_ids)
        assert out.token_ids == seen[out.request_id]  # cumulative = the deltas so far
        if out.finished:
            order.append(out.request_id)
    assert len(order) == 3
    assert [seen[r] for r in sorted(seen, key=lambda r: int(r.split("-")[1]))] == reference[:3]


def test_abort_mid_run_frees_and_keeps_the_rest(engine, reference):
    keep = engine.add_request(PROMPTS[3], GREEDY)
    drop = engine.add_request(PROMPTS[4], SamplingParams(max_tokens=50, temperature=0.0))
    for _ in range(3):
        engine.step()
    assert engine.abort(drop)
    assert not engine.abort("no-such-request")
    finals = drive(engine, {keep, drop})
    assert finals[drop].finish_reason == "abort" and len(finals[drop].token_ids) < 50
    assert finals[keep].token_ids == reference[3]
    if hasattr(engine, "processes"):  # workers: nothing left running on any rank
        assert all(s["num_finished"] >= 0 for s in engine.stats())
    else:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_generate_and_bad_input(engine, reference):
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == reference
    with pytest.raises(InvalidRequestError, match="prompt 1"):
        engine.generate([PROMPTS[0], [10**6]], GREEDY)
    with pytest.raises(InvalidRequestError, match="float"):
        engine.generate(3.5, GREEDY)
    ok, bad = engine.generate([PROMPTS[2], []], GREEDY, raise_on_error=False)
    assert ok.token_ids == reference[2] and bad.finish_reason == "error"


def test_stop_string_ends_the_request_on_every_layout(engine):
    [full] = engine.generate(["hello world"], SamplingParams(max_tokens=12, temperature=0.0))
    if len(full.text) < 4:
        pytest.skip("the tiny model's text is too short to cut")
    stop = full.text[2:4]
    [cut] = engine.generate(["hello world"], SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]))
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    # the core learns of the stop string at its next step (a parallel core: the abort is sent then)
    late = [o for _ in range(3) if engine.has_unfinished_requests() for o in engine.step()]
    assert late == [] and not engine.has_unfinished_requests()


def test_per_request_listener_from_another_thread(engine, reference):
    """What an asyncio server needs: each request's outputs delivered to its own queue, and an
    abort from another thread applied at the next step."""
    import queue
    import threading

    keep_q, drop_q = queue.Queue(), queue.Queue()
    keep = engine.add_request(PROMPTS[1], GREEDY, on_output=keep_q.put)
    drop = engine.add_request(PROMPTS[5], SamplingParams(max_tokens=40, temperature=0.0), on_output=drop_q.put)
    engine.step()
    t = threading.Thread(target=engine.abort, args=(drop,))
    t.start()
    t.join()
    drive(engine, set())
    got = list(keep_q.queue)
    assert got[-1].finished and got[-1].token_ids == reference[1]
    assert sum(len(o.new_token_ids) for o in got) == len(reference[1])
    assert list(drop_q.queue)[-1].finish_reason == "abort"


def test_prompt_logits_on_every_layout(engine):
    import torch

    local = EngineBuilder(MODEL).dtype("float32").build()
    ref = local.prompt_logits(PROMPTS[3])
    local.close()
    got = engine.prompt_logits(PROMPTS[3], chunk_size=16)  # three chunks through the scheduler
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not engine.has_unfinished_requests()
