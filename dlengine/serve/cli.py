"""`dlengine serve MODEL`: build an engine from the bench's engine flags and serve it over HTTP.

The parser lives in dlengine/cli.py (argument parsing only); this module turns the parsed
arguments into an engine, a ServeConfig and a running uvicorn server.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dlengine.bench.common import EngineArgs, coerce_config, engine_builder
from dlengine.config import ConfigError

MODES = ("hybrid", "prefill", "decode", "encode")
API_KEY_ENV = "DLENGINE_API_KEY"
PD_SECRET_ENV = "DLENGINE_PD_SECRET"


def add_serve_options(p: argparse.ArgumentParser) -> None:
    """The server's own flags (the engine's come from the bench's engine options)."""
    p.add_argument("model_path", nargs="?", metavar="MODEL",
                   help="a Hugging Face checkpoint folder or a built-in model (same as --model)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    g.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send and /v1/models lists (default: MODEL)")
    g.add_argument("--mode", choices=MODES, default="hybrid",
                   help="engine role: hybrid (prefill and decode here), or prefill / decode for PD "
                        "disaggregation, whose KV moves through DLSlime, or encode: a vision model's encoder alone, "
                        "answering POST /v1/encode with image and video embeddings for prefill servers (EPD, "
                        "docs/vision.md) "
                        "(default: %(default)s)")
    g.add_argument("--transfer-backend", default="dlslime", choices=("dlslime", "cuda_ipc"),
                   help="prefill/decode modes: dlslime (TCP, any hosts) or cuda_ipc (GPU to GPU, both servers on "
                        "one host; the control records still over DLSlime tcp) (default: %(default)s)")
    g.add_argument("--transfer-port", type=int, default=0, metavar="N",
                   help="prefill/decode modes: the KV transfer engine's port (default: a free one)")
    g.add_argument("--transfer-host", default=None, metavar="ADDR",
                   help="prefill/decode modes: the KV transfer engine's address (default: --host)")
    g.add_argument("--pd-secret", default=None, metavar="SECRET",
                   help="prefill/decode/encode modes: the key signing kv_transfer_params and ec_transfer_params, "
                        f"shared by every server of the deployment (default: ${PD_SECRET_ENV}); required in those "
                        "modes, and on a hybrid server that takes ec_transfer_params")
    g.add_argument("--encoder-staging-mib", type=int, default=None, metavar="N",
                   help="vision models: MiB of registered host memory for image and video embeddings in flight: "
                        "an encode server's staging, a prefill/hybrid server's receive region (default: 256)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV} when set)")
    g.add_argument("--max-concurrent-requests", type=int, default=256, metavar="N",
                   help="generation requests in flight at once; more are answered 429 (default: %(default)s)")
    g.add_argument("--max-request-bytes", type=int, default=8 * 2**20, metavar="N",
                   help="largest request body; larger ones are answered 413 (default: %(default)s)")
    g.add_argument("--tool-call-parser", default="auto", choices=("auto", "qwen3", "deepseek_v3"),
                   help="tool-call markup to parse (default: auto, by the checkpoint's architecture)")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="vision models: let chat image_url parts name files under DIR as file:// URLs (default: "
                        "only base64 data URLs; http(s) URLs are never fetched)")
    g.add_argument("--ctrl-address", default=None, metavar="HOST:PORT",
                   help="register with this dlslime-ctrl (role, HTTP address, model) and heartbeat")
    g.add_argument("--ctrl-scope", default=None, metavar="SCOPE", help="dlslime-ctrl scope (default: none)")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def build_engine(args: argparse.Namespace):
    """The engine the flags describe: the bench's builder choices, plus for prefill/decode modes
    the role and its KV transfer engine (--transfer-backend), registered with --ctrl-address."""
    builder = engine_builder(coerce_config(EngineArgs, args))
    if getattr(args, "encoder_staging_mib", None):
        builder.encoder_cache(staging_bytes=args.encoder_staging_mib << 20)
    # a server pulls image embeddings while its stepping thread runs the other requests
    builder.encoder_cache(pull_mode="async")
    if args.mode != "hybrid":
        builder.role(args.mode).transfer(args.transfer_backend, transport="tcp",
                                         host=args.transfer_host or _reachable(args.host), port=args.transfer_port)
        if args.ctrl_address:
            url = args.ctrl_address if "://" in args.ctrl_address else f"http://{args.ctrl_address}"
            builder.control_plane(url, scope=args.ctrl_scope)
    return builder.build()


def run_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from dlengine.serve import ServeConfig, create_app

    if args.model_path:
        args.model = args.model_path
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in ("port", "max_concurrent_requests", "max_request_bytes"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    pd_secret = args.pd_secret or os.environ.get(PD_SECRET_ENV) or None
    if args.mode != "hybrid" and not pd_secret:
        raise ConfigError(f"--mode {args.mode} needs --pd-secret (or ${PD_SECRET_ENV}): the key, shared by the "
                          "deployment's prefill and decode servers, that signs kv_transfer_params")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = build_engine(args)
    print(engine, file=sys.stderr)
    config = ServeConfig(
        served_model_name=args.served_model_name or args.model,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_concurrent_requests=args.max_concurrent_requests, max_body_bytes=args.max_request_bytes,
        tool_call_parser=args.tool_call_parser, mode=args.mode, ctrl_address=args.ctrl_address,
        ctrl_scope=args.ctrl_scope, pd_secret=pd_secret, allowed_local_media_path=args.allowed_local_media_path, public_url=f"http://{_reachable(args.host)}:{args.port}")
    if args.mode == "encode":
        from dlengine.serve.encode import create_encode_app

        app = create_encode_app(engine, config)
    else:
        app = create_app(engine, config)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0


def _reachable(host: str) -> str:
    """The address to advertise for a bind address (0.0.0.0 / :: mean "this host")."""
    if host in ("0.0.0.0", "::", ""):
        import socket

        return socket.gethostbyname(socket.gethostname())
    return host
