"""Running relay: the servers, the services and their store, from start to a graceful stop."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import Coroutine
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import tornado.httpserver
import tornado.netutil
import tornado.process
import tornado.web
import uvloop

from relay import supervise
from relay.auth import checked_admin_token
from relay.config import Config, load_config, parse_config
from relay.fake_upstream import Behaviour, FakeState, make_fake_app
from relay.keys import available, hash_key, is_well_formed
from relay.metering.encodings import encodings_for_models
from relay.net import parse_trusted
from relay.observability import access_log
from relay.store.connect import StoreLocation, close_client, locate_store, open_store
from relay.store.embedded import die_with_parent

# relay.app (and with it prometheus_client) is imported inside the commands that need it:
# with --workers, PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is imported.

if TYPE_CHECKING:
    from relay.app import Server
    from relay.services import Services
    from relay.store.mongo import MongoStore

T = TypeVar("T")
log = logging.getLogger("relay")

DEMO_KEY_FILE = "demo-key"  # in the data directory: the demo key, for the next `relay demo`
DEMO_DRAIN_S = 10.0


def example_config_text() -> str:
    return resources.files("relay").joinpath("examples/upstreams.yaml").read_text(encoding="utf-8")


def load_pool(path: str | None) -> Config:
    if path:
        return load_config(path, os.environ)
    return parse_config(example_config_text(), os.environ, source="<embedded example upstreams.yaml>")


async def until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.certfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.certfile, args.keyfile)
    return ctx


def listen(app: tornado.web.Application, port: int, host: str,
           ssl_options: ssl.SSLContext | dict[str, Any] | None = None, max_body: int = 0,
           sockets: list[socket.socket] | None = None, client_timeout_s: float = 60.0,
           body_timeout_s: float = 120.0) -> Server:
    from relay.app import make_server
    server = make_server(app, ssl_options, max_body, client_timeout_s, body_timeout_s)
    if sockets is not None:
        server.add_sockets(sockets)
    else:
        server.listen(port, host)
    return server


async def _serve(args: argparse.Namespace, store_uri: str, sockets: list[socket.socket] | None = None,
                 metrics_sockets: list[socket.socket] | None = None, worker: int | None = None) -> str:
    """Run until SIGTERM or SIGINT, then stop gracefully; what the stop did, in a few words."""
    from relay.app import make_app
    from relay.services import build_services
    config = load_pool(args.config)
    store = await open_store(store_uri, args.mongo_client)
    os.makedirs(args.data_dir, exist_ok=True)
    journal = os.path.join(args.data_dir, "settlements.journal" if worker is None else f"settlements-w{worker}.journal")
    services = build_services(config, store, parse_trusted(args.trusted_proxy), config_path=args.config,
                              journal_path=journal)
    services.start_maintenance()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, services.reloader.reload)
    servers = [listen(make_app(services, metrics=metrics_sockets is None), args.port, args.host,
                       _ssl_context(args), config.limits.max_body_bytes, sockets, args.client_timeout,
                       args.body_timeout)]
    if metrics_sockets is not None:
        from relay.app import make_metrics_app
        servers.append(listen(make_metrics_app(services), 0, "", sockets=metrics_sockets))
    log.info("relay listening on %s:%d with %d upstream(s); in the store this process is %s", args.host, args.port,
             len(config.upstreams), store.instance_id)
    supervise.freeze_start_up_objects(encodings_for_models(config.named_models(), config.quota.encodings))
    await until_signalled()
    supervise.exit_watchdog(args.drain_timeout + 30)
    summary = await graceful_stop(servers, services, args.drain_timeout)
    await close_client(store.client)
    return summary


async def graceful_stop(servers: list[Server], services: Services, drain_timeout: float) -> str:
    """Stop accepting, let requests in flight finish (streams included) within the drain
    timeout, settle them and hand back leased slices, then close connections. The embedded
    store stops after this (last). Returns what happened to the requests in flight."""
    for server in servers:
        server.stop()
    in_flight = services.active
    log.info("draining %d request(s) in flight (up to %.0f s)", in_flight, drain_timeout)
    if await services.drain(drain_timeout):
        summary = f"{in_flight} request(s) in flight drained"
    else:
        log.warning("drain timeout: %d request(s) still in flight are cut", services.active)
        summary = f"{services.active} request(s) in flight cut after the {drain_timeout:.0f} s drain timeout"
    access_log.DIRECT.flush()  # the drained requests' lines, before what the stop logs next
    for server in servers:
        await server.close_all_connections()
    await services.close()
    return summary


def stopped(what: str, summary: str, location: StoreLocation) -> None:
    """The one line a stopped relay prints (after its embedded store stopped, if it ran one)."""
    store = "the embedded store stopped" if location.embedded is not None else "store connection closed"
    access_log.DIRECT.flush()
    print(f"{what} stopped: {summary}; {store}.", file=sys.stderr, flush=True)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run relay's event loop: uvloop's (libuv; measured in docs/benchmarks.md)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def serve_command(args: argparse.Namespace) -> int:
    """Bind, start the store, and with --workers N fork N processes sharing the sockets."""
    load_pool(args.config)  # a bad file fails before any store starts
    checked_admin_token(os.environ.get("RELAY_ADMIN_TOKEN"))  # so does a short admin token
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="relay-metrics-")
    sockets = tornado.netutil.bind_sockets(args.port, args.host)
    metrics_sockets = tornado.netutil.bind_sockets(args.metrics_port, args.host) if args.metrics_port else None
    # The embedded store starts here, on the main thread: it is tied to this thread's life.
    location = locate_store(args.mongodb_uri, args.data_dir, on_give_up=supervise.exit_without_store)
    summary = None
    try:
        if args.workers > 1:
            # Ctrl-C reaches the whole process group: workers drain, the supervisor waits for them.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: sys.exit(0))
            try:
                worker = tornado.process.fork_processes(args.workers, max_restarts=100)
            except SystemExit:
                # The supervisor: workers drain first, the store stops last (in finally).
                supervise.stop_workers(location, args.drain_timeout + 15)
                summary = f"{args.workers} workers drained"
                raise
            die_with_parent()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            location.embedded = None  # the store belongs to the supervisor
            run_loop(_serve(args, location.uri, sockets, metrics_sockets, worker))
            return 0
        summary = run_loop(_serve(args, location.uri, sockets, metrics_sockets))
        return 0
    finally:
        location.stop()
        if summary is not None:
            stopped("relay", summary, location)


def fake_behaviour(args: argparse.Namespace) -> Behaviour:
    """The fake upstream's delays from the command line (``--first-byte-ms``, ``--chunk-delay-ms``)."""
    return Behaviour(first_byte_delay=args.first_byte_delay, chunk_delay=args.chunk_delay)


async def fake_upstream(args: argparse.Namespace) -> int:
    keys = set(filter(None, args.keys.split(","))) if args.keys else None
    server = listen(make_fake_app(FakeState(keys, initial=fake_behaviour(args))), args.port, args.host)
    log.info("fake upstream listening on %s:%d (first byte after %.0f ms, %.0f ms between chunks)",
             args.host, args.port, args.first_byte_delay * 1000, args.chunk_delay * 1000)
    await until_signalled()
    server.stop()
    return 0


def demo_command(args: argparse.Namespace) -> int:
    # The embedded store starts here, on the main thread: it is tied to this thread's life.
    location = locate_store(args.mongodb_uri, args.data_dir, on_give_up=supervise.exit_without_store)
    summary = None
    try:
        summary = asyncio.run(demo(args, location.uri))
        return 0
    finally:
        location.stop()
        if summary is not None:
            stopped("relay demo", summary, location)


async def demo(args: argparse.Namespace, store_uri: str) -> str:
    from relay.app import make_app
    from relay.services import build_services
    fake = listen(make_fake_app(FakeState(initial=fake_behaviour(args)), quiet=True), args.upstream_port,
                  "127.0.0.1")
    config = _pointed_at(load_pool(None), f"http://127.0.0.1:{args.upstream_port}/v1")
    store = await open_store(store_uri, args.mongo_client)
    key, how = await demo_key(store, args.data_dir, args.quota)
    left = available(await store.key_doc(hash_key(key)) or {"granted": 0, "used": 0})
    services = build_services(config, store)
    services.start_maintenance()
    server = listen(make_app(services), args.port, args.host)
    site = f"http://127.0.0.1:{args.port}"
    base = f"{site}/v1"
    store_opt = "--mongodb-uri URI" if args.mongodb_uri else f"--data-dir {args.data_dir}"
    if left == 0:
        how += f"; it is spent: relay keys topup {key[:10]} {args.quota} {store_opt}"
    print(f"""
relay demo: relay on :{args.port}, fake upstream on :{args.upstream_port}, \
store {"in MongoDB" if args.mongodb_uri else f"in {args.data_dir}"}. Ctrl-C stops them all.

  demo key: {key}   ({left} quota units left; {how})
  its page: {site}/usage?lang=en

  curl {base}/chat/completions -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "gpt-3.5-turbo", "messages": [{{"role": "user", "content": "Hi"}}]}}'

  curl -N {base}/chat/completions -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "gpt-3.5-turbo", "stream": true, "messages": [{{"role": "user", "content": "Hi"}}]}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='{key}'); \\
r = c.chat.completions.create(model='gpt-3.5-turbo', messages=[{{'role': 'user', 'content': 'Hi'}}]); \\
print(r.choices[0].message.content)"

  curl -N {base}/responses -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' -d '{{"model": "gpt-4o-mini", "input": "Hi", "stream": true}}'

  relay keys list {store_opt}
""", flush=True)
    if not (args.chunk_delay or args.first_byte_delay):
        print("  (relay demo --chunk-delay-ms 300 shows a stream's chunks arriving one by one)\n", flush=True)
    await until_signalled()
    summary = await graceful_stop([server], services, DEMO_DRAIN_S)
    fake.stop()
    await close_client(store.client)
    return summary


async def demo_key(store: MongoStore, data_dir: str, quota: int) -> tuple[str, str]:
    """The demo key of ``data_dir`` (``<data-dir>/demo-key``, readable by the user only), or a
    new one when there is none or it cannot be used; and how it was come by, in a few words."""
    path = os.path.join(data_dir, DEMO_KEY_FILE)
    why_not = ""
    try:
        with open(path, encoding="ascii") as fh:
            key = fh.read().strip()
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s was readable by others; it is now readable by its owner only", path)
    except FileNotFoundError:
        key = None
    except (OSError, UnicodeDecodeError) as exc:
        key, why_not = None, f"{path} could not be read ({exc.__class__.__name__})"
    if key is not None:
        doc = await store.key_doc(hash_key(key)) if is_well_formed(key) else None
        if doc is None:
            why_not = f"the key in {path} is not in this store" if is_well_formed(key) else f"{path} holds no key"
        elif doc["status"] != "active":
            why_not = f"the key in {path} ({doc['prefix']}) is disabled"
        else:
            return key, f"reused from {path}"
    key, _ = await store.create_key(quota, note="demo")
    os.makedirs(data_dir, exist_ok=True)
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key + "\n")
    os.replace(tmp, path)
    return key, f"new, kept in {path}" + (f": {why_not}" if why_not else "")


def _pointed_at(config: Config, base_url: str) -> Config:
    return dataclasses.replace(config, upstreams=tuple(
        dataclasses.replace(u, base_url=base_url) for u in config.upstreams))

