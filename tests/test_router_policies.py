"""The router's policies and flags, without servers."""

import pytest

pytest.importorskip("fastapi", reason="the router needs the serve extra: pip install 'dlengine[serve]'")

from dlengine.cli import build_parser  # noqa: E402
from dlengine.config import ConfigError  # noqa: E402
from dlengine.router import RouterConfig  # noqa: E402
from dlengine.router.backends import BackendPool  # noqa: E402
from dlengine.router.policies import Policy  # noqa: E402


def pool(n: int) -> BackendPool:
    p = BackendPool()
    for i in range(n):
        p.add(f"http://127.0.0.1:{9000 + i}", "hybrid")
    return p


def test_round_robin_takes_turns_over_healthy_backends():
    p, policy = pool(3), Policy("round-robin")
    picks = [policy.choose(p.usable("hybrid"), {}, "hybrid").url[-4:] for _ in range(6)]
    assert picks == ["9000", "9001", "9002"] * 2
    p.mark_down(p.backends["http://127.0.0.1:9001"], "test")
    assert {policy.choose(p.usable("hybrid"), {}, "hybrid").url[-4:] for _ in range(4)} == {"9000", "9002"}


def test_least_load_picks_fewest_in_flight():
    p, policy = pool(3), Policy("least-load")
    for url, n in zip(sorted(p.backends), (2, 0, 1)):
        p.backends[url].in_flight = n
    assert policy.choose(p.usable("hybrid"), {}, "hybrid").url.endswith("9001")
    p.backends["http://127.0.0.1:9001"].in_flight = 5
    assert policy.choose(p.usable("hybrid"), {}, "hybrid").url.endswith("9002")


def test_prefix_affinity_keeps_a_prefix_on_one_backend_and_moves_only_a_leavers_prefixes():
    p, policy = pool(4), Policy("prefix-affinity", prefix_chars=32)
    shared = "You are a helpful assistant. " * 4
    bodies = [{"prompt": shared + f"question {i}"} for i in range(10)]
    assert len({policy.choose(p.usable("hybrid"), b, "hybrid").url for b in bodies}) == 1  # same first 32 chars
    spread = {policy.choose(p.usable("hybrid"), {"prompt": f"{i} " * 20}, "hybrid").url for i in range(40)}
    assert len(spread) == 4
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert policy.choose(p.usable("hybrid"), chat, "hybrid") is policy.choose(p.usable("hybrid"), chat, "hybrid")
    before = {i: policy.choose(p.usable("hybrid"), {"prompt": f"{i} " * 20}, "hybrid").url for i in range(40)}
    gone = "http://127.0.0.1:9002"
    p.mark_down(p.backends[gone], "test")
    after = {i: policy.choose(p.usable("hybrid"), {"prompt": f"{i} " * 20}, "hybrid").url for i in range(40)}
    assert all(after[i] == before[i] for i in before if before[i] != gone)
    assert gone not in after.values()


def test_router_flags_and_bad_config():
    args = build_parser().parse_args(["router", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2",
                                      "--hybrid", "http://127.0.0.1:3", "--hybrid", "http://127.0.0.1:4",
                                      "--policy", "least-load"])
    assert args.hybrid == ["http://127.0.0.1:3", "http://127.0.0.1:4"] and args.policy == "least-load"
    assert args.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="unknown routing policy"):
        RouterConfig(policy="random")
    with pytest.raises(ConfigError, match="base URL"):
        RouterConfig(hybrid=["127.0.0.1:8000"])


def test_router_without_backends_is_a_clear_error(capsys):
    from dlengine.cli import main

    assert main(["router"]) == 1
    assert "give backends" in capsys.readouterr().err


DLENGINE_METRICS = """# HELP dlengine_num_requests_running Requests being computed
# TYPE dlengine_num_requests_running gauge
dlengine_num_requests_running 3.0
# HELP dlengine_num_requests_waiting Requests waiting to be scheduled
# TYPE dlengine_num_requests_waiting gauge
dlengine_num_requests_waiting 2.0
# TYPE dlengine_generation_tokens_total counter
dlengine_generation_tokens_total 1234.0
"""
VLLM_METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 4.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
"""
SGLANG_METRICS = """# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 7.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 1.0
"""


def test_load_read_from_our_vllm_and_sglang_metrics():
    from dlengine.router.load import parse_load

    assert parse_load(DLENGINE_METRICS) == 5
    assert parse_load(VLLM_METRICS) == 5  # summed over engines
    assert parse_load(SGLANG_METRICS) == 8
    assert parse_load("# TYPE other gauge\nother 9.0\n") is None  # a server that reports no known count
    assert parse_load("<html>not metrics</html>") is None


def test_least_load_uses_reported_load_plus_what_the_router_sent_since():
    p, policy = pool(2), Policy("least-load")
    a, b = (p.backends[u] for u in sorted(p.backends))
    a.report_load(6)  # busy with other clients' requests the router never saw
    b.in_flight = 2
    assert (a.load, b.load) == (6, 2) and policy.choose(p.usable("hybrid"), {}, "hybrid") is b
    b.report_load(2)
    b.in_flight = 7  # five more sent since the report
    assert b.load == 7 and policy.choose(p.usable("hybrid"), {}, "hybrid") is a
    b.in_flight = 0  # finished since: the report stands until the next one
    assert b.load == 2
    a.report_load(None)  # /metrics failed: back to the router's own count
    assert a.load == a.in_flight == 0 and policy.choose(p.usable("hybrid"), {}, "hybrid") is a
