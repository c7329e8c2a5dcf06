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
from relay.observability.access_log import LOG_FORMAT
from relay.policy import add_policy_options
from relay.redact import mask_userinfo
from relay.store.connect import CLIENTS, DEFAULT_CLIENT, StoreLocation, locate_store
from relay.store.embedded import StoreUnreachable, holds_store

log = logging.getLogger("relay")

DEFAULT_DATA_DIR = "./relay-data"
MAX_DELAY_MS = 3_600_000


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=LOG_FORMAT)


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file, os.environ)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    for warning in config.warnings():
        print(f"warning: {args.file}: {warning}", file=sys.stderr)
    endpoints = sum(len(u.keys) for u in config.upstreams)
    print(f"ok: {args.file}: {len(config.upstreams)} upstream(s), {endpoints} endpoint(s), "
          f"{len(config.pricing)} priced model(s)")
    return 0


def _store_options(p: argparse.ArgumentParser, top: bool = False) -> None:
    """The store options: before the command (``relay --data-dir D keys list``, with the
    defaults) and after it (``relay keys list --data-dir D``, which wins when both are given)."""
    def default(value: str | None) -> str | None:
        return value if top else argparse.SUPPRESS
    p.add_argument("--mongodb-uri", default=default(os.environ.get("MONGODB_URI")),
                   help="a MongoDB (replica set in production); default: the embedded store in --data-dir")
    p.add_argument("--data-dir", default=default(os.environ.get("RELAY_DATA_DIR", DEFAULT_DATA_DIR)),
                   help=f"where the embedded store keeps its files (RELAY_DATA_DIR; default {DEFAULT_DATA_DIR})")
    p.add_argument("--mongo-client", choices=CLIENTS,
                   default=default(os.environ.get("RELAY_MONGO_CLIENT", DEFAULT_CLIENT)),
                   help="driver: PyMongo's async client (default) or motor")


def _milliseconds(text: str) -> float:
    """A delay given in milliseconds, as seconds."""
    try:
        ms = float(text)
    except ValueError:
        ms = -1.0
    if not 0 <= ms <= MAX_DELAY_MS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds from 0 to {MAX_DELAY_MS}")
    return ms / 1000


def _delay_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--first-byte-ms", type=_milliseconds, default=0.0, metavar="MS", dest="first_byte_delay",
                   help="the fake upstream waits this long before each response starts (default 0)")
    p.add_argument("--chunk-delay-ms", type=_milliseconds, default=0.0, metavar="MS", dest="chunk_delay",
                   help="the fake upstream waits this long between the chunks of a stream (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="OpenAI-API relay and multi-upstream load balancer")
    parser.add_argument("--log-level", default=os.environ.get("RELAY_LOG_LEVEL", "info"))
    _store_options(parser, top=True)
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
    _delay_options(fake)

    demo = sub.add_parser("demo", help="fake upstream + relay + a demo key, in one command")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--upstream-port", type=int, default=9000)
    demo.add_argument("--quota", type=int, default=100_000,
                      help="quota units of a new demo key (one is minted when the data directory has none)")
    _delay_options(demo)
    _store_options(demo)

    keys = sub.add_parser("keys", help="create, list, show, top up, disable and enable relay keys")
    _store_options(keys)
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
        p.add_argument("--create", action="store_true",
                       help="start an empty embedded store when --data-dir holds none (keys create does)")
        _store_options(p)

    add_codes_parser(sub, _store_options)

    check = sub.add_parser("check-config", help="validate an upstreams.yaml")
    check.add_argument("file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return _main(args)
    except KeyboardInterrupt:  # Ctrl-C before the servers were up (once up, it is a graceful stop)
        print("relay: interrupted", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
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
        if args.command == "demo":
            return serve.demo_command(args)
        if args.command == "codes":
            return _codes(args)
        return _keys(args)
    except ConfigError as exc:
        print(f"invalid config: {exc}", file=sys.stderr)
        return 1
    except StoreUnreachable as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1


def _keys(args: argparse.Namespace) -> int:
    """``relay keys``: on the store that is there; a new one only when asked (or by ``keys create``)."""
    from relay.keys_cli import run_keys_command
    data_dir = os.path.abspath(args.data_dir)
    new = not args.mongodb_uri and not holds_store(data_dir)
    if new and not (args.create or args.keys_command == "create"):
        print(f"relay keys: no store in {data_dir} (no relay has run with that data directory). Give your "
              f"store's directory with --data-dir DIR (or RELAY_DATA_DIR), a MongoDB with --mongodb-uri, "
              f"or start an empty store there with --create.", file=sys.stderr)
        return 1
    # The embedded store starts here, on the main thread: it is tied to this thread's life.
    location = locate_store(args.mongodb_uri, data_dir)
    try:
        print(f"relay keys: {_store_line(location, data_dir, new)}", file=sys.stderr, flush=True)
        return asyncio.run(run_keys_command(args, location.uri))
    finally:
        location.stop()


def _codes(args: argparse.Namespace) -> int:
    """``relay codes``: on the store that is there (``codes create`` may start an empty one)."""
    from relay.codes_cli import run_codes_command
    data_dir = os.path.abspath(args.data_dir)
    new = not args.mongodb_uri and not holds_store(data_dir)
    if new and args.codes_command != "create":
        print(f"relay codes: no store in {data_dir} (no relay has run with that data directory). Give your "
              f"store's directory with --data-dir DIR (or RELAY_DATA_DIR), or a MongoDB with --mongodb-uri.",
              file=sys.stderr)
        return 1
    location = locate_store(args.mongodb_uri, data_dir)  # on the main thread: tied to its life
    try:
        print(f"relay codes: {_store_line(location, data_dir, new)}", file=sys.stderr, flush=True)
        return asyncio.run(run_codes_command(args, location.uri))
    finally:
        location.stop()


def _store_line(location: StoreLocation, data_dir: str, new: bool) -> str:
    if location.data_dir is None:  # the URI without its credentials or options
        return f"store: MongoDB at {mask_userinfo(location.uri).split('?', 1)[0]}"
    if new:
        return f"store: a new embedded store in {data_dir}"
    if location.embedded is None:
        return f"store: the embedded store in {data_dir}, run by the relay serving it"
    return f"store: the embedded store in {data_dir}"
