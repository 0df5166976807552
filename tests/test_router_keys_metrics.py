"""The router in front of a `dlengine serve` app that requires an API key (the router's own key for
clients, the backend key it forwards), and the router's /metrics: answers by route and status,
retries after a dead backend, backend health and load."""

import httpx
import pytest

pytest.importorskip("fastapi", reason="the router needs the serve extra: pip install 'dlengine[serve]'")

from dlengine.router import RouterConfig  # noqa: E402

from router_helpers import RunningRouter, wait_for  # noqa: E402
from serve_helpers import MODEL, free_port, serving, tiny_engine  # noqa: E402

BODY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


def router_metrics(router: RunningRouter) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{router.url}/metrics", timeout=10).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.fixture(scope="module")
def backend():
    with serving(tiny_engine(), api_key="backend-key") as server:
        yield server


def test_router_forwards_the_backend_key(backend):
    direct = httpx.post(f"{backend.url}/v1/completions", json=BODY, headers={"Authorization": "Bearer backend-key"})
    assert direct.status_code == 200
    r = RunningRouter(RouterConfig(hybrid=[backend.url], api_key="client-key", backend_api_key="backend-key"))
    try:
        assert httpx.post(f"{r.url}/v1/completions", json=BODY).status_code == 401  # the router's own key
        ok = httpx.post(f"{r.url}/v1/completions", json=BODY, headers={"Authorization": "Bearer client-key"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
        models = httpx.get(f"{r.url}/v1/models", headers={"Authorization": "Bearer client-key"})
        assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
    finally:
        r.stop()
    # by default the router sends its own key on: one key for the whole deployment
    assert RouterConfig(hybrid=[backend.url], api_key="k").backend_api_key == "k"
    r = RunningRouter(RouterConfig(hybrid=[backend.url], api_key="backend-key"))
    try:
        ok = httpx.post(f"{r.url}/v1/completions", json=BODY, headers={"Authorization": "Bearer backend-key"})
        assert ok.status_code == 200
    finally:
        r.stop()
    # without a backend key the backend's 401 reaches the client as the backend's answer
    r = RunningRouter(RouterConfig(hybrid=[backend.url]))
    try:
        denied = httpx.post(f"{r.url}/v1/completions", json=BODY)
        assert denied.status_code == 401 and denied.json()["error"]["type"]
        assert router_metrics(r)['dlengine_router_requests_total{route="/v1/completions",status="4xx"}'] == 1
    finally:
        r.stop()


def test_router_metrics_count_answers_retries_and_backends(backend):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = RunningRouter(RouterConfig(hybrid=[dead, backend.url], backend_api_key="backend-key",
                                   health_interval_s=60.0))  # no health check drops `dead` before a request does
    try:
        # the first health check has dropped `dead`; mark it up again so that a request meets it
        wait_for(lambda: not r.pool.backends[dead].healthy, 10, "the first health check")
        r.pool.mark_up(r.pool.backends[dead])
        for _ in range(3):
            assert httpx.post(f"{r.url}/v1/completions", json=BODY).status_code == 200
        assert httpx.post(f"{r.url}/v1/completions", content=b"{not json").status_code == 400
        m = router_metrics(r)
        assert m['dlengine_router_requests_total{route="/v1/completions",status="2xx"}'] == 3
        assert m['dlengine_router_requests_total{route="/v1/completions",status="4xx"}'] == 1
        assert m['dlengine_router_time_to_response_seconds_count{route="/v1/completions"}'] == 4
        assert m["dlengine_router_retries_total"] >= 1  # the dead backend was tried and dropped
        assert m[f'dlengine_router_backend_up{{backend="{dead}",role="hybrid"}}'] == 0
        assert m[f'dlengine_router_backend_up{{backend="{backend.url}",role="hybrid"}}'] == 1
        assert m[f'dlengine_router_backend_in_flight{{backend="{backend.url}",role="hybrid"}}'] == 0
    finally:
        r.stop()
