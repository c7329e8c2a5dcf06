"""The quota over the wire: a real MongoDB-compatible server (the embedded one), real relays.

Conservation is checked after concurrency, upstream failures, disconnects, restarts,
top-ups, two processes on one store, and a kill -9 (the sweeper's job).
"""
import asyncio
import datetime as dt
import json
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from relay.store.connect import close_client, open_store
from relay.store.embedded import EmbeddedServer
from tests.conservation import assert_conserved, settled
from tests.helpers import TEST_KEY, add_key, eventually, one_upstream_config, serve, start_fake
from tests.processes import RelayProcess, db_uri, relay_cli

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]
COST = 560  # gpt-4, 8 prompt + 10 completion tokens


@pytest.fixture
def uri(embedded):
    return db_uri(embedded, "t" + uuid.uuid4().hex[:10])


@pytest.fixture(params=["pymongo", "motor"])
def client_kind(request):
    return request.param


@pytest.fixture
def fake(io_loop):
    f = start_fake()
    yield f
    f.stop()


def http(n: int = 128) -> AsyncHTTPClient:
    return AsyncHTTPClient(force_instance=True, max_clients=n, defaults={"request_timeout": 60})


async def post_chat(client, url, key=TEST_KEY, stream=False, **extra):
    return await client.fetch(url + CHAT, method="POST", raise_error=False,
                              headers={"Authorization": f"Bearer {key}"},
                              body=json.dumps({"model": "gpt-4", "messages": HI, "stream": stream, **extra}))


async def test_store_operations_over_the_wire(uri, client_kind, io_loop):
    store = await open_store(uri, client_kind)
    await add_key(store, quota=1000)
    h = hash_key(TEST_KEY)
    held = await store.reserve(h, "r1", 10, 600)
    from relay.metering.ledger import LedgerEntry, utc_now
    e = LedgerEntry("r1", h, "gpt-4", "p", 8, 10, COST, 200, 1.0, 1.0, False, utc_now())
    assert await store.settle(e, held) and not await store.settle(e, held)
    await assert_conserved(store)
    await close_client(store.client)


async def test_concurrent_mixed_requests_on_half_a_budget(uri, client_kind, fake, io_loop):
    """(a) 100 concurrent streaming and JSON requests, quota for about half of them."""
    store = await open_store(uri, client_kind)
    await add_key(store, quota=COST * 50)
    url, server, services = await serve(one_upstream_config(fake.base_url), store)
    c = http()
    # Half set max_tokens (hold exactly their cost), half do not (hold what is left).
    results = await asyncio.gather(*(post_chat(c, url, stream=i % 2 == 0, **({"max_tokens": 10} if i % 4 < 2 else {}))
                                     for i in range(100)))
    codes = [r.code for r in results]
    await settled(store, services)
    assert set(codes) <= {200, 429}, codes
    assert 0 < codes.count(200) <= 50 and codes.count(429) >= 50
    for r in results:
        if r.code == 429:
            assert json.loads(r.body)["error"]["code"] == "insufficient_quota"
    doc = await store.key_doc(hash_key(TEST_KEY))
    max_excess = COST - 160  # a request holding only its prompt's cost
    assert doc["balance"] >= -max_excess
    ledger = len(await store.ledger_entries())
    assert ledger == codes.count(200)
    await assert_conserved(store)
    server.stop()
    await services.close()
    c.close()
    await close_client(store.client)


async def test_failures_disconnects_and_topups_during_traffic(uri, fake, io_loop):
    """(b) upstream failures before and during streams, (c) client hang-ups, (e) top-ups."""
    store = await open_store(uri)
    await add_key(store, quota=10_000_000)  # each request without max_tokens holds 41,120
    url, server, services = await serve(one_upstream_config(fake.base_url), store)
    c = http()
    fake.state.behaviour.status = 500
    failed = await asyncio.gather(*(post_chat(c, url, stream=i % 2 == 0) for i in range(10)))
    assert {r.code for r in failed} == {502}
    fake.state.behaviour.status = None
    fake.state.behaviour.truncate_after_chunks = 4
    fake.state.behaviour.chunk_delay = 0.01
    cut = await asyncio.gather(*(post_chat(c, url, stream=True) for _ in range(10)))
    assert all(b"[DONE]" not in r.body for r in cut)
    fake.state.behaviour.truncate_after_chunks = None
    fake.state.behaviour.chunk_delay = 0.05
    port = int(url.rsplit(":", 1)[1])
    loop = asyncio.get_running_loop()
    hangups = [loop.run_in_executor(None, _hang_up_after, port, 3) for _ in range(8)]
    h = hash_key(TEST_KEY)
    topups = [store.topup(h, 1000) for _ in range(5)]
    normal = [post_chat(c, url, stream=i % 2 == 0) for i in range(20)]
    await asyncio.gather(*hangups, *topups, *normal)
    await settled(store, services)
    doc = await store.key_doc(h)
    assert doc["granted"] == 10_005_000
    entries = await store.ledger_entries()
    assert len(entries) == 10 + 8 + 20, "failed requests left no charge; every delivered one did"
    assert all(e["cost"] < COST for e in entries if e["completion_tokens"] < 10)
    await assert_conserved(store)
    server.stop()
    await services.close()
    c.close()
    await close_client(store.client)


def _hang_up_after(port: int, events: int) -> None:
    body = json.dumps({"model": "gpt-4", "stream": True, "messages": HI}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall((f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        got = b""
        while got.count(b"data: ") < events:
            got += s.recv(4096)


PER_REQUEST = "quota: {leases: false}"  # the mode where each request reserves in the store (leases: test_lease_wire)


async def test_two_relay_processes_share_one_store_exactly(uri, fake, tmp_path, io_loop):
    store = await open_store(uri)
    await add_key(store, quota=COST * 50)
    relays = [await RelayProcess(one_upstream_config(fake.base_url, extra=PER_REQUEST), tmp_path,
                                 "--mongodb-uri", uri).start()
              for _ in range(2)]
    c = http()
    results = await asyncio.gather(*(post_chat(c, relays[i % 2].url, stream=i % 3 == 0, max_tokens=10)
                                     for i in range(100)))
    codes = [r.code for r in results]
    await settled(store)
    assert codes.count(200) == 50 and codes.count(429) == 50, codes
    assert (await store.key_doc(hash_key(TEST_KEY)))["balance"] == 0
    await assert_conserved(store)
    for r in relays:
        await r.stop()
    c.close()
    await close_client(store.client)


async def test_cli_changes_reach_a_running_relay_within_5s(uri, fake, tmp_path, io_loop):
    store = await open_store(uri)
    await add_key(store, quota=10_000)
    relay = await RelayProcess(one_upstream_config(fake.base_url), tmp_path, "--mongodb-uri", uri).start()
    c = http()
    assert (await post_chat(c, relay.url)).code == 200
    top = await asyncio.get_running_loop().run_in_executor(
        None, lambda: relay_cli("keys", "topup", TEST_KEY[:10], "500", "--mongodb-uri", uri))
    assert top.returncode == 0, top.stderr
    sub = await c.fetch(relay.url + "/v1/dashboard/billing/subscription",
                        headers={"Authorization": f"Bearer {TEST_KEY}"})
    assert json.loads(sub.body)["hard_limit_usd"] == 10_500
    off = await asyncio.get_running_loop().run_in_executor(
        None, lambda: relay_cli("keys", "disable", TEST_KEY, "--mongodb-uri", uri))
    assert off.returncode == 0 and '"status": "disabled"' in off.stdout

    async def refused():
        resp = await post_chat(c, relay.url)
        return resp if resp.code == 401 else None
    resp = await eventually(refused, timeout=5, interval=0.1, message="a disabled key must stop working within 5 s")
    assert json.loads(resp.body)["error"]["code"] == "key_disabled"
    await relay.stop()
    c.close()
    await close_client(store.client)


async def test_restart_and_keys_command_on_the_embedded_store(fake, tmp_path, io_loop):
    """(d) relay restarted between requests on its own embedded store; `relay keys` with and without it."""
    data = tmp_path / "data"
    loop = asyncio.get_running_loop()
    made = await loop.run_in_executor(None, lambda: relay_cli("keys", "create", "--quota", "5000",
                                                              "--data-dir", str(data)))
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("ak-") and len(key) >= 35
    c = http()
    for round_ in range(2):
        relay = await RelayProcess(one_upstream_config(fake.base_url), tmp_path, "--data-dir", str(data)).start()
        for i in range(3):
            assert (await post_chat(c, relay.url, key, stream=i == 1, max_tokens=10)).code == 200
        if round_ == 0:  # `relay keys` reaches the server that serve started
            top = await loop.run_in_executor(None, lambda: relay_cli("keys", "topup", key, "1000",
                                                                     "--data-dir", str(data)))
            assert top.returncode == 0, top.stderr

        async def billed(url=relay.url, rounds=round_ + 1):  # settlements follow the responses
            today = dt.datetime.now(dt.UTC).date()
            usage = await c.fetch(f"{url}/v1/dashboard/billing/usage?start_date={today}"
                                  f"&end_date={today + dt.timedelta(days=1)}",
                                  headers={"Authorization": f"Bearer {key}"})
            return json.loads(usage.body)["total_usage"] == 3 * rounds * COST * 100
        await eventually(billed, message="this round's requests are billed")
        await relay.stop()
    shown = await loop.run_in_executor(None, lambda: relay_cli("keys", "show", key[:10], "--data-dir", str(data)))
    view = json.loads(shown.stdout)
    assert (view["granted"], view["used"], view["reserved"], view["balance"]) == (6000, 6 * COST, 0, 6000 - 6 * COST)
    server = EmbeddedServer(str(data))
    store = await open_store(server.start())
    try:
        await assert_conserved(store)
        await close_client(store.client)
    finally:
        server.stop()
    c.close()


async def test_kill_9_mid_stream_then_restart_returns_every_hold(uri, fake, tmp_path, io_loop):
    store = await open_store(uri)
    await add_key(store, quota=1_000_000)
    fake.state.behaviour.chunk_delay = 0.3  # streams stay open for ~3 s
    relay = await RelayProcess(one_upstream_config(fake.base_url, extra=PER_REQUEST), tmp_path,
                               "--mongodb-uri", uri).start()
    c = http()
    streams = [asyncio.ensure_future(post_chat(c, relay.url, stream=True)) for _ in range(10)]
    h = hash_key(TEST_KEY)

    async def all_held():
        return len((await store.key_doc(h))["holds"]) == 10
    await eventually(all_held, timeout=5, message="ten streams hold their reservations")
    await relay.stop(signal.SIGKILL)
    await asyncio.gather(*streams, return_exceptions=True)
    assert len((await store.key_doc(h))["holds"]) == 10, "the crash left its reservations behind"
    restarted_at = time.monotonic()
    relay = await RelayProcess(one_upstream_config(fake.base_url, extra=PER_REQUEST), tmp_path,
                               "--mongodb-uri", uri).start()
    await settled(store, timeout=60)
    assert time.monotonic() - restarted_at <= 60
    await assert_conserved(store)
    fake.state.behaviour.chunk_delay = 0
    assert (await post_chat(c, relay.url)).code == 200
    await settled(store)
    await assert_conserved(store)
    await relay.stop()
    c.close()
    await close_client(store.client)


async def test_no_conversation_content_in_store_files_or_logs(fake, tmp_path, io_loop):
    data = tmp_path / "data"
    marker = "PRIVATE-" + uuid.uuid4().hex
    relay = await RelayProcess(one_upstream_config(fake.base_url), tmp_path, "--data-dir", str(data)).start()
    loop = asyncio.get_running_loop()
    made = await loop.run_in_executor(None, lambda: relay_cli("keys", "create", "--quota", "100000",
                                                              "--data-dir", str(data)))
    key = made.stdout.strip()
    c = http()
    for stream in (False, True):
        body = json.dumps({"model": "gpt-4", "stream": stream, "user": marker,
                           "messages": [{"role": "user", "content": f"my secret is {marker}"}]})
        r = await c.fetch(relay.url + CHAT, method="POST", body=body, headers={"Authorization": f"Bearer {key}"})
        assert r.code == 200
    assert [r["model"] for r in fake.requests] == ["gpt-4", "gpt-4"]  # both went upstream
    from relay.store.embedded import running_uri
    store = await open_store(running_uri(str(data)))
    await settled(store)
    for name in await store.db.list_collection_names():
        for doc in await store.db[name].find({}).to_list(None):
            assert marker not in str(doc) and key not in str(doc), name
    await close_client(store.client)
    await relay.stop()
    for path in Path(data).rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert marker.encode() not in blob and key.encode() not in blob, path
    log = relay.log()
    assert log.count("POST /v1/chat/completions") == 2  # the access lines are there, without content
    assert marker not in log and key not in log
