"""`dlengine serve` as a user runs it: a subprocess bound to 127.0.0.1, answering the openai
client, stopping cleanly on SIGINT; and the flags that build prefill / decode engines and register
the server with dlslime-ctrl (a real redis-server + dlslime-ctrl, as in test_pd_disagg)."""

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="dlengine serve needs the serve extra: pip install 'dlengine[serve]'")
openai = pytest.importorskip("openai")

from dlengine.cli import build_parser  # noqa: E402

from serve_helpers import free_port, serving  # noqa: E402

ENGINE_FLAGS = ["--dtype", "float32", "--device", "cpu", "--num-blocks", "64", "--max-model-len", "256"]


def parse(*argv) -> argparse.Namespace:
    args = build_parser().parse_args(["serve", *argv])
    if args.model_path:
        args.model = args.model_path
    return args


def test_serve_subprocess_answers_and_stops_on_sigint():
    port = free_port()
    env = {**os.environ, "DLENGINE_API_KEY": "k", "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get(
        "PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "dlengine.cli", "serve", "tiny-qwen3", "--port", str(port),
                             "--served-model-name", "tiny", "--threads", "1", "--log-level", "warning", *ENGINE_FLAGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "dlengine serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)  # from the env
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens <= 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out
    assert "Qwen3ForCausalLM" in out  # the engine's description is printed at start


def test_flags_default_to_loopback_and_bench_engine_options():
    args = parse("tiny-qwen3", "--block-size", "32", "--max-num-seqs", "4", *ENGINE_FLAGS)
    assert args.host == "127.0.0.1" and args.mode == "hybrid" and args.model == "tiny-qwen3"
    from dlengine.serve.cli import build_engine

    engine = build_engine(args)
    try:
        d = engine.describe()
        assert d["block_size"] == 32 and d["max_num_seqs"] == 4 and d["num_kv_blocks"] == 64
        assert d["max_model_len"] == 256 and d["role"] == "hybrid"
    finally:
        engine.close()


def test_bad_flags_are_clear_errors(capsys):
    from dlengine.cli import main

    assert main(["serve", "tiny-qwen3", "--max-concurrent-requests", "0", *ENGINE_FLAGS]) == 1
    assert "--max-concurrent-requests must be positive" in capsys.readouterr().err
    assert main(["serve", "/no/such/model"]) == 1
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ PD roles, control plane
@pytest.fixture(scope="module")
def control_plane():
    pytest.importorskip("dlslime", reason="needs DLSlime: pip install 'dlengine[dlslime]' (and libibverbs1)")
    import test_pd_disagg

    yield from test_pd_disagg.control_plane.__wrapped__()


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_pd_modes_build_role_engines_and_register(control_plane, mode):
    from dlslime.ctrl import NanoCtrlClient

    from dlengine.serve.cli import build_engine

    ctrl = control_plane.removeprefix("http://")
    args = parse("tiny-qwen3", "--mode", mode, "--ctrl-address", ctrl, *ENGINE_FLAGS)
    engine = build_engine(args)
    try:
        d = engine.describe()
        assert d["role"] == mode and d["kv_transfer"]["transfer_backend"] == "dlslime"
        with serving(engine, mode=mode, ctrl_address=ctrl, public_url="http://127.0.0.1:1234") as s:
            client = NanoCtrlClient(ctrl)
            [server] = [e for e in client.list_entities(kind="dlengine") if e["metadata"].get("role") == mode]
            assert server["metadata"]["http_url"] == "http://127.0.0.1:1234"
            assert server["metadata"]["model"] == "tiny"
            assert server["metadata"]["engine_id"] == d["kv_transfer"]["engine_id"]
            assert any(e["entity_id"] == d["kv_transfer"]["engine_id"] for e in client.list_entities(kind=mode))
            body = {"model": "tiny", "prompt": "hello world", "max_tokens": 4, "temperature": 0}
            r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=30).json()
            # a prefill engine stops after the first token and keeps the KV for a decode engine
            # (the PD-over-HTTP hand-off comes later); a decode engine computes a plain request itself
            want = ("kv_transfer", 1) if mode == "prefill" else ("length", 4)
            assert (r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"]) == want
            m = s.metrics()
            outcome = "handed_off" if mode == "prefill" else "pulled"
            assert m[f'dlengine_kv_transfer_requests_total{{outcome="{outcome}"}}'] == (1 if mode == "prefill" else 0)
        assert not [e for e in client.list_entities(kind="dlengine") if e["metadata"].get("role") == mode]
    finally:
        engine.close()
