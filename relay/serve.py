"""Running relay: the servers, the services and their store, from start to a graceful stop."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
from importlib import resources
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.process
import tornado.web

from relay import supervise
from relay.auth import checked_admin_token
from relay.config import Config, load_config, parse_config
from relay.fake_upstream import FakeState, make_fake_app
from relay.net import parse_trusted
from relay.store.connect import close_client, locate_store, open_store
from relay.store.embedded import die_with_parent

# relay.app (and with it prometheus_client) is imported inside the commands that need it:
# with --workers, PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is imported.

log = logging.getLogger("relay")


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
           body_timeout_s: float = 120.0) -> tornado.httpserver.HTTPServer:
    from relay.app import make_server
    server = make_server(app, ssl_options, max_body, client_timeout_s, body_timeout_s)
    if sockets is not None:
        server.add_sockets(sockets)
    else:
        server.listen(port, host)
    return server


async def _serve(args: argparse.Namespace, store_uri: str, sockets: list[socket.socket] | None = None,
                 metrics_sockets: list[socket.socket] | None = None, worker: int | None = None) -> int:
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
    supervise.freeze_start_up_objects()
    await until_signalled()
    supervise.exit_watchdog(args.drain_timeout + 30)
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
    try:
        if args.workers > 1:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                worker = tornado.process.fork_processes(args.workers, max_restarts=100)
            except SystemExit:
                # The supervisor: workers drain first, the store stops last (in finally).
                supervise.stop_workers(location, args.drain_timeout + 15)
                raise
            die_with_parent()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            location.embedded = None  # the store belongs to the supervisor
            return asyncio.run(_serve(args, location.uri, sockets, metrics_sockets, worker))
        return asyncio.run(_serve(args, location.uri, sockets, metrics_sockets))
    finally:
        location.stop()


async def fake_upstream(args: argparse.Namespace) -> int:
    keys = set(filter(None, args.keys.split(","))) if args.keys else None
    server = listen(make_fake_app(FakeState(keys)), args.port, args.host)
    log.info("fake upstream listening on %s:%d", args.host, args.port)
    await until_signalled()
    server.stop()
    return 0


async def demo(args: argparse.Namespace, store_uri: str) -> int:
    from relay.app import make_app
    from relay.services import build_services
    fake = listen(make_fake_app(FakeState(), quiet=True), args.upstream_port, "127.0.0.1")
    config = _pointed_at(load_pool(None), f"http://127.0.0.1:{args.upstream_port}/v1")
    store = await open_store(store_uri, args.mongo_client)
    key, _ = await store.create_key(args.quota, note="demo")
    services = build_services(config, store)
    services.start_maintenance()
    server = listen(make_app(services), args.port, args.host)
    base = f"http://127.0.0.1:{args.port}/v1"
    print(f"""
relay demo: relay on :{args.port}, fake upstream on :{args.upstream_port}, store in {args.data_dir}.
Ctrl-C stops them all.

  demo key: {key}   ({args.quota} quota units)

  curl {base}/chat/completions -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "gpt-3.5-turbo", "messages": [{{"role": "user", "content": "Hi"}}]}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='{key}'); \\
r = c.chat.completions.create(model='gpt-3.5-turbo', messages=[{{'role': 'user', 'content': 'Hi'}}]); \\
print(r.choices[0].message.content)"

  curl {base}/dashboard/billing/subscription -H 'Authorization: Bearer {key}'
""", flush=True)
    await until_signalled()
    server.stop()
    fake.stop()
    await services.close()
    await close_client(store.client)
    return 0


def _pointed_at(config: Config, base_url: str) -> Config:
    return dataclasses.replace(config, upstreams=tuple(
        dataclasses.replace(u, base_url=base_url) for u in config.upstreams))

