"""The command line: serve, demo, fake-upstream, check-config, keys."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from relay import serve
from relay.codes_cli import add_codes_parser
from relay.config import ConfigError, load_config
from relay.policy import add_policy_options
from relay.store.connect import CLIENTS, DEFAULT_CLIENT, locate_store
from relay.store.embedded import StoreUnreachable
from relay.supervise import exit_without_store

log = logging.getLogger("relay")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file, os.environ)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    endpoints = sum(len(u.keys) for u in config.upstreams)
    print(f"ok: {args.file}: {len(config.upstreams)} upstream(s), {endpoints} endpoint(s), "
          f"{len(config.pricing)} priced model(s)")
    return 0


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mongodb-uri", default=os.environ.get("MONGODB_URI"),
                   help="a MongoDB (replica set in production); default: the embedded store in --data-dir")
    p.add_argument("--data-dir", default=os.environ.get("RELAY_DATA_DIR", "./relay-data"),
                   help="where the embedded store keeps its files (default ./relay-data)")
    p.add_argument("--mongo-client", choices=CLIENTS, default=os.environ.get("RELAY_MONGO_CLIENT", DEFAULT_CLIENT),
                   help="driver: PyMongo's async client (default) or motor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="OpenAI-API relay and multi-upstream load balancer")
    parser.add_argument("--log-level", default=os.environ.get("RELAY_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser("serve", help="run relay")
    serve_p.add_argument("--config", help="upstreams.yaml (default: the embedded example)")
    serve_p.add_argument("--port", type=int, default=8080)
    serve_p.add_argument("--host", default="127.0.0.1")
    serve_p.add_argument("--certfile", help="serve TLS directly with this certificate chain")
    serve_p.add_argument("--keyfile", help="private key for --certfile")
    serve_p.add_argument("--trusted-proxy", action="append", default=[],
                       help="address or CIDR of a reverse proxy whose X-Forwarded-* headers are believed")

    serve_p.add_argument("--workers", type=int, default=1,
                       help="processes sharing the port (one per core); metrics are aggregated across them")
    serve_p.add_argument("--client-timeout", type=float, default=60.0,
                       help="seconds a client may take to send its headers, or stay idle between requests")
    serve_p.add_argument("--body-timeout", type=float, default=120.0, help="seconds a client may take to send a body")
    serve_p.add_argument("--drain-timeout", type=float, default=30.0,
                       help="on SIGTERM, how long requests in flight may take to finish (default 30 s)")
    serve_p.add_argument("--metrics-port", type=int, default=0,
                       help="serve /metrics on this port only (default: on the main port)")
    _store_options(serve_p)

    fake = sub.add_parser("fake-upstream", help="run an OpenAI-compatible fake upstream")
    fake.add_argument("--port", type=int, default=9000)
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--keys", help="comma-separated keys to accept (default: any)")

    demo = sub.add_parser("demo", help="fake upstream + relay + a demo key, in one command")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--upstream-port", type=int, default=9000)
    demo.add_argument("--quota", type=int, default=100_000, help="quota units of the demo key")
    _store_options(demo)

    keys = sub.add_parser("keys", help="create, list, show, top up, disable and enable relay keys")
    key_cmds = keys.add_subparsers(dest="keys_command", required=True)
    create = key_cmds.add_parser("create", help="create a key (printed once)")
    create.add_argument("--quota", type=int, required=True)
    create.add_argument("--note", default="")
    add_policy_options(create)
    update = key_cmds.add_parser("update", help="change a key's policy (models, expiry, limits, addresses)")
    update.add_argument("key")
    add_policy_options(update)
    key_cmds.add_parser("list", help="all keys")
    for name in ("show", "disable", "enable"):
        p = key_cmds.add_parser(name, help=f"{name} a key by the key or its prefix")
        p.add_argument("key")
    topup = key_cmds.add_parser("topup", help="add quota to a key")
    topup.add_argument("key")
    topup.add_argument("quota", type=int)
    for p in key_cmds.choices.values():
        _store_options(p)

    add_codes_parser(sub, _store_options)

    check = sub.add_parser("check-config", help="validate an upstreams.yaml")
    check.add_argument("file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "serve" and bool(args.certfile) != bool(args.keyfile):
        print("--certfile and --keyfile go together", file=sys.stderr)
        return 2
    try:
        if args.command == "fake-upstream":
            return asyncio.run(serve.fake_upstream(args))
        if args.command == "serve":
            return serve.serve_command(args)
        from relay.codes_cli import run_codes_command
        from relay.keys_cli import run_keys_command
        runner = {"demo": serve.demo, "keys": run_keys_command, "codes": run_codes_command}[args.command]
        # The embedded store starts here, on the main thread: it is tied to this thread's life.
        location = locate_store(args.mongodb_uri, args.data_dir,
                                on_give_up=exit_without_store if args.command == "demo" else None)
        try:
            return asyncio.run(runner(args, location.uri))
        finally:
            location.stop()
    except ConfigError as exc:
        print(f"invalid config: {exc}", file=sys.stderr)
        return 1
    except StoreUnreachable as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1

