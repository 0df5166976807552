"""dlengine serve over real loopback sockets, driven by the official `openai` client: completions
and chat, streamed or not, equal to Engine.generate; n, stop, logprobs, echo; errors in OpenAI's
shape with the right status; the API key; disconnecting clients; /metrics."""

import json
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="dlengine serve needs the serve extra: pip install 'dlengine[serve]'")
openai = pytest.importorskip("openai")

from dlengine import SamplingParams  # noqa: E402

from serve_helpers import MODEL, serving, tiny_engine  # noqa: E402

PROMPTS = ["hello world", "The quick brown fox", "Paged attention keeps"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Once upon a time"}]
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def reference():
    """A second engine, for Engine.generate's answers (the served one belongs to its thread)."""
    engine = tiny_engine()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server():
    engine = tiny_engine()
    with serving(engine, max_concurrent_requests=8, max_body_bytes=64 * 1024) as s:
        yield s
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(reference, prompt, max_tokens=12, **kw):
    [out] = reference.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw))
    return out


def chat_prompt_ids(reference, messages):
    text = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return reference.tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------ generation
def test_models_and_health(server, client):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    [card] = client.models.list().data
    assert card.id == MODEL and card.max_model_len == 512


def test_completions_greedy_equal_engine_generate(client, reference):
    r = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, r.choices):
        ref = greedy(reference, prompt)
        assert choice.text == ref.text and choice.finish_reason == ref.finish_reason
    ids = [reference.tokenizer.encode(p) for p in PROMPTS]
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 36
    # token-id prompts, one and many
    r = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == greedy(reference, ids[0]).text
    r = client.completions.create(model=MODEL, prompt=ids[1:], max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == [greedy(reference, p).text for p in ids[1:]]


def test_completions_stream_equals_non_stream(client, reference):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ref = greedy(reference, PROMPTS[0], max_tokens=20)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_return_token_ids_stream_and_not(server, reference):
    ids = reference.tokenizer.encode(PROMPTS[0])
    body = {"model": MODEL, "prompt": ids, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    [choice] = httpx.post(f"{server.url}/v1/completions", json=body).json()["choices"]
    ref = greedy(reference, ids, max_tokens=8)
    assert choice["prompt_token_ids"] == ids and choice["token_ids"] == list(ref.token_ids)
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [t for e in events for c in e["choices"] for t in c["token_ids"]]
    assert streamed == list(ref.token_ids)
    plain = httpx.post(f"{server.url}/v1/completions", json={**body, "return_token_ids": False}).json()
    assert "token_ids" not in plain["choices"][0]  # only when asked for


def test_chat_greedy_stream_and_not(client, reference):
    ref = greedy(reference, chat_prompt_ids(reference, CHAT), max_tokens=16)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.text and not msg.tool_calls
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_raw_sse_framing(server):
    """data: lines of JSON chunks, then data: [DONE]."""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_n_choices_and_seeds(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, n=3, temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 24
    again = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, n=3, temperature=1.0, seed=7)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in r.choices}) > 1  # each choice has its own seed
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, n=2, stream=True, seed=3))
    by_index = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index] += ch.delta.content or ""
    nonstream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, n=2, seed=3)
    assert by_index == {c.index: c.message.content for c in nonstream.choices}


def test_stop_strings_and_min_tokens(client, reference):
    full = greedy(reference, PROMPTS[1], max_tokens=20).text
    stop = full[6:9]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    # streamed: the held-back tail never leaks the stop string
    chunks = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=0,
                                  extra_body={"min_tokens": 5, "ignore_eos": True})
    assert r.usage.completion_tokens == 5


def test_sampling_fields_accepted(client):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.3, seed=1, extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.usage.completion_tokens <= 6


def test_completion_logprobs(client, reference):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ref = greedy(reference, PROMPTS[0], max_tokens=6, logprobs=3)
    assert lp.token_logprobs == pytest.approx([d[t] for t, d in zip(ref.token_ids, ref.logprobs)], abs=1e-5)
    assert all(len(top) >= 1 and max(top.values()) == pytest.approx(tl, abs=1e-6)  # greedy: chosen = best
               for top, tl in zip(lp.top_logprobs, lp.token_logprobs))
    assert "".join(lp.tokens) == r.choices[0].text or "\ufffd" in "".join(lp.tokens)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)


def test_echo_logprobs_equal_prompt_logits(client, reference):
    """What lm-eval's loglikelihood asks: the prompt's token logprobs, from prompt_logits."""
    ids = reference.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    r = client.completions.create(model=MODEL, prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    want = torch.log_softmax(reference.prompt_logits(ids), dim=-1)
    expect = [want[j - 1, ids[j]].item() for j in range(1, len(ids))]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expect, abs=1e-4)
    assert r.choices[0].text.startswith(reference.tokenizer.decode(ids))


# ------------------------------------------------------------------------------------ errors
def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "prompt": "x", "bogus_field": 1}, "bogus_field"),  # unknown field
    ({"model": MODEL, "prompt": "x", "temperature": -1}, None),  # SamplingParams' range check
    ({"model": MODEL, "prompt": "x", "top_p": 0}, None),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, None),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),  # wrong type
    ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "x", "seed": 2**70}, "seed"),
    ({"model": MODEL, "prompt": [1, 2, 10**6]}, None),  # token id outside the vocabulary
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": [5] * 600}, None),  # longer than max_model_len
    ({"prompt": "x"}, "model"),
])
def test_bad_completion_requests_are_400(server, body, param):
    err = _error(httpx.post(f"{server.url}/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_error_statuses(server):
    url = f"{server.url}/v1/completions"
    err = _error(httpx.post(url, content=b'{"model": ', headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    assert "max_model_len" in _error(httpx.post(url, json={"model": MODEL, "prompt": [5] * 600}), 400)["message"]
    assert _error(httpx.post(url, json={"model": "gpt-4", "prompt": "x"}), 404)["code"] == "model_not_found"
    assert _error(httpx.post(url, json={"model": MODEL, "prompt": "x" * 70000}), 413)["code"] == "request_too_large"
    chat = f"{server.url}/v1/chat/completions"
    _error(httpx.post(chat, json={"model": MODEL, "messages": []}), 400)
    _error(httpx.post(chat, json={"model": MODEL, "messages": CHAT, "tool_choice": "required"}), 400)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL, prompt="x", top_p=3)


def test_too_many_requests_is_429(server):
    """Past max_concurrent_requests (8), requests get 429 at once; the others complete."""
    import asyncio

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 40, "ignore_eos": True}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(16)))

    statuses = sorted(r.status_code for r in asyncio.run(run()))
    assert statuses.count(200) >= 8 and 429 in statuses and set(statuses) <= {200, 429}
    server.wait_idle()


def test_api_key():
    engine = tiny_engine(num_blocks=32)
    try:
        with serving(engine, api_key=KEY) as s:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
            assert _error(httpx.post(f"{s.url}/v1/completions", json=body), 401)["code"] == "invalid_api_key"
            bad = {"Authorization": "Bearer wrong"}
            _error(httpx.post(f"{s.url}/v1/completions", json=body, headers=bad), 401)
            _error(httpx.get(f"{s.url}/v1/models"), 401)
            assert httpx.get(f"{s.url}/health").status_code == 200  # probes need no key
            ok = openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0)
            assert ok.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        engine.close()


# ------------------------------------------------------------------------------------ disconnects, metrics
def test_disconnecting_clients_free_their_blocks(server):
    before = server.metrics().get('dlengine_request_finished_total{finish_reason="abort"}', 0)
    long = {"model": MODEL, "prompt": "hello", "max_tokens": 400, "ignore_eos": True}
    # a streaming client that reads two chunks and hangs up
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**long, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
    # a plain client that gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=long, timeout=0.3)
    t0 = time.monotonic()
    m = server.wait_idle(timeout=10)
    assert time.monotonic() - t0 < 5  # aborted, not run to the end
    assert m['dlengine_request_finished_total{finish_reason="abort"}'] == before + 2


def test_metrics_parse_and_count(server, client):
    m0 = server.metrics()
    client.completions.create(model=MODEL, prompt="hello world", max_tokens=5, temperature=0)
    m = server.metrics()
    assert m["dlengine_generation_tokens_total"] - m0.get("dlengine_generation_tokens_total", 0) == 5
    assert m["dlengine_prompt_tokens_total"] > m0.get("dlengine_prompt_tokens_total", 0)
    assert m["dlengine_time_to_first_token_seconds_count"] >= 1 and m["dlengine_e2e_request_latency_seconds_count"] >= 1
    assert m["dlengine_time_per_output_token_seconds_count"] >= 1
    assert 0 <= m["dlengine_prefix_cache_hit_rate"] <= 1 and m["dlengine_num_preemptions_total"] >= 0
    assert m["dlengine_kv_cache_usage_ratio"] == 0 and m["dlengine_kv_cache_blocks"] == 256
    assert not any(k.startswith("dlengine_kv_transfer") for k in m)  # a hybrid engine moves no KV


def test_engine_failure_is_503_and_unhealthy():
    """An engine error stops the stepping thread: the request in flight and every later one get
    503 in OpenAI's shape, /health says 503, and the server process stays up."""
    from dlengine import EngineBuilder

    class FailingSampler:
        def __call__(self, logits, tensors):
            raise RuntimeError("sampler exploded")

    engine = (EngineBuilder("tiny-qwen3").dtype("float32").device("cpu").cache(block_size=16, num_blocks=32)
              .max_model_len(256).sampler(FailingSampler()).build())
    try:
        with serving(engine) as s:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
            err = _error(httpx.post(f"{s.url}/v1/completions", json=body, timeout=30), 503)
            assert "sampler exploded" in err["message"] and err["type"] == "server_error"
            _error(httpx.post(f"{s.url}/v1/chat/completions", json={"model": MODEL, "messages": CHAT}), 503)
            _error(httpx.get(f"{s.url}/health"), 503)
            assert httpx.get(f"{s.url}/v1/models").status_code == 200
    finally:
        engine.close()
