"""Online serving benchmark: load any OpenAI-compatible server over HTTP and measure it.

    from dlengine.bench.serve_bench import run_serve_bench
    result = run_serve_bench(base_url="http://127.0.0.1:8000", num_prompts=200, request_rate=8.0)
    print(result["output_tokens_per_s"], result["p99_ttft_ms"], result["goodput_requests_per_s"])

Requests arrive as a Poisson process of `request_rate` per second (exponential gaps drawn with a
fixed seed; `inf` sends them all at once), optionally capped at `max_concurrency` in flight (a
request waits for a slot before it is sent; the wait is not part of its TTFT). Each one streams
(serve_client.py); the metrics are in serve_metrics.py. Before the clock starts one probe
request (the first prompt, 2 tokens) checks that the server answers and whether it takes
token-id prompts; when it refuses them, the prompts are sent as text decoded with --tokenizer.
A failed or timed-out request is counted with its reason; Ctrl-C ends the run early and the
report covers the requests that ended before it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dlengine.bench.common import BenchError, coerce_config, write_json
from dlengine.bench.serve_client import (
    ENDPOINTS,
    RequestResult,
    auth_headers,
    build_payload,
    import_httpx,
    list_models,
    stream_request,
)
from dlengine.bench.serve_metrics import parse_goodput, summarize_results
from dlengine.bench.serve_prompts import ServePrompt, VocabularyOnly, as_text, jsonl_prompts, load_bench_tokenizer, random_prompts

DATASETS = ("random", "jsonl")
API_KEY_ENV = ("OPENAI_API_KEY", "DLENGINE_API_KEY")
NO_TEXT = "the stream ended without any generated text"


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model of GET /v1/models
    endpoint: str = "completions"  # "completions" (/v1/completions) or "chat" (/v1/chat/completions)
    api_key: str | None = None  # None: $OPENAI_API_KEY, else $DLENGINE_API_KEY
    tokenizer: str | None = None  # a preset or HF folder: token-id prompts and exact input lengths
    dataset: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    prefix_len: int = 0
    request_rate: float = math.inf  # requests/s of the Poisson arrivals; inf: all at once
    max_concurrency: int | None = None  # most requests in flight; None: no cap
    temperature: float = 0.0
    ignore_eos: bool = False  # sends "ignore_eos": true (vLLM / SGLang / dlengine extension)
    seed: int = 0
    goodput: str | None = None  # SLOs in ms, "ttft:500,tpot:50"
    timeout: float = 600.0  # seconds one request may take, end to end
    progress: bool = True
    json_path: str | None = None

    def validate(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise BenchError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.endpoint not in ENDPOINTS:
            raise BenchError(f"unknown endpoint {self.endpoint!r}; choose one of {sorted(ENDPOINTS)}")
        if self.dataset not in DATASETS:
            raise BenchError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}")
        if self.dataset == "jsonl" and not self.dataset_path:
            raise BenchError("dataset 'jsonl' needs a dataset_path (--dataset-path FILE.jsonl)")
        if self.dataset == "random" and self.dataset_path:
            raise BenchError("dataset_path is only read with dataset 'jsonl' (--dataset jsonl)")
        for name in ("num_prompts", "input_len", "output_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BenchError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.prefix_len, int) or self.prefix_len < 0:
            raise BenchError(f"prefix_len must be an integer >= 0, got {self.prefix_len!r}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise BenchError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if not self.request_rate > 0:
            raise BenchError(f"request_rate must be > 0 (inf: all at once), got {self.request_rate}")
        if self.max_concurrency is not None and (not isinstance(self.max_concurrency, int) or self.max_concurrency < 1):
            raise BenchError(f"max_concurrency must be a positive integer, got {self.max_concurrency!r}")
        if not self.timeout > 0:
            raise BenchError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.temperature < 0:
            raise BenchError(f"temperature must be >= 0, got {self.temperature}")
        parse_goodput(self.goodput)

    def resolved_api_key(self) -> str | None:
        return self.api_key or next((os.environ[v] for v in API_KEY_ENV if os.environ.get(v)), None)


def arrival_offsets(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times (seconds after the start) of a Poisson process of `request_rate` per second:
    the first request at 0, then exponential gaps of mean 1/rate. All zeros for rate = inf."""
    if num_requests < 1:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_requests - 1)
    return [0.0] + np.cumsum(gaps).tolist()


class _Collector:
    """The results gathered so far, outside the event loop, so Ctrl-C cannot lose them."""

    def __init__(self) -> None:
        self.results: list[RequestResult] = []
        self.start: float | None = None
        self.stop: float | None = None
        self.interrupted = False
        self.notes: list[str] = []
        self.model: str | None = None
        self.prompt_kind: str | None = None


def run_serve_bench(config: ServeBenchConfig | Any = None, **overrides: Any) -> dict[str, Any]:
    """Run the benchmark; returns the summary (serve_metrics.summarize_results keys), the
    settings, and per-request results under "requests". Bad settings raise BenchError; so does
    a server that does not answer the probe request."""
    cfg = coerce_config(ServeBenchConfig, config, **overrides)
    cfg.validate()
    slos = parse_goodput(cfg.goodput)
    tokenizer = load_bench_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    if cfg.dataset == "random":
        prompts, kind = random_prompts(cfg.num_prompts, cfg.input_len, cfg.output_len, range_ratio=cfg.range_ratio,
                                       prefix_len=cfg.prefix_len, seed=cfg.seed, tokenizer=tokenizer)
    else:
        prompts, kind = jsonl_prompts(cfg.dataset_path, cfg.num_prompts, cfg.output_len, tokenizer)
    if cfg.endpoint == "chat" and not all(isinstance(p.prompt, str) for p in prompts):
        prompts, kind = as_text(prompts, tokenizer, "the chat endpoint takes text"), "tokenizer text"
    offsets = arrival_offsets(len(prompts), cfg.request_rate, cfg.seed)
    box = _Collector()
    box.prompt_kind = kind
    try:
        asyncio.run(_run(cfg, prompts, offsets, tokenizer, box))
    except KeyboardInterrupt:  # Python < 3.11, or a second Ctrl-C: what ended is in `box`
        box.interrupted = True
    if box.start is None:
        raise KeyboardInterrupt  # interrupted before the clock started: nothing to report
    stop = box.stop if box.stop is not None else time.perf_counter()
    if not box.interrupted:
        ends = [r.end_time for r in box.results if r.end_time is not None]
        stop = max(ends, default=stop)
    result = {
        **_settings(cfg, box),
        **summarize_results(box.results, stop - box.start, slos),
        "interrupted": box.interrupted,
        "notes": box.notes,
        "requests": [r.as_dict() for r in sorted(box.results, key=lambda r: r.index)],
    }
    if cfg.json_path:
        write_json(result, cfg.json_path)
    return result


def _settings(cfg: ServeBenchConfig, box: _Collector) -> dict[str, Any]:
    settings = dataclasses.asdict(cfg)
    settings["api_key"] = "(set)" if cfg.resolved_api_key() else None  # never written out
    rate = "inf" if math.isinf(cfg.request_rate) else cfg.request_rate  # JSON has no infinity
    settings["request_rate"] = rate
    return {"base_url": cfg.base_url, "endpoint": cfg.endpoint, "model": box.model, "dataset": cfg.dataset,
            "prompt_kind": box.prompt_kind, "request_rate": rate, "max_concurrency": cfg.max_concurrency,
            "config": settings}


async def _run(cfg: ServeBenchConfig, prompts: list[ServePrompt], offsets: Sequence[float], tokenizer,
               box: _Collector) -> None:
    httpx = import_httpx()
    headers = auth_headers(cfg.resolved_api_key())
    # no pool cap of httpx's own (100 by default) beyond the benchmark's: it would hide queueing
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    url = cfg.base_url.rstrip("/") + ENDPOINTS[cfg.endpoint]
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(cfg.timeout)) as client:
        model = cfg.model
        if model is None:
            models = await list_models(client, cfg.base_url, headers)
            if not models:
                raise BenchError(f"{cfg.base_url}/v1/models lists no model; give --model")
            model = models[0]
        box.model = model
        prompts[:] = await _probe(client, url, cfg, model, prompts, tokenizer, headers, box)

        def payload(p: ServePrompt) -> dict[str, Any]:
            return build_payload(cfg.endpoint, model, p.prompt, p.output_len, temperature=cfg.temperature,
                                 ignore_eos=cfg.ignore_eos, extra=_extra_fields(tokenizer))

        await _send_all(client, url, cfg, prompts, offsets, payload, headers, box)


def _extra_fields(tokenizer) -> dict[str, Any] | None:
    """A server without a tokenizer streams tokens with empty text: ask for their ids (vLLM's
    `return_token_ids`, which ours honours too) so TTFT and ITL can still be timed."""
    return {"return_token_ids": True} if isinstance(tokenizer, VocabularyOnly) else None


async def _probe(client, url: str, cfg: ServeBenchConfig, model: str, prompts: list[ServePrompt], tokenizer,
                 headers: dict[str, str], box: _Collector) -> list[ServePrompt]:
    """One short request off the clock (it also warms the server up). A server that refuses a
    token-id prompt (HTTP 4xx) gets text prompts instead."""
    async def probe(p: ServePrompt) -> RequestResult:
        body = build_payload(cfg.endpoint, model, p.prompt, 2, temperature=cfg.temperature, ignore_eos=cfg.ignore_eos,
                             extra=_extra_fields(tokenizer))
        return await stream_request(client, url, body, index=-1, timeout_s=cfg.timeout, headers=headers)

    r = await probe(prompts[0])
    if not (r.success or r.error == NO_TEXT) and not isinstance(prompts[0].prompt, str) \
            and (r.error or "").startswith("HTTP 4"):
        prompts = as_text(prompts, tokenizer, f"the server refused a token-id prompt ({r.error})")
        box.prompt_kind = "tokenizer text"
        box.notes.append(f"the server refused token-id prompts ({r.error}); sent text decoded with the tokenizer")
        r = await probe(prompts[0])
    if not (r.success or r.error == NO_TEXT):
        raise BenchError(f"the probe request to {url} failed: {r.error}")
    return prompts


async def _send_all(client, url: str, cfg: ServeBenchConfig, prompts: list[ServePrompt], offsets: Sequence[float],
                    payload, headers: dict[str, str], box: _Collector) -> None:
    from tqdm.auto import tqdm

    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = tqdm(total=len(prompts), unit="req", disable=not cfg.progress, desc="bench serve")

    async def one(i: int, p: ServePrompt) -> None:
        delay = box.start + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is None:
            r = await stream_request(client, url, payload(p), index=i, timeout_s=cfg.timeout, headers=headers,
                                     prompt_tokens=p.prompt_len)
        else:
            async with slots:
                r = await stream_request(client, url, payload(p), index=i, timeout_s=cfg.timeout, headers=headers,
                                         prompt_tokens=p.prompt_len)
        box.results.append(r)
        bar.update(1)

    box.start = time.perf_counter()
    tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
    try:
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:  # Ctrl-C (Python >= 3.11 cancels the main task)
        box.stop = time.perf_counter()
        box.interrupted = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        bar.close()
