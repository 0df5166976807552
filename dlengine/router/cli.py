"""`dlengine router`: flags -> RouterConfig -> a running uvicorn server."""

from __future__ import annotations

import argparse
import logging
import os

from dlengine.config import ConfigError
from dlengine.router.config import POLICIES

API_KEY_ENV = "DLENGINE_API_KEY"
BACKEND_API_KEY_ENV = "DLENGINE_BACKEND_API_KEY"


def add_router_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="(default: %(default)s)")
    b = p.add_argument_group("backends")
    for role in ("hybrid", "prefill", "decode"):
        b.add_argument(f"--{role}", action="append", default=[], metavar="URL",
                       help=f"a {role} server's base URL, e.g. http://127.0.0.1:8000 (repeatable)")
    b.add_argument("--encode", action="append", default=[], metavar="URL",
                   help="an encoder server's base URL (`dlengine serve --mode encode`, repeatable): chat requests "
                        "with images or videos are encoded there first, then prefilled (EPD, docs/vision.md)")
    b.add_argument("--ctrl-address", default=None, metavar="HOST:PORT",
                   help="discover `dlengine serve --ctrl-address` servers from this dlslime-ctrl")
    b.add_argument("--ctrl-scope", default=None, metavar="SCOPE", help="dlslime-ctrl scope (default: none)")
    r = p.add_argument_group("routing")
    r.add_argument("--policy", choices=POLICIES, default="round-robin", help="(default: %(default)s)")
    r.add_argument("--prefix-chars", type=int, default=256, metavar="N",
                   help="prefix-affinity: prompt characters that pick the backend (default: %(default)s)")
    r.add_argument("--health-interval", type=float, default=1.0, metavar="S",
                   help="seconds between health checks / discovery polls (default: %(default)s)")
    r.add_argument("--stream-timeout", type=float, default=30.0, metavar="S",
                   help="longest silence from a backend mid-stream before the client gets an error "
                        "(default: %(default)s)")
    r.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="longest wait for a whole non-streamed answer (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV} when set)")
    p.add_argument("--backend-api-key", default=None, metavar="KEY",
                   help="Bearer token the router sends to backends on /v1 routes (servers started with --api-key; "
                        f"default: ${BACKEND_API_KEY_ENV} when set, else the router's own --api-key)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from dlengine.router import RouterConfig, create_router_app

    if not (args.hybrid or args.prefill or args.decode or args.ctrl_address):
        raise ConfigError("give backends: --hybrid / --prefill / --decode URL, or --ctrl-address to discover them")
    if args.port < 0:
        raise ConfigError(f"--port must be positive, got {args.port}")
    config = RouterConfig(hybrid=args.hybrid, prefill=args.prefill, decode=args.decode, encode=args.encode,
                          policy=args.policy,
                          ctrl_address=args.ctrl_address, ctrl_scope=args.ctrl_scope,
                          discovery_interval_s=args.health_interval, health_interval_s=args.health_interval,
                          stream_timeout_s=args.stream_timeout, request_timeout_s=args.request_timeout,
                          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, prefix_chars=args.prefix_chars,
                          backend_api_key=args.backend_api_key or os.environ.get(BACKEND_API_KEY_ENV) or None)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_router_app(config), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0
