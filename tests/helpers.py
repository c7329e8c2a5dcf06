"""Test plumbing: fake upstreams on real sockets, configs pointing at them, relay apps."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import tornado.httpserver
import tornado.testing

from relay.app import make_app
from relay.config import parse_config
from relay.fake_upstream import FakeState, make_fake_app
from relay.services import build_services
from relay.store.mongo import MongoStore

# A well-formed relay key used only by tests.
TEST_KEY = "ak-test0000000000000000000000000000000000000001"
UPSTREAM_KEY = "sk-test-upstream-key-0001"

PRICING = """
pricing:
  gpt-3.5-turbo-1106: {input: "2/3", output: "4/3"}
  gpt-3.5-turbo: {input: 1, output: "4/3"}
  gpt-4: {input: 20, output: 40}
  text-embedding-ada-002: {input: "1/15"}
"""


@dataclass
class Fake:
    state: FakeState
    server: tornado.httpserver.HTTPServer
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[dict]:
        """What relay forwarded, without its health probes."""
        return [r for r in self.state.requests if r["path"] != "/v1/models"]

    @property
    def probes(self) -> list[dict]:
        return [r for r in self.state.requests if r["path"] == "/v1/models"]

    def stop(self) -> None:
        self.server.stop()

    async def go_down(self) -> None:
        """Connections refused from now on, and open ones closed."""
        self.server.stop()
        await self.server.close_all_connections()

    def come_back(self) -> None:
        import tornado.netutil
        self.server = tornado.httpserver.HTTPServer(make_fake_app(self.state, quiet=True))
        self.server.add_sockets(tornado.netutil.bind_sockets(self.port, "127.0.0.1"))

    def count(self, key: str | None = None) -> int:
        """Chat and embedding requests seen, optionally only those sent with ``key``."""
        return sum(1 for r in self.requests if key is None or r["authorization"] == f"Bearer {key}")


def start_fake(keys: set[str] | None = None) -> Fake:
    sock, port = tornado.testing.bind_unused_port()
    state = FakeState(keys)
    server = tornado.httpserver.HTTPServer(make_fake_app(state, quiet=True))
    server.add_socket(sock)
    return Fake(state, server, port)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_upstream_config(base_url: str, key: str = UPSTREAM_KEY, extra: str = "") -> str:
    return f"""
upstreams:
  - name: primary
    base_url: {base_url}
    keys: [{key}]
model_map:
  gpt-3.5-turbo: gpt-3.5-turbo-1106
{PRICING}
{extra}
"""


def mock_store() -> MongoStore:
    """A store on mongomock-motor: fast and in memory."""
    from mongomock_motor import AsyncMongoMockClient
    return MongoStore(AsyncMongoMockClient(), "relay")


async def add_key(store: MongoStore, key: str = TEST_KEY, quota: int = 1_000_000, status: str = "active") -> str:
    await store.create_key(quota, "test", key=key)
    if status != "active":
        from relay.keys import hash_key
        await store.set_status(hash_key(key), status)
    return key


def relay_app(config_text: str, store: MongoStore, admin_token: str | None = "", config_path: str | None = None,
              **settings):
    services = build_services(parse_config(config_text, os.environ), store, admin_token=admin_token,
                              config_path=config_path)
    services.start_maintenance()
    return make_app(services, **settings), services


async def serve(config_text: str, store: MongoStore, admin_token: str | None = "", config_path: str | None = None,
                **server_options):
    """A relay on its own port (for tests that need a second or differently built relay)."""
    from relay.app import make_server
    app, services = relay_app(config_text, store, admin_token, config_path)
    port = unused_port()
    server = make_server(app, **server_options)
    server.listen(port, "127.0.0.1")
    return f"http://127.0.0.1:{port}", server, services


async def eventually(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = ""):
    """Wait until ``predicate()`` (a function, plain or async) returns something truthy; return it.

    For every "until X happened" in a test: polls X with a deadline instead of sleeping a
    guessed time, so a slow machine makes the test slower, not wrong, and a fast one does not
    wait for nothing. Fails with ``message`` (and the last value seen) when X never happens.
    """
    import asyncio
    import inspect
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout} s: {message or predicate}" f" (last: {value!r})")
        await asyncio.sleep(interval)
