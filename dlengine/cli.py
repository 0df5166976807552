"""The `dlengine` command line: argument parsing only; the work lives in dlengine.bench.

    dlengine bench                          # = dlengine bench throughput, on the tiny preset
    dlengine bench throughput --model /models/Qwen3-8B --num-prompts 256 --json out.json

    dlengine bench latency --model /models/Qwen3-8B --batch-size 1 --input-len 512 --output-len 256

    dlengine bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 8

    dlengine serve /models/Qwen3-8B --port 8000 --served-model-name qwen3-8b   # OpenAI-compatible HTTP
    dlengine router --prefill http://p:8101 --decode http://d:8102 --hybrid http://h:8000

`dlengine bench` without a benchmark name runs `throughput`. The offline benchmarks are
subcommands of `bench` that share the engine options (`_engine_options`), the output options and
the peak options (the MBU/MFU denominators); `bench serve` loads a running server over HTTP and
takes its own options (`_bench_serve_options`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dlengine import __version__
from dlengine.bench.common import BenchError, EngineArgs
from dlengine.bench.compare import COMPARE_FRAMEWORKS
from dlengine.bench.latency import LatencyConfig
from dlengine.bench.serve_bench import ServeBenchConfig
from dlengine.bench.throughput import DATASETS, ThroughputConfig
from dlengine.builder import LOAD_FORMATS
from dlengine.config import ConfigError
from dlengine.kernels.selection import known_attention_backends
from dlengine.parallel.ep import PLACEMENTS, dispatch_backends
from dlengine.parallel.launcher import WorkerError
from dlengine.sampling_params import InvalidRequestError

DEFAULT_BENCH = "throughput"
# defaults come from the config dataclasses, never repeated here
_E, _D, _L, _S = EngineArgs, ThroughputConfig, LatencyConfig, ServeBenchConfig


def _engine_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine")
    g.add_argument("--model", metavar="NAME_OR_PATH", default=_E.model,
                   help="a tiny preset (tiny-qwen3, tiny-qwen3-moe, tiny-deepseek-v3, ...), a config-only preset "
                        "for --load-format dummy (qwen3-8b, qwen3-30b-a3b, deepseek-v3, kimi-k2, ...) or a "
                        "Hugging Face checkpoint folder (default: %(default)s)")
    g.add_argument("--load-format", choices=LOAD_FORMATS, default=_E.load_format,
                   help="'dummy': random weights of the real size, no safetensors needed (default: %(default)s)")
    g.add_argument("--num-layers", type=int, metavar="N", default=_E.num_layers,
                   help="build only the first N decoder layers (real-size layers with few of them, e.g. "
                        "--model deepseek-v3 --load-format dummy --num-layers 4; default: all)")
    g.add_argument("--dtype", default=_E.dtype, help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                   "the checkpoint's dtype on GPU)")
    g.add_argument("--device", default=_E.device, help="cpu | cuda | cuda:N (default: cuda when available)")
    g.add_argument("--attention-backend", metavar="NAME", default=_E.attention_backend,
                   help=f"auto or one of {known_attention_backends()} (default: %(default)s)")
    g.add_argument("--mla-decode", choices=["auto", "triton", "gluon", "flashinfer"], default=_E.mla_decode,
                   help="MLA decode kernel on the triton backend (DeepSeek-V3, Kimi-K2; default: %(default)s = "
                        "gluon on Hopper, else flashinfer when it imports, else triton)")
    g.add_argument("--prefill-attention", choices=["auto", "triton", "hopper"], default=_E.prefill_attention,
                   help="GQA prefill / extend kernel on the triton backend (default: %(default)s = the portable "
                        "Triton kernel; hopper: sm_90, the step's keys read by TMA; docs/performance.md)")
    g.add_argument("--seed", type=int, metavar="N", default=_E.seed,
                   help="seeds the workload and the sampler (default: %(default)s)")
    g.add_argument("--block-size", type=int, metavar="N", default=_E.block_size,
                   help="KV cache tokens per block (default: 16)")
    g.add_argument("--kv-cache-dtype", metavar="DTYPE", default=_E.kv_cache_dtype,
                   help="KV cache storage: auto (the model dtype) or fp8_e4m3 (alias fp8: float8 with a scale per "
                        "layer and tensor, about twice the tokens; docs/fp8_kv.md) (default: %(default)s)")
    g.add_argument("--num-blocks", type=int, metavar="N", default=_E.num_blocks,
                   help="KV cache blocks (default: sized from memory)")
    g.add_argument("--memory-utilization", type=float, metavar="F", default=_E.memory_utilization,
                   help="fraction of GPU memory the engine may take (default: 0.9)")
    g.add_argument("--max-num-seqs", type=int, metavar="N", default=_E.max_num_seqs,
                   help="most sequences in one step (default: the engine's, 256)")
    g.add_argument("--max-num-batched-tokens", type=int, metavar="N", default=_E.max_num_batched_tokens,
                   help="token budget of one step (default: the engine's, 8192)")
    g.add_argument("--max-model-len", type=int, metavar="N", default=_E.max_model_len,
                   help="context limit, prompt + output (default: the model's max_position_embeddings)")
    g.add_argument("--speculative", choices=["mtp", "ngram"], default=_E.speculative,
                   help="speculative decoding: 'mtp' (the checkpoint's multi-token-prediction layer) or 'ngram' "
                        "prompt lookup (default: off)")
    g.add_argument("--num-speculative-tokens", type=int, metavar="K", default=_E.num_speculative_tokens,
                   help="drafts per step with --speculative (default: %(default)s)")
    g.add_argument("--threads", type=int, metavar="N", default=_E.threads,
                   help="torch threads on CPU (default: OMP_NUM_THREADS when set, else the physical cores less "
                        "one spare and less those other processes keep busy, at least 1; the choice is printed)")
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=_E.prefix_caching,
                   help="turn the prefix cache off")
    _parallel_options(p)
    return p


def _parallel_options(p: argparse.ArgumentParser) -> None:
    """EngineBuilder.parallel(...)'s options, under its names and values (docs/parallel.md). More
    than one rank (tp x attention_dp) spawns one worker process per rank; this process is the
    front. Bad combinations are the builder's ConfigErrors."""
    g = p.add_argument_group("parallel (docs/parallel.md)")
    g.add_argument("--tp", "--tensor-parallel-size", "-tp", dest="tp", type=int, metavar="N", default=_E.tp,
                   help="tensor-parallel ranks: each holds 1/N of every layer (default: %(default)s)")
    g.add_argument("--attention-dp", "--attention_dp", dest="attention_dp", type=int, metavar="N",
                   default=_E.attention_dp,
                   help="attention data-parallel ranks, each with its own scheduler and KV cache; requests go to "
                        "the least-loaded one (with --tp 1) (default: %(default)s)")
    g.add_argument("--ffn-ep", "--ffn_ep", dest="ffn_ep", type=int, metavar="N", default=_E.ffn_ep,
                   help="MoE expert-parallel ranks: 1 (experts replicated, or split by --tp) or equal to "
                        "--attention-dp (wide EP: experts partitioned, tokens sent by all-to-all) "
                        "(default: %(default)s)")
    g.add_argument("--expert-placement", choices=sorted(PLACEMENTS), default=_E.expert_placement,
                   help="with --ffn-ep > 1: which rank holds which expert (default: %(default)s)")
    g.add_argument("--dispatch-backend", choices=["auto", *dispatch_backends()], default=_E.dispatch_backend,
                   help="with --ffn-ep > 1: the MoE token dispatch/combine (default: %(default)s)")


def _bench_engine_options() -> argparse.ArgumentParser:
    """Engine options for benchmarks only (`dlengine serve` does not take them)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine (benchmarks only)")
    g.add_argument("--spec-forced-acceptance", type=float, metavar="P", default=_E.spec_forced_acceptance,
                   help="with --speculative: keep each draft with probability P in [0, 1] instead of when it "
                        "matches the model (stopping at the first rejection), to time speculative decoding at a "
                        "fixed acceptance, e.g. on dummy weights; the outputs are then not the model's and the "
                        "results say so (docs/speculative.md) (default: off, real acceptance)")
    return p


def _output_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--json", dest="json_path", metavar="PATH", default=_D.json_path,
                   help="also write every result (summary, config, per-request timings) to this JSON file")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=_D.progress,
                   help="no progress bar")
    return p


def _peak_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("MBU / MFU peaks (measured on the device unless given)")
    g.add_argument("--peak-bandwidth-gbps", type=float, metavar="GB/S", default=_D.peak_bandwidth_gbps,
                   help="memory bandwidth MBU divides by; skips measuring it (default: a timed 1 GiB "
                        "device-to-device copy, read + write bytes)")
    g.add_argument("--peak-tflops", type=float, metavar="TFLOP/S", default=_D.peak_tflops,
                   help="compute peak MFU divides by; skips measuring it (default: a timed 8192^3 bf16 matmul)")
    return p


def _throughput_workload() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default=_D.dataset,
                   help="random token ids, or a JSONL file (default: %(default)s)")
    g.add_argument("--dataset-path", metavar="FILE", default=_D.dataset_path,
                   help='JSONL with one {"prompt": "text" | [ids], "output_len": N} per line (output_len optional)')
    g.add_argument("--num-prompts", type=int, metavar="N", default=_D.num_prompts, help="(default: %(default)s)")
    g.add_argument("--input-len", type=int, metavar="N", default=_D.input_len,
                   help="random dataset: prompt tokens (default: %(default)s)")
    g.add_argument("--output-len", type=int, metavar="N", default=_D.output_len,
                   help="tokens to generate per request; jsonl: when a line has no output_len (default: %(default)s)")
    g.add_argument("--range-ratio", type=float, metavar="R", default=_D.range_ratio,
                   help="draw lengths uniformly from [len*(1-R), len*(1+R)] (default: %(default)s)")
    g.add_argument("--prefix-len", type=int, metavar="N", default=_D.prefix_len,
                   help="random dataset: a random prefix of N tokens shared by all prompts (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=_D.temperature, help="(default: %(default)s, greedy)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=_D.ignore_eos,
                   help="generate exactly the output length, ignoring end-of-sequence tokens (default: on)")
    g.add_argument("--num-warmup", type=int, metavar="N", default=_D.num_warmup,
                   help="short requests run before the clock starts (default: %(default)s)")
    c = p.add_argument_group("comparison")
    c.add_argument("--compare", choices=COMPARE_FRAMEWORKS, default=_D.compare,
                   help="afterwards, run the same prompts through transformers' continuous batching "
                        "(model.generate_batch) in this process and report ours/theirs output tokens/s")
    c.add_argument("--compare-num-prompts", type=int, metavar="N", default=_D.compare_num_prompts,
                   help="requests the comparison runs: the first N (default: min(num_prompts, 64))")
    c.add_argument("--compare-attn-implementation", metavar="NAME", default=_D.compare_attn_implementation,
                   help="transformers attn_implementation (default: 'paged|sdpa', then 'sdpa', on CUDA; "
                        "'eager' on CPU)")
    return p


def _latency_workload() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("workload")
    g.add_argument("--batch-size", type=int, metavar="N", default=_L.batch_size,
                   help="requests run together (default: %(default)s)")
    g.add_argument("--input-len", type=int, metavar="N", default=_L.input_len,
                   help="prompt tokens per request, random ids (default: %(default)s)")
    g.add_argument("--output-len", type=int, metavar="N", default=_L.output_len,
                   help="tokens generated per request, greedy, ignoring eos (default: %(default)s)")
    g.add_argument("--num-iters", type=int, metavar="N", default=_L.num_iters,
                   help="measured iterations (default: %(default)s)")
    g.add_argument("--num-warmup-iters", type=int, metavar="N", default=_L.num_warmup_iters,
                   help="iterations run first, off the record (default: %(default)s)")
    g.add_argument("--synthetic-context", action="store_true", default=_L.synthetic_context,
                   help="decode only: count every prompt as computed without running it (its KV is synthetic, "
                        "the tokens meaningless, the decode cost real); for decode step time at long contexts. "
                        "Prefill is not measured; prefix caching is off")
    return p


def _add_throughput(sub, common) -> None:
    p = sub.add_parser(
        "throughput", parents=[_throughput_workload(), *common],
        help="offline throughput: queue every request at once (the default)",
        description="Offline throughput: queue the whole workload at once, step the engine until it drains, and "
                    "report requests/s, tokens/s, TTFT, TPOT, preemptions and prefix-cache hits. See docs/bench.md.",
    )
    p.set_defaults(handler=_run_throughput)


def _add_latency(sub, common) -> None:
    p = sub.add_parser(
        "latency", parents=[_latency_workload(), *common],
        help="latency of one fixed batch: prefill, per-token decode, end to end, MBU and MFU",
        description="Latency: run a fixed batch of random prompts to completion a few times and report the "
                    "prefill time, the per-token decode time (mean, p50, p90), end-to-end time, and decode MBU / "
                    "prefill MFU estimates against measured peaks. See docs/bench.md.",
    )
    p.set_defaults(handler=_run_latency)


def _run_latency(args: argparse.Namespace) -> int:
    from dlengine.bench.latency import run_latency
    from dlengine.bench.metrics import format_latency_report

    result = run_latency(args)
    print(format_latency_report(result))
    if args.json_path:
        print(f"results written to {args.json_path}")
    return 0


def _run_throughput(args: argparse.Namespace) -> int:
    from dlengine.bench.metrics import format_report
    from dlengine.bench.throughput import run_throughput

    result = run_throughput(args)
    print(format_report(result))
    if args.json_path:
        print(f"results written to {args.json_path}")
    return 0


def _bench_serve_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    s = p.add_argument_group("server")
    s.add_argument("--base-url", default=_S.base_url, help="the server's address (default: %(default)s)")
    s.add_argument("--endpoint", choices=["completions", "chat"], default=_S.endpoint,
                   help="/v1/completions or /v1/chat/completions (default: %(default)s)")
    s.add_argument("--model", default=_S.model, help="model name sent in requests (default: the first of GET /v1/models)")
    s.add_argument("--api-key", default=_S.api_key,
                   help="bearer token (default: $OPENAI_API_KEY, else $DLENGINE_API_KEY, else none)")
    s.add_argument("--tokenizer", metavar="NAME_OR_PATH", default=_S.tokenizer,
                   help="a preset or tokenizer folder: random prompts become token ids (completions) or text "
                        "decoded from them (chat) of exact lengths; without it, random words")
    s.add_argument("--timeout", type=float, metavar="S", default=_S.timeout,
                   help="seconds one request may take end to end before it counts as failed (default: %(default)s)")
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=["random", "jsonl"], default=_S.dataset, help="(default: %(default)s)")
    g.add_argument("--dataset-path", metavar="FILE", default=_S.dataset_path,
                   help='JSONL with one {"prompt": "text" | [ids], "output_len": N} per line (output_len optional)')
    g.add_argument("--num-prompts", type=int, metavar="N", default=_S.num_prompts, help="(default: %(default)s)")
    g.add_argument("--input-len", type=int, metavar="N", default=_S.input_len,
                   help="random dataset: prompt tokens (words without --tokenizer) (default: %(default)s)")
    g.add_argument("--output-len", type=int, metavar="N", default=_S.output_len,
                   help="max_tokens of each request; jsonl: when a line has none (default: %(default)s)")
    g.add_argument("--range-ratio", type=float, metavar="R", default=_S.range_ratio,
                   help="draw lengths uniformly from [len*(1-R), len*(1+R)] (default: %(default)s)")
    g.add_argument("--prefix-len", type=int, metavar="N", default=_S.prefix_len,
                   help="random dataset: a random prefix of N tokens shared by all prompts (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=_S.temperature, help="(default: %(default)s, greedy)")
    g.add_argument("--ignore-eos", action="store_true", default=_S.ignore_eos,
                   help='send "ignore_eos": true (vLLM, SGLang and dlengine honour it) so every request '
                        "generates --output-len tokens")
    g.add_argument("--seed", type=int, metavar="N", default=_S.seed,
                   help="seeds the prompts and the arrival times (default: %(default)s)")
    t = p.add_argument_group("load")
    t.add_argument("--request-rate", type=float, metavar="R", default=_S.request_rate,
                   help="requests per second, Poisson arrivals; inf sends every request at once (default: inf)")
    t.add_argument("--max-concurrency", type=int, metavar="N", default=_S.max_concurrency,
                   help="most requests in flight at once (default: no cap)")
    t.add_argument("--goodput", metavar="SLOS", default=_S.goodput,
                   help='SLOs in ms, e.g. "ttft:500,tpot:50" (ttft, tpot, e2el): goodput counts the requests '
                        "meeting all of them")
    o = p.add_argument_group("output")
    o.add_argument("--json", dest="json_path", metavar="PATH", default=_S.json_path,
                   help="also write the summary, settings and per-request results to this JSON file")
    o.add_argument("--no-progress", dest="progress", action="store_false", default=_S.progress,
                   help="no progress bar")
    return p


def _add_bench_serve(sub, common) -> None:  # noqa: ARG001 -- an online benchmark builds no engine
    p = sub.add_parser(
        "serve", parents=[_bench_serve_options()],
        help="online: load an OpenAI-compatible server over HTTP (ours, vLLM, ...)",
        description="Online serving benchmark: stream requests to an OpenAI-compatible server at a Poisson "
                    "request rate and/or a concurrency cap, and report requests/s, tokens/s, TTFT, TPOT, ITL, "
                    "E2E percentiles, goodput under SLOs, failures and the concurrency reached. See docs/bench.md.",
    )
    p.set_defaults(handler=_run_bench_serve)


def _run_bench_serve(args: argparse.Namespace) -> int:
    from dlengine.bench.serve_bench import run_serve_bench
    from dlengine.bench.serve_metrics import format_serve_report

    result = run_serve_bench(args)
    print(format_serve_report(result))
    if args.json_path:
        print(f"results written to {args.json_path}")
    return 130 if result["interrupted"] else 0


BENCHMARKS = {"throughput": _add_throughput, "latency": _add_latency, "serve": _add_bench_serve}


def _missing_extra(sub, name: str, error: ImportError) -> None:
    """`dlengine NAME` without the serve extra installed: the command exists and says what to install."""
    p = sub.add_parser(name, help=f"(needs pip install 'dlengine[serve]')", add_help=True)
    p.add_argument("args", nargs=argparse.REMAINDER)

    def fail(args: argparse.Namespace) -> int:
        raise ConfigError(f"dlengine {name} needs the serve extra (pip install 'dlengine[serve]'): {error}")

    p.set_defaults(handler=fail)


def _add_serve(sub) -> None:
    try:
        from dlengine.serve.cli import add_serve_options
    except ImportError as e:  # fastapi / uvicorn / pydantic not installed: the bench still works
        return _missing_extra(sub, "serve", e)

    p = sub.add_parser(
        "serve", parents=[_engine_options()],
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve an engine over HTTP: /v1/completions, /v1/chat/completions (streaming or not, "
                    "tool calls), /v1/models, /health, /metrics. Engine flags are the bench's. See docs/serving.md.",
    )
    add_serve_options(p)
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        import dlengine.serve  # noqa: F401  (fastapi, pydantic, prometheus-client)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"dlengine serve needs the serve extra (pip install 'dlengine[serve]'): {e}") from None
    from dlengine.serve.cli import run_serve

    return run_serve(args)


def _add_router(sub) -> None:
    try:
        from dlengine.router.cli import add_router_options
    except ImportError as e:
        return _missing_extra(sub, "router", e)

    p = sub.add_parser(
        "router", help="route OpenAI requests over hybrid, prefill and decode servers",
        description="An OpenAI-compatible router in front of `dlengine serve` servers: round-robin, least-load or "
                    "prefix-affinity; prefill -> KV transfer -> decode; backends by flag or discovered through "
                    "dlslime-ctrl. See docs/serving.md.",
    )
    add_router_options(p)
    p.set_defaults(handler=_run_router)


def _run_router(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"dlengine router needs the serve extra (pip install 'dlengine[serve]'): {e}") from None
    from dlengine.router.cli import run_router

    return run_router(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlengine", description="dlengine: a library-first LLM inference SDK")
    parser.add_argument("--version", action="version", version=f"dlengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser(
        "bench", help="benchmark an engine",
        description=f"Benchmark an engine. Without a benchmark name, runs '{DEFAULT_BENCH}'.",
    )
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    # every offline benchmark takes these
    common = [_engine_options(), _bench_engine_options(), _output_options(), _peak_options()]
    for add in BENCHMARKS.values():
        add(bench_sub, common)
    _add_serve(sub)
    _add_router(sub)
    return parser


def worker_error_summary(error: WorkerError) -> str:
    """One line for a failed rank: its first line ("rank R failed: Type: message"); the traceback
    is for `--log-level debug` users of the library, not for the command line."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else f"rank {error.rank} failed"


def _with_default_bench(argv: list[str]) -> list[str]:
    """`dlengine bench [options]` means `dlengine bench throughput [options]`."""
    if argv and argv[0] == "bench":
        rest = argv[1:]
        if not rest or (rest[0] not in BENCHMARKS and rest[0] not in ("-h", "--help")):
            return ["bench", DEFAULT_BENCH, *rest]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(_with_default_bench(argv))
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    prog = f"dlengine {args.command}"
    try:
        return handler(args)
    except (ConfigError, InvalidRequestError, BenchError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except OSError as e:  # a dataset or --json path that cannot be read or written
        print(f"{prog}: error: {e}", file=sys.stderr)
    except WorkerError as e:  # a parallel engine's rank failed (e.g. a layer that --tp does not divide)
        print(f"{prog}: error: {worker_error_summary(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
