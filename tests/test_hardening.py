"""Faults, bad input, shutdown and secrets: what breaks around relay, and what it loses (nothing)."""
import asyncio
import json
import logging
import resource
import shutil
import signal
import socket
import time
import uuid

import pytest
from openai import AsyncOpenAI
from tornado.httpclient import AsyncHTTPClient

from relay.auth import FailedAuthThrottle
from relay.keys import hash_key
from relay.redact import mask_key
from relay.store.connect import close_client, open_store
from tests.conservation import assert_conserved, settled
from tests.faultproxy import FaultProxy
from tests.helpers import (
    TEST_KEY,
    UPSTREAM_KEY,
    add_key,
    eventually,
    mock_store,
    one_upstream_config,
    serve,
    start_fake,
    unused_port,
)
from tests.processes import RelayProcess, db_uri

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


def client(n=64):
    return AsyncHTTPClient(force_instance=True, max_clients=n, defaults={"request_timeout": 60})


async def chat(c, url, stream=False, headers=AUTH, **extra):
    return await c.fetch(url + CHAT, method="POST", raise_error=False, headers=headers,
                         body=json.dumps({"model": "gpt-4", "messages": HI, "stream": stream, **extra}))


# --- the store goes away mid-traffic --------------------------------------------------

async def test_store_outage_refuses_new_work_and_loses_no_charge(embedded, tmp_path, io_loop):
    port = int(embedded.split(":")[2].split("/")[0])
    proxy = await FaultProxy(port).start()
    uri = db_uri(f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true", "outage" + uuid.uuid4().hex[:6])
    store = await open_store(uri)
    direct = await open_store(db_uri(embedded, uri.split("/")[3].split("?")[0]))  # the checker's own view
    await add_key(store, quota=10_000_000)
    fake = start_fake()
    from relay.app import make_app, make_server
    from relay.config import parse_config
    from relay.services import build_services
    # Per request: the journal is that mode's outage path (with leases: tests/test_store_cut.py).
    services = build_services(parse_config(one_upstream_config(fake.base_url, extra="quota: {leases: false}"), {}),
                              store, journal_path=str(tmp_path / "settlements.journal"))
    services.start_maintenance()
    server = make_server(make_app(services))
    relay_port = unused_port()
    server.listen(relay_port, "127.0.0.1")
    url = f"http://127.0.0.1:{relay_port}"
    c = client()
    assert (await chat(c, url)).code == 200  # the key is now known to the auth cache
    fake.state.behaviour.chunk_delay = 0.2
    in_flight = [asyncio.ensure_future(chat(c, url, stream=True)) for _ in range(5)]

    async def reserved_and_streaming():
        holds = (await direct.key_doc(hash_key(TEST_KEY)))["holds"]
        streaming = [r for r in fake.requests if r["stream"] is True and r["chunks_sent_at"]]
        return len(holds) == 5 and len(streaming) == 5
    await eventually(reserved_and_streaming, message="five streams reserved and streaming")
    proxy.cut()
    done = await asyncio.gather(*in_flight)
    assert all(r.code == 200 and r.body.endswith(b"data: [DONE]\n\n") for r in done), "streams finish"
    # Each settlement fails after the driver's 2 s timeout.
    await eventually(lambda: len(services.quota.queue) >= 5, message="their settlements wait in the queue")
    journal = (tmp_path / "settlements.journal").read_text()
    assert journal.count('"op": "settle"') == 5, "and on disk"
    t0 = time.monotonic()
    refused = await chat(c, url)
    assert refused.code == 503 and json.loads(refused.body)["error"]["code"] == "store_unavailable"
    assert time.monotonic() - t0 < 10
    assert fake.count() == 6, "nothing is forwarded without a reservation"
    proxy.restore()
    await eventually(lambda: len(services.quota.queue) == 0, timeout=20,
                     message="queued settlements are replayed when the store returns")
    fake.state.behaviour.chunk_delay = 0
    assert (await chat(c, url)).code == 200
    await settled(direct, services)
    entries = await direct.ledger_entries()
    assert len(entries) == 7 and len({e["_id"] for e in entries}) == 7, "each charge exactly once"
    await assert_conserved(direct)
    server.stop()
    await services.close()
    await close_client(store.client)
    await close_client(direct.client)
    await proxy.stop()
    fake.stop()
    c.close()


async def test_journal_is_replayed_by_a_restarted_process(embedded, tmp_path, io_loop):
    """A settlement queued to disk before a crash is applied by the next process."""
    from relay.metering.ledger import LedgerEntry, utc_now
    from relay.quota.journal import SettlementQueue
    store = await open_store(db_uri(embedded, "journal" + uuid.uuid4().hex[:6]))
    await add_key(store, quota=1000)
    h = hash_key(TEST_KEY)
    held = await store.reserve(h, "req_crashed", 10, 600)
    path = str(tmp_path / "j.journal")
    SettlementQueue(store, path).put_settle(LedgerEntry("req_crashed", h, "gpt-4", "p", 8, 10, 560, 200, 5.0, 1.0,
                                                        True, utc_now()), held)
    # The journal as a process killed after applying it but before writing its "done" line leaves it.
    shutil.copy(path, str(tmp_path / "j-before-replay.journal"))
    replay = SettlementQueue(store, path)  # a new process reads the journal
    assert len(replay) == 1 and await replay.drain()
    assert (await store.key_doc(h))["used"] == 560, "the replay applied the settlement"
    assert len(SettlementQueue(store, path)) == 0, "a replayed journal holds nothing for the next process"
    again = SettlementQueue(store, str(tmp_path / "j-before-replay.journal"))
    assert len(again) == 1 and await again.drain(), "replayed a second time..."
    doc = await store.key_doc(h)
    assert (doc["used"], doc["reserved"], doc["balance"]) == (560, 0, 1000 - 560), "...it charges nothing twice"
    assert await store.ledger_total(h) == 560
    await assert_conserved(store)
    await close_client(store.client)


# --- graceful shutdown ---------------------------------------------------------------

async def test_sigterm_lets_streams_in_flight_finish(embedded, tmp_path, io_loop):
    uri = db_uri(embedded, "drain" + uuid.uuid4().hex[:6])
    store = await open_store(uri)
    await add_key(store, quota=10_000_000)
    fake = start_fake()
    fake.state.behaviour.chunk_delay = 0.15  # about 1.7 s per stream
    relay = await RelayProcess(one_upstream_config(fake.base_url), tmp_path, "--mongodb-uri", uri,
                               "--data-dir", str(tmp_path / "d")).start()
    c = client()
    streams = [asyncio.ensure_future(chat(c, relay.url, stream=True)) for _ in range(12)]
    await eventually(lambda: sum(1 for r in fake.requests if r["stream"] is True and r["chunks_sent_at"]) == 12,
                     message="all twelve streams under way")
    relay.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", relay.port), timeout=1).close()
        except OSError:
            return True
        return False
    await eventually(refused, timeout=5, message="no longer accepting after SIGTERM")
    results = await asyncio.gather(*streams)
    broken = [r for r in results if r.code != 200 or not r.body.endswith(b"data: [DONE]\n\n")]
    assert broken == [], "zero broken streams under a shutdown that fits the drain time"
    await eventually(lambda: relay.proc.poll() is not None, message="relay exits once drained")
    assert relay.proc.returncode == 0, relay.log()
    assert "draining 12 request(s)" in relay.log()
    await assert_conserved(store)
    assert len(await store.ledger_entries()) == 12
    await close_client(store.client)
    fake.stop()
    c.close()


# --- slow and hostile clients ----------------------------------------------------------

async def test_slow_header_and_slow_body_clients_time_out(io_loop):
    fake = start_fake()
    store = mock_store()
    await add_key(store)
    url, server, services = await serve(one_upstream_config(fake.base_url), store, client_timeout_s=0.5,
                                        body_timeout_s=0.5)
    port = int(url.rsplit(":", 1)[1])

    def linger(payload: bytes) -> float:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(payload)
            t0 = time.monotonic()
            while s.recv(4096):
                pass
            return time.monotonic() - t0

    loop = asyncio.get_running_loop()
    slow_header = await loop.run_in_executor(None, linger, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    assert slow_header < 3, "a client that never finishes its headers is cut"
    slow_body = await loop.run_in_executor(None, linger, (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
        "Content-Length: 100\r\n\r\n{").encode())
    assert slow_body < 3, "a client that never finishes its body is cut"
    assert fake.requests == []
    server.stop()
    await services.close()
    fake.stop()


async def test_thousands_of_idle_connections_do_not_starve_others(io_loop):
    fake = start_fake()
    store = mock_store()
    await add_key(store)
    url, server, services = await serve(one_upstream_config(fake.base_url), store)
    port = int(url.rsplit(":", 1)[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(2000, (soft - 200) // 2)
    idle = []
    for _ in range(n):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        idle.append(w)
    await eventually(lambda: len(server._connections) >= n, message="relay holds every idle connection")
    c = client()
    t0 = time.monotonic()
    assert (await chat(c, url)).code == 200
    assert time.monotonic() - t0 < 2, f"served promptly beside {n} idle connections"
    for w in idle:
        w.close()
    server.stop()
    await services.close()
    fake.stop()
    c.close()


async def test_a_slow_reader_does_not_make_relay_buffer_without_bound(embedded, tmp_path, io_loop):
    uri = db_uri(embedded, "slow" + uuid.uuid4().hex[:6])
    store = await open_store(uri)
    await add_key(store, quota=10**9)
    fake = start_fake()
    relay = await RelayProcess(one_upstream_config(fake.base_url), tmp_path, "--mongodb-uri", uri).start()

    def rss_mb() -> float:
        with open(f"/proc/{relay.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    c = client()
    fake.state.behaviour.reply_tokens = 10
    assert (await chat(c, relay.url, stream=True)).code == 200  # warm: token tables, connections
    # A ~25 MB stream, sent as fast as the fake can: more than the kernel's buffers on the way
    # can hold (relay's upstream socket bounded at 1 MiB, the fake's and relay's send buffers
    # up to tcp_wmem's 4 MiB each; ~7 MB was sent here), so the fake finishing means relay
    # read it all.
    fake.state.behaviour.reply_tokens = 150_000
    baseline = rss_mb()
    body = json.dumps({"model": "gpt-4", "stream": True, "messages": HI, "max_tokens": 150_000}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port, limit=1024)
    writer.transport.set_write_buffer_limits(0)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write((f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    await writer.drain()
    peak = baseline
    got = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4:  # read about 2 KB per 50 ms while the upstream pushes megabytes
        got += len(await reader.read(2048))
        peak = max(peak, rss_mb())
        await asyncio.sleep(0.05)  # the slow reading is the point of the test
    sent = len(fake.requests[-1]["chunks_sent_at"])
    assert got < 1_000_000 and sent < 150_000, "the upstream is held back, not buffered in relay"
    assert peak - baseline < 30, f"relay's memory grew {peak - baseline:.1f} MB for a slow reader"
    writer.close()
    await relay.stop()
    fake.stop()
    c.close()
    await close_client(store.client)


# --- hostile keys ------------------------------------------------------------------------

async def test_repeated_bad_keys_are_slowed_without_hurting_others(io_loop):
    fake = start_fake()
    store = mock_store()
    await add_key(store)
    text = one_upstream_config(fake.base_url)
    from relay.app import make_app
    from relay.config import parse_config
    from relay.net import parse_trusted
    from relay.services import build_services
    services = build_services(parse_config(text, {}), store, trusted_proxies=parse_trusted(["127.0.0.1"]))
    services.throttle = FailedAuthThrottle(max_failures=5, window_s=60, delay_s=0.3)
    port = unused_port()
    server = make_app(services).listen(port, "127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    c = client()
    attacker = {"X-Forwarded-For": "203.0.113.66"}
    bad = {**attacker, "Authorization": "Bearer ak-" + "g" * 40}
    codes = [(await chat(c, url, headers=bad)).code for _ in range(5)]
    assert codes == [401] * 5
    t0 = time.monotonic()
    slowed = await chat(c, url, headers=bad)
    assert slowed.code == 429 and json.loads(slowed.body)["error"]["code"] == "too_many_failed_attempts"
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()
    assert (await chat(c, url, headers={**attacker, **AUTH})).code == 200, "a good key is served at once"
    assert time.monotonic() - t0 < 0.3
    other = {"X-Forwarded-For": "198.51.100.7", "Authorization": "Bearer ak-" + "h" * 40}
    assert (await chat(c, url, headers=other)).code == 401, "other addresses are untouched"
    server.stop()
    await services.close()
    fake.stop()
    c.close()


# --- upstreams that lie -------------------------------------------------------------------

@pytest.mark.parametrize("broken", ["invalid_json", "html"])
async def test_a_200_that_is_not_json_is_a_clean_502_and_refunded(broken, io_loop):
    fake = start_fake()
    store = mock_store()
    await add_key(store)
    url, server, services = await serve(one_upstream_config(fake.base_url), store)
    fake.state.behaviour.broken = broken
    c = client()
    for stream in (False, True):
        resp = await chat(c, url, stream=stream)
        assert resp.code == 502 and json.loads(resp.body)["error"]["type"] == "upstream_error"
    await settled(store, services)
    assert (await store.key_doc(hash_key(TEST_KEY)))["used"] == 0
    await assert_conserved(store)
    server.stop()
    await services.close()
    fake.stop()
    c.close()


async def test_sse_garbage_is_filtered_and_the_stream_charged_right(io_loop):
    fake = start_fake()
    store = mock_store()
    await add_key(store)
    url, server, services = await serve(one_upstream_config(fake.base_url), store)
    fake.state.behaviour.broken = "sse_garbage"
    sdk = AsyncOpenAI(base_url=url + "/v1", api_key=TEST_KEY, max_retries=0)
    parts = [ch.choices[0].delta.content async for ch in await sdk.chat.completions.create(
        model="gpt-4", messages=HI, stream=True) if ch.choices and ch.choices[0].delta.content]
    assert "".join(parts) == "Hello from the fake upstream, relay says hi!"
    await settled(store, services)
    [e] = await store.ledger_entries()
    assert (e["completion_tokens"], e["cost"]) == (10, 560)
    await sdk.close()
    server.stop()
    await services.close()
    fake.stop()


# --- secrets ---------------------------------------------------------------------------------

async def test_no_key_or_content_anywhere_after_a_mixed_workload(caplog, io_loop):
    caplog.set_level(logging.DEBUG)
    fake = start_fake()
    store = mock_store()
    await add_key(store)
    admin = "admin-" + uuid.uuid4().hex
    url, server, services = await serve(one_upstream_config(fake.base_url), store, admin_token=admin)
    c = client()
    marker = "SECRET-CONTENT-" + uuid.uuid4().hex
    bodies = []
    msgs = [{"role": "user", "content": marker}]
    for stream in (False, True):
        bodies.append((await c.fetch(url + CHAT, method="POST", headers=AUTH, raise_error=False, body=json.dumps(
            {"model": "gpt-4", "messages": msgs, "stream": stream}))).body)
    for status in (400, 401, 429, 500):  # the fake's errors echo the upstream key back
        fake.state.behaviour.status = status
        bodies.append((await c.fetch(url + CHAT, method="POST", headers=AUTH, raise_error=False,
                                     body=json.dumps({"model": "gpt-4", "messages": msgs}))).body)
    fake.state.behaviour.status = None
    bodies.append((await c.fetch(url + "/v1/embeddings", method="POST", headers=AUTH, raise_error=False,
                                 body=json.dumps({"model": "text-embedding-ada-002", "input": marker}))).body)
    client_facing = b"\n".join(bodies).decode()
    created = json.loads((await c.fetch(url + "/admin/keys", method="POST", headers={
        "Authorization": f"Bearer {admin}"}, body=json.dumps({"quota": 5}))).body)
    new_key = created.pop("key")
    for path in ("/admin/keys", f"/admin/keys/{TEST_KEY}", "/admin/upstreams"):
        bodies.append((await c.fetch(url + path, headers={"Authorization": f"Bearer {admin}"})).body)
    bodies.append((await c.fetch(url + "/metrics")).body)
    await settled(store, services)
    docs = []
    for name in ("keys", "ledger", "grants", "processes"):
        docs += await store.db[name].find({}).to_list(None)
    haystacks = {"logs": caplog.text, "bodies": b"\n".join(bodies).decode(), "store": repr(docs)}
    for where, text in haystacks.items():
        for secret in (TEST_KEY, new_key, UPSTREAM_KEY, marker, admin):
            assert secret not in text, (where, secret[:12])
    # The masked form ends in the key's last four characters; alone, "0001" also turns up in
    # timestamps ("created": 1796000107), so look for it the way a key would show.
    for shown in (mask_key(UPSTREAM_KEY), UPSTREAM_KEY[-8:]):
        assert shown not in client_facing, "not even the masked form reaches clients"
        assert shown not in haystacks["logs"]
    server.stop()
    await services.close()
    fake.stop()
    c.close()


async def test_background_loops_stop_even_when_a_cancellation_is_swallowed(io_loop):
    """A cancellation inside a driver call can surface as the driver's own error, which a
    maintenance loop catches and logs before it goes round again."""
    from relay.background import stop_tasks
    rounds = []

    async def maintenance_loop():
        while True:
            try:
                rounds.append(1)
                await asyncio.sleep(0.01)  # a store call... (a stand-in, not a wait for anything)
            except asyncio.CancelledError:
                pass  # ...that turned the cancellation into its own error, caught like any store failure
            await asyncio.sleep(0.01)  # the loop's pause between rounds

    release = asyncio.Event()

    async def stuck_for_good():
        while not release.is_set():
            try:
                await asyncio.sleep(10)  # a task that never ends by itself
            except asyncio.CancelledError:
                pass
    tasks = [asyncio.ensure_future(maintenance_loop()), asyncio.ensure_future(stuck_for_good())]
    await eventually(lambda: len(rounds) >= 2, message="the loop went round")
    started = time.monotonic()
    left = await stop_tasks(tasks, 1.0)
    assert tasks[0].done() and left == {tasks[1]}
    assert time.monotonic() - started < 3.0, "bounded even for a task that never ends"
    release.set()
    tasks[1].cancel()
    await asyncio.wait([tasks[1]], timeout=1)
