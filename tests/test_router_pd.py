"""`dlengine router` over real `dlengine serve` processes on 127.0.0.1 (tiny-qwen3 on the CPU, a
real redis-server + dlslime-ctrl): PD answers equal a hybrid server's, signed kv_transfer_params,
a decode server SIGKILLed mid-stream, and discovery through the control plane."""

import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="the router needs the serve extra: pip install 'dlengine[serve]'")
openai = pytest.importorskip("openai")
pytest.importorskip("dlslime", reason="needs DLSlime: pip install 'dlengine[dlslime]'")

from dlengine.router import RouterConfig  # noqa: E402

from router_helpers import RunningRouter, ServeProcess, wait_for  # noqa: E402

PINNED = 'dlengine_kv_transfer_state{field="pinned_requests"}'
PROMPTS = ["The capital of France is", "1 2 3 4 5 6"]
MESSAGES = [{"role": "user", "content": "Say something short."}]


@pytest.fixture(scope="module")
def control_plane():
    import test_pd_disagg

    yield from test_pd_disagg.control_plane.__wrapped__()


@pytest.fixture(scope="module")
def servers(control_plane):
    ctrl = ["--ctrl-address", control_plane.removeprefix("http://")]
    # the decode server runs one sequence at a time, so a second PD request waits there unpulled
    procs = {"prefill": ServeProcess("prefill", *ctrl), "decode": ServeProcess("decode", "--max-num-seqs", "1", *ctrl),
             "hybrid": ServeProcess("hybrid", *ctrl)}
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def router(servers):
    r = RunningRouter(RouterConfig(prefill=[servers["prefill"].url], decode=[servers["decode"].url],
                                   hybrid=[servers["hybrid"].url], stream_timeout_s=5.0, health_interval_s=0.5))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def discovering(servers, control_plane):
    r = RunningRouter(RouterConfig(ctrl_address=control_plane.removeprefix("http://"), discovery_interval_s=0.5,
                                   health_interval_s=0.5, discovery_stale_s=5.0))
    yield r
    r.stop()


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def answers(url: str) -> list:
    c, out = client(url), []
    for prompt in PROMPTS:
        out.append(c.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0].text)
        out.append("".join(ch.choices[0].text for ch in c.completions.create(
            model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True) if ch.choices))
    out.append(c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8,
                                         temperature=0).choices[0].message.content)
    out.append("".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, stream=True) if ch.choices))
    return out


def test_pd_through_the_router_equals_a_hybrid_server(servers, router):
    pulled = 'dlengine_kv_transfer_requests_total{outcome="pulled"}'
    before = servers["decode"].metric(pulled)
    assert answers(router.url) == answers(servers["hybrid"].url)
    assert servers["decode"].metric(pulled) - before == 2 * len(PROMPTS) + 2  # every request went PD
    assert servers["hybrid"].metric('dlengine_prompt_tokens_total') > 0
    prefill = servers["prefill"]
    wait_for(lambda: prefill.metric(PINNED) == 0, 5, "the prefill server freed every hand-off")
    # max_tokens=1: the prefill server finishes alone and its answer is the answer (streamed too)
    c = client(router.url)
    one = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1, temperature=0)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1
    streamed = [ch for ch in c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})]
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == one.choices[0].text
    assert streamed[-1].usage.completion_tokens == 1


def test_forged_or_edited_params_are_refused_and_pull_nothing(servers):
    prefill, decode = servers["prefill"], servers["decode"]
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    signed = httpx.post(f"{prefill.url}/v1/completions", json=body, timeout=30).json()["kv_transfer_params"]
    assert signed["signature"]
    pulled = 'dlengine_kv_transfer_requests_total{outcome="pulled"}'
    before = decode.metric(pulled)
    unsigned = {k: v for k, v in signed.items() if k != "signature"}
    edited = {**signed, "nonce": signed["nonce"] + 1}
    other_blocks = {**signed, "block_ids": [b + 1 for b in signed["block_ids"]]}
    for params in (unsigned, edited, other_blocks, {**signed, "signature": "0" * 64}):
        r = httpx.post(f"{decode.url}/v1/completions", json={**body, "kv_transfer_params": params}, timeout=30)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "invalid_kv_transfer_params"
        assert httpx.post(f"{prefill.url}/pd/free", json={"kv_transfer_params": params}, timeout=30).status_code == 403
    assert decode.metric(pulled) == before
    assert prefill.metric(PINNED) == 1  # nothing above released it
    assert httpx.post(f"{prefill.url}/pd/free", json={"kv_transfer_params": signed}, timeout=30).json() == {
        "freed": True}
    assert prefill.metric(PINNED) == 0


def test_discovery_finds_the_registered_servers(servers, discovering):
    want = {(s.url, role) for role, s in servers.items()}
    wait_for(lambda: {(b.url, b.role) for b in discovering.pool.backends.values()} == want, 15,
             "the router discovered prefill, decode and hybrid")
    r = client(discovering.url).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


def test_decode_killed_mid_stream(servers, router, discovering):
    prefill, decode, hybrid = servers["prefill"], servers["decode"], servers["hybrid"]
    c = client(router.url)
    stream = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1000, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)  # streaming from the decode server, which now runs its one sequence
    # a second hand-off, sent straight to the decode server, waits there unpulled: the prefill
    # server pins its blocks, and the decode server holds /pd/hold open for it
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0}
    signed = httpx.post(f"{prefill.url}/v1/completions", json=body, timeout=30).json()["kv_transfer_params"]
    waiting = threading.Thread(target=lambda: _post_quietly(f"{decode.url}/v1/completions",
                                                            {**body, "kv_transfer_params": signed}))
    waiting.start()
    wait_for(lambda: prefill.metric(PINNED) == 1, 10, "the waiting hand-off is pinned")
    time.sleep(0.5)  # let the decode server open its liveness stream
    decode.kill()
    killed = time.monotonic()
    with pytest.raises(openai.APIError):
        for _ in chunks:
            pass
    assert time.monotonic() - killed < 5.0  # the router's stream timeout is 5 s; a reset is seen at once
    freed_after = wait_for(lambda: prefill.metric(PINNED) == 0, 5, "the dead decode server's blocks were freed")
    assert freed_after < 5.0  # not the 60 s pin timeout
    wait_for(lambda: prefill.metric("dlengine_kv_cache_free_blocks") == prefill.metric("dlengine_kv_cache_blocks"),
             5, "the prefill pool is full again")
    waiting.join(timeout=10)
    assert decode.url not in router.urls("decode")
    r = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    want = client(hybrid.url).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert r.choices[0].text == want.choices[0].text
    wait_for(lambda: decode.url not in {b.url for b in discovering.pool.backends.values()}, 15,
             "the discovering router forgot the killed decode server")


def _post_quietly(url: str, body: dict) -> None:
    try:
        httpx.post(url, json=body, timeout=30)
    except httpx.HTTPError:
        pass  # the server is killed under it


def test_least_load_reads_the_requests_a_backend_holds_from_its_metrics(servers):
    """A request sent to the hybrid server directly (not through the router) shows in the load a
    least-load router reads from the server's /metrics, and leaves it when it ends."""
    hybrid = servers["hybrid"]
    r = RunningRouter(RouterConfig(hybrid=[hybrid.url], policy="least-load", health_interval_s=0.2))
    try:
        backend = r.pool.backends[hybrid.url]
        wait_for(lambda: backend.reported_load == 0, 10, "the idle server's load read")
        seen = []
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0.0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{hybrid.url}/v1/completions", json=body, timeout=60) as resp:
            for _ in resp.iter_lines():  # read while it generates
                if backend.reported_load:
                    seen.append(backend.reported_load)
                    break
        assert seen == [1] and backend.in_flight == 0  # the router sent nothing itself
        wait_for(lambda: backend.reported_load == 0, 10, "the finished request leaving the load")
        assert r.pool.backends[hybrid.url].describe()["reported_load"] == 0
    finally:
        r.stop()
