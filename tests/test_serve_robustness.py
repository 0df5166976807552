"""No input takes the server down: schemathesis drives every operation of the server's own OpenAPI
document with generated valid and invalid requests, then a load of 200 concurrent streams (a
third of them hang up early). Afterwards the server is healthy and every KV block is free."""

import asyncio
import json

import httpx
import pytest

pytest.importorskip("fastapi", reason="dlengine serve needs the serve extra: pip install 'dlengine[serve]'")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from serve_helpers import MODEL, serving, tiny_engine  # noqa: E402

MAX_EXAMPLES = 30  # per operation and generation mode
TOKEN_BOUND = {"type": "integer", "minimum": -2, "maximum": 8}  # generated lengths stay tiny (negatives: 400s)


@pytest.fixture(scope="module")
def server():
    engine = tiny_engine(num_blocks=128)
    with serving(engine, max_body_bytes=256 * 1024) as s:
        yield s
    engine.close()


def _bounded(doc: dict) -> dict:
    """The served OpenAPI document with small generation lengths, so each case runs in
    milliseconds, and the served model's name; every other field keeps the server's own schema."""
    schemas = doc["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            if field in props:
                props[field] = dict(TOKEN_BOUND)
        props["n"] = {"type": "integer", "minimum": 0, "maximum": 2}
        props["model"] = {"type": "string", "enum": [MODEL]}  # else nearly every case is a 404
    return doc


def test_schemathesis_finds_no_server_error(server):
    doc = _bounded(httpx.get(f"{server.url}/openapi.json").json())
    schema = schemathesis.openapi.from_dict(doc)
    operations = [(path, method.upper()) for path, item in doc["paths"].items() for method in item]
    assert ("/v1/completions", "POST") in operations and ("/v1/chat/completions", "POST") in operations
    failures = []
    for path, method in operations:
        modes = [schemathesis.GenerationMode.POSITIVE]
        if method == "POST":  # an operation without inputs has no invalid ones
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=schema[path][method].as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=server.url, timeout=60)
                if response.status_code >= 500:
                    failures.append((path, mode.value, case.body, response.status_code, response.text[:300]))
                elif response.status_code >= 400:
                    body = json.loads(response.content)
                    assert set(body["error"]) == {"message", "type", "param", "code"}, body

            run()
    assert not failures, failures[:5]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    server.wait_idle()


def test_200_concurrent_streams_a_third_hang_up(server):
    n, max_tokens = 200, 24

    async def one(client: httpx.AsyncClient, i: int) -> str:
        hang_up = i % 3 == 0
        body = {"model": MODEL, "prompt": f"request {i}: hello world", "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0.8, "seed": i, "stream": True}
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return f"status {r.status_code}: {(await r.aread())[:200]!r}"
                tokens, finish = "", None
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    if line == "data: [DONE]":
                        return f"done {finish}"
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return f"error {chunk['error']['message']}"
                    tokens += chunk["choices"][0]["text"]
                    finish = chunk["choices"][0]["finish_reason"] or finish
                    if hang_up:
                        return "hung up"  # leaving the block closes the connection
                return "ended without [DONE]"
        except httpx.HTTPError as e:
            return f"client error {type(e).__name__}: {e}"

    async def run():
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    results = asyncio.run(run())
    hung = [r for i, r in enumerate(results) if i % 3 == 0]
    done = [r for i, r in enumerate(results) if i % 3 != 0]
    assert hung == ["hung up"] * len(hung)
    assert done == ["done length"] * len(done), sorted(set(done))
    m = server.wait_idle(timeout=30)
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert m['dlengine_request_finished_total{finish_reason="abort"}'] >= len(hung)

