"""The command line over parallel engines: `dlengine serve tiny-qwen3 --tp 2` answers the openai
client with the single-process engine's greedy tokens, frees every rank's blocks when a streaming
client goes away, and leaves no process behind; `dlengine bench throughput / latency` run with
--tp 2 and with --attention-dp 2 --ffn-ep 2 (MoE); a layout the model cannot take is a one-line
error. CPU, gloo, 2 worker processes each."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from dlengine import EngineBuilder, SamplingParams
from dlengine.cli import build_parser, main

from serve_helpers import free_port

ENGINE_FLAGS = ["--dtype", "float32", "--device", "cpu", "--num-blocks", "64", "--max-model-len", "256"]
BENCH_SMALL = ["--input-len", "16", "--output-len", "4", "--max-model-len", "128", "--num-blocks", "64",
               "--no-progress"]
PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]


def test_parallel_flags_and_aliases_reach_the_builder():
    from dlengine.bench.common import EngineArgs, coerce_config, engine_builder

    for argv in (["--tp", "2"], ["--tensor-parallel-size", "2"], ["-tp", "2"]):
        assert build_parser().parse_args(["bench", "throughput", *argv]).tp == 2
    args = build_parser().parse_args(["serve", "tiny-qwen3-moe", "--attention_dp", "2", "--ffn_ep", "2",
                                      "--expert-placement", "round_robin", "--dispatch-backend", "all_to_all"])
    assert (args.attention_dp, args.ffn_ep, args.tp) == (2, 2, 1)
    args.model = args.model_path
    p = engine_builder(coerce_config(EngineArgs, args)).config().parallel
    assert (p.tp, p.attention_dp, p.ffn_ep, p.expert_placement, p.dispatch_backend) == (
        1, 2, 2, "round_robin", "all_to_all")
    # the defaults leave parallel(...) uncalled: a single-process engine
    assert engine_builder(EngineArgs()).config().parallel.world_size == 1


@pytest.mark.parametrize("argv, match", [
    (["--tp", "3"], "not divisible by tensor-parallel size 3"),  # tiny-qwen3 has 4 attention heads
    (["--tp", "2", "--attention-dp", "2"], "not supported yet"),
    (["--attention-dp", "2", "--ffn-ep", "3"], "ffn_ep=3 is not supported"),
    (["--tp", "0"], "tp must be an integer >= 1"),
])
def test_bad_parallel_layouts_are_one_line_errors(capsys, argv, match):
    rc = main(["bench", "throughput", "--num-prompts", "2", *BENCH_SMALL, *argv])
    err = capsys.readouterr().err
    assert rc == 1 and match in err, err
    assert err.startswith("dlengine bench: error:") and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------------ bench
def _bench(tmp_path, capsys, *argv):
    path = tmp_path / "out.json"
    rc = main(["bench", *argv, *BENCH_SMALL, "--json", str(path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(path.read_text()), out.out


def test_bench_throughput_tp2(tmp_path, capsys):
    res, out = _bench(tmp_path, capsys, "throughput", "--tp", "2", "--num-prompts", "8")
    assert res["engine"].startswith("ParallelEngine(") and res["parallel"]["world_size"] == 2
    assert res["num_requests"] == 8 and res["total_output_tokens"] == 8 * 4
    assert res["num_steps"] >= 4 and res["mean_seqs_per_step"] > 0
    assert "mbu_est" not in res and "MBU / MFU not computed" in res["notes"][0]
    assert "Output tokens/s" in out and "2 / 1 / 1 (2 ranks)" in out


def test_bench_latency_tp2(tmp_path, capsys):
    res, out = _bench(tmp_path, capsys, "latency", "--tp", "2", "--batch-size", "2", "--num-iters", "2",
                      "--num-warmup-iters", "1")
    assert res["decode_ms_per_token"] > 0 and res["prefill_ms"] > 0 and res["num_decode_steps"] == 3
    assert res["decode_mbu"] is None and res["prefill_mfu"] is None and res["peaks"] is None
    assert "Decode ms / token" in out and "MBU / MFU not computed" in out


def test_bench_throughput_attention_dp_ffn_ep_moe(tmp_path, capsys):
    res, out = _bench(tmp_path, capsys, "throughput", "--model", "tiny-qwen3-moe", "--attention-dp", "2",
                      "--ffn-ep", "2", "--num-prompts", "8")
    assert res["parallel"] == {"tp": 1, "attention_dp": 2, "ffn_ep": 2, "world_size": 2}
    assert res["total_output_tokens"] == 8 * 4 and res["finish_reasons"] == {"length": 8}
    # the two replicas' lockstep steps are merged: each step ran both replicas' requests
    assert res["max_seqs_per_step"] == 8
    assert "1 / 2 / 2 (2 ranks)" in out


# ------------------------------------------------------------------------------------ serve
def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _rank_free(m: dict[str, float]) -> dict[str, tuple[float, float]]:
    free = {k.split("{")[1]: v for k, v in m.items() if k.startswith("dlengine_rank_kv_cache_free_blocks{")}
    total = {k.split("{")[1]: v for k, v in m.items() if k.startswith("dlengine_rank_kv_cache_blocks{")}
    return {labels: (free[labels], total[labels]) for labels in free}


def _wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(url)
        ranks = _rank_free(m)
        if (m.get("dlengine_num_requests_running") == 0 and m.get("dlengine_num_requests_waiting") == 0
                and len(ranks) == 2 and all(f == t for f, t in ranks.values())
                and m["dlengine_kv_cache_free_blocks"] == m["dlengine_kv_cache_blocks"]):
            return m
        assert time.monotonic() < deadline, f"the server did not go idle: {m}"
        time.sleep(0.1)


def test_serve_tp2_matches_the_single_process_engine_and_cleans_up():
    openai = pytest.importorskip("openai")
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("fastapi", reason="dlengine serve needs the serve extra: pip install 'dlengine[serve]'")
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    with EngineBuilder("tiny-qwen3").dtype("float32").device("cpu").cache(num_blocks=64).max_model_len(256) \
            .build() as single:
        want = [o.text for o in single.generate(PROMPTS, greedy)]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("DLENGINE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "dlengine.cli", "serve", "tiny-qwen3", "--tp", "2", "--port",
                             str(port), "--served-model-name", "tiny", "--threads", "1", "--log-level", "warning",
                             *ENGINE_FLAGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "dlengine serve --tp 2 did not come up"
            time.sleep(0.2)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "dlengine" in " ".join(p.cmdline()) or "multiprocessing" in " ".join(p.cmdline())]
        assert len([p for p in workers if "spawn_main" in " ".join(p.cmdline())]) == 2, workers

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        for prompt, text in zip(PROMPTS, want):
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
            assert r.choices[0].text == text
            chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True)
            assert "".join(c.choices[0].text for c in chunks if c.choices) == text

        # a streaming client that goes away: its request is aborted on every rank, its blocks freed
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                          json={"model": "tiny", "prompt": "a long story", "max_tokens": 200, "temperature": 0,
                                "ignore_eos": True, "stream": True}) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data:") for line in got)
            busy = _rank_free(_metrics(url))
            assert len(busy) == 2 and all(f < t for f, t in busy.values()), busy  # both ranks hold its blocks
        m = _wait_idle(url)
        assert m['dlengine_request_finished_total{finish_reason="abort"}'] == 1
        assert m['dlengine_request_finished_total{finish_reason="length"}'] == 2 * len(PROMPTS)
        assert m["dlengine_rank_lockstep_steps_total{dp_rank=\"0\",rank=\"1\",tp_rank=\"1\"}"] > 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out
    assert "ParallelEngine(" in out
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"worker processes outlived the server: {alive}"


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_pd_modes_with_tp2_build_and_serve(mode):
    """`dlengine serve --mode prefill|decode --tp 2` builds a tensor-parallel role engine and
    serves it (test_serve_cli's pattern): a prefill server hands the KV off after the first token,
    a decode server computes a plain request itself. The full hand-off between tp engines is
    tests/test_pd_tp_decode.py's."""
    pytest.importorskip("fastapi", reason="dlengine serve needs the serve extra: pip install 'dlengine[serve]'")
    pytest.importorskip("dlslime", reason="needs DLSlime: pip install 'dlengine[dlslime]' (and libibverbs1)")
    from dlengine.serve.cli import build_engine

    from serve_helpers import serving

    args = build_parser().parse_args(["serve", "tiny-qwen3", "--mode", mode, "--tp", "2", *ENGINE_FLAGS])
    args.model = args.model_path
    engine = build_engine(args)
    try:
        assert engine.describe()["tp"] == 2 and engine.describe()["role"] == mode
        with serving(engine, mode=mode, pd_secret="secret") as s:
            body = {"model": "tiny", "prompt": "hello world", "max_tokens": 4, "temperature": 0}
            r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).json()
            want = ("kv_transfer", 1) if mode == "prefill" else ("length", 4)
            assert (r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"]) == want
            m = s.metrics()
            outcome = "handed_off" if mode == "prefill" else "pulled"
            assert m[f'dlengine_kv_transfer_requests_total{{outcome="{outcome}"}}'] == (mode == "prefill")
            assert len(_rank_free(m)) == 2
    finally:
        engine.close()
