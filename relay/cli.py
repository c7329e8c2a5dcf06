"""Command line: serve, demo, fake-upstream, check-config. Builds the services and runs them."""
from __future__ import annotations

import argparse
import dataclasses
import asyncio
import gc
import logging
import os
import signal
import ssl
import sys
from importlib import resources

import tempfile
import threading

import tornado.httpserver
import tornado.netutil
import tornado.process

from relay.auth import checked_admin_token
from relay.config import Config, ConfigError, load_config, parse_config
from relay.fake_upstream import FakeState, make_fake_app
from relay.net import parse_trusted
from relay.store.connect import CLIENTS, DEFAULT_CLIENT, close_client, locate_store, open_store
from relay.store.embedded import StoreUnreachable

# relay.app (and with it prometheus_client) is imported inside the commands that need it:
# with --workers, PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is imported.

log = logging.getLogger("relay")


def example_config_text() -> str:
    return resources.files("relay").joinpath("examples/upstreams.yaml").read_text(encoding="utf-8")


def _load(path: str | None) -> Config:
    if path:
        return load_config(path, os.environ)
    return parse_config(example_config_text(), os.environ, source="<embedded example upstreams.yaml>")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _ssl_context(args) -> ssl.SSLContext | None:
    if not args.certfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.certfile, args.keyfile)
    return ctx


def _listen(app, port: int, host: str, ssl_options=None, max_body: int = 0, sockets=None,
            client_timeout_s: float = 60.0, body_timeout_s: float = 120.0) -> tornado.httpserver.HTTPServer:
    from relay.app import make_server
    server = make_server(app, ssl_options, max_body, client_timeout_s, body_timeout_s)
    if sockets is not None:
        server.add_sockets(sockets)
    else:
        server.listen(port, host)
    return server


async def _serve(args, store_uri: str, sockets=None, metrics_sockets=None, worker: int | None = None) -> int:
    from relay.app import build_services, make_app
    config = _load(args.config)
    store = await open_store(store_uri, args.mongo_client)
    os.makedirs(args.data_dir, exist_ok=True)
    journal = os.path.join(args.data_dir, "settlements.journal" if worker is None else f"settlements-w{worker}.journal")
    services = build_services(config, store, parse_trusted(args.trusted_proxy), config_path=args.config,
                              journal_path=journal)
    services.start_maintenance()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, services.reloader.reload)
    servers = [_listen(make_app(services, metrics=metrics_sockets is None), args.port, args.host,
                       _ssl_context(args), config.limits.max_body_bytes, sockets, args.client_timeout,
                       args.body_timeout)]
    if metrics_sockets is not None:
        from relay.app import make_metrics_app
        servers.append(_listen(make_metrics_app(services), 0, "", sockets=metrics_sockets))
    log.info("relay listening on %s:%d with %d upstream(s)", args.host, args.port, len(config.upstreams))
    _freeze_start_up_objects()
    await _until_signalled()
    _exit_watchdog(args.drain_timeout + 30)
    # Graceful: stop accepting, let requests in flight finish (streams included) within the
    # drain timeout, settle them, then close connections; the embedded store stops last.
    for server in servers:
        server.stop()
    log.info("draining %d request(s) in flight (up to %.0f s)", services.active, args.drain_timeout)
    if not await services.drain(args.drain_timeout):
        log.warning("drain timeout: %d request(s) still in flight are cut", services.active)
    for server in servers:
        await server.close_all_connections()
    await services.close()
    await close_client(store.client)
    return 0


def _exit_without_store() -> None:
    """The embedded store cannot be brought back (called from its watcher thread).

    Exit 1 at once, as a crash would, so that systemd restarts relay with a fresh store: a
    graceful drain could write nothing. Workers follow their supervisor (PR_SET_PDEATHSIG);
    the journal and the sweeper cover what was in flight."""
    log.critical("relay exits with code 1: its embedded store is gone and could not be restarted")
    logging.shutdown()
    os._exit(1)


def _exit_watchdog(after_s: float) -> None:
    """A stop signal always ends the process: if the graceful shutdown (drain, final store
    writes, asyncio's own clean-up of tasks) has not finished within ``after_s``, exit hard.
    What was not written is what a crash leaves: the journal and the sweeper cover it."""
    def fire() -> None:
        log.error("shutdown did not finish within %.0f s; exiting now", after_s)
        logging.shutdown()
        os._exit(1)
    timer = threading.Timer(after_s, fire)
    timer.daemon = True
    timer.start()


def _freeze_start_up_objects() -> None:
    """Keep the collector off what lives as long as the process.

    A full collection walks every tracked object: modules, the driver, the app, ~60k of them,
    10 ms on this machine, a stall in whichever request is in flight (it was relay's p99 at
    concurrency 1). Frozen, they are never walked again; collections see only what requests
    allocate. The token encoder loads first so that its tables are among them."""
    from relay.metering.tokens import encoder
    encoder()
    gc.collect()
    gc.freeze()


def _serve_command(args) -> int:
    """Bind, start the store, and with --workers N fork N processes sharing the sockets."""
    _load(args.config)  # a bad file fails before any store starts
    checked_admin_token(os.environ.get("RELAY_ADMIN_TOKEN"))  # so does a short admin token
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="relay-metrics-")
    sockets = tornado.netutil.bind_sockets(args.port, args.host)
    metrics_sockets = tornado.netutil.bind_sockets(args.metrics_port, args.host) if args.metrics_port else None
    # The embedded store starts here, on the main thread: it is tied to this thread's life.
    location = locate_store(args.mongodb_uri, args.data_dir, on_give_up=_exit_without_store)
    try:
        if args.workers > 1:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                worker = tornado.process.fork_processes(args.workers, max_restarts=100)
            except SystemExit:
                # The supervisor: workers drain first, the store stops last (in finally).
                _stop_workers(location, args.drain_timeout + 15)
                raise
            _die_with_parent()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            location.embedded = None  # the store belongs to the supervisor
            return asyncio.run(_serve(args, location.uri, sockets, metrics_sockets, worker))
        return asyncio.run(_serve(args, location.uri, sockets, metrics_sockets))
    finally:
        location.stop()


async def _fake(args) -> int:
    keys = set(filter(None, args.keys.split(","))) if args.keys else None
    server = _listen(make_fake_app(FakeState(keys)), args.port, args.host)
    log.info("fake upstream listening on %s:%d", args.host, args.port)
    await _until_signalled()
    server.stop()
    return 0


def _stop_workers(location, timeout_s: float) -> None:
    """SIGTERM every worker (each drains gracefully) and wait for them, not for the store."""
    import time
    store_pid = location.embedded.proc.pid if location.embedded and location.embedded.proc else None
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as fh:
            workers = [int(p) for p in fh.read().split() if int(p) != store_pid]
    except OSError:
        workers = []
    for pid in workers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    for pid in workers:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break
            time.sleep(0.05)


def _die_with_parent() -> None:
    from relay.store.embedded import _die_with_parent as prctl_pdeathsig
    prctl_pdeathsig()


async def _demo(args, store_uri: str) -> int:
    from relay.app import build_services, make_app
    fake = _listen(make_fake_app(FakeState(), quiet=True), args.upstream_port, "127.0.0.1")
    config = _pointed_at(_load(None), f"http://127.0.0.1:{args.upstream_port}/v1")
    store = await open_store(store_uri, args.mongo_client)
    key, _ = await store.create_key(args.quota, note="demo")
    services = build_services(config, store)
    services.start_maintenance()
    server = _listen(make_app(services), args.port, args.host)
    base = f"http://127.0.0.1:{args.port}/v1"
    print(f"""
relay demo: relay on :{args.port}, fake upstream on :{args.upstream_port}, store in {args.data_dir}.
Ctrl-C stops them all.

  demo key: {key}   ({args.quota} quota units)

  curl {base}/chat/completions -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "gpt-3.5-turbo", "messages": [{{"role": "user", "content": "Hi"}}]}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='{key}'); \\
print(c.chat.completions.create(model='gpt-3.5-turbo', messages=[{{'role': 'user', 'content': 'Hi'}}]).choices[0].message.content)"

  curl {base}/dashboard/billing/subscription -H 'Authorization: Bearer {key}'
""", flush=True)
    await _until_signalled()
    server.stop()
    fake.stop()
    await services.close()
    await close_client(store.client)
    return 0


def _pointed_at(config: Config, base_url: str) -> Config:
    return dataclasses.replace(config, upstreams=tuple(
        dataclasses.replace(u, base_url=base_url) for u in config.upstreams))


def _check_config(args) -> int:
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

    serve = sub.add_parser("serve", help="run relay")
    serve.add_argument("--config", help="upstreams.yaml (default: the embedded example)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--certfile", help="serve TLS directly with this certificate chain")
    serve.add_argument("--keyfile", help="private key for --certfile")
    serve.add_argument("--trusted-proxy", action="append", default=[],
                       help="address or CIDR of a reverse proxy whose X-Forwarded-* headers are believed")

    serve.add_argument("--workers", type=int, default=1,
                       help="processes sharing the port (one per core); metrics are aggregated across them")
    serve.add_argument("--client-timeout", type=float, default=60.0,
                       help="seconds a client may take to send its headers, or stay idle between requests")
    serve.add_argument("--body-timeout", type=float, default=120.0, help="seconds a client may take to send a body")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="on SIGTERM, how long requests in flight may take to finish (default 30 s)")
    serve.add_argument("--metrics-port", type=int, default=0,
                       help="serve /metrics on this port only (default: on the main port)")
    _store_options(serve)

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
    key_cmds.add_parser("list", help="all keys")
    for name in ("show", "disable", "enable"):
        p = key_cmds.add_parser(name, help=f"{name} a key by the key or its prefix")
        p.add_argument("key")
    topup = key_cmds.add_parser("topup", help="add quota to a key")
    topup.add_argument("key")
    topup.add_argument("quota", type=int)
    for p in key_cmds.choices.values():
        _store_options(p)

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
            return asyncio.run(_fake(args))
        if args.command == "serve":
            return _serve_command(args)
        from relay.keys_cli import run_keys_command
        runner = {"demo": _demo, "keys": run_keys_command}[args.command]
        # The embedded store starts here, on the main thread: it is tied to this thread's life.
        location = locate_store(args.mongodb_uri, args.data_dir,
                                on_give_up=_exit_without_store if args.command == "demo" else None)
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


if __name__ == "__main__":
    sys.exit(main())
