"""Key changes by change stream (relay/store/changes.py), on one machine: two relay processes
on the embedded store, a change through one (or the CLI) applied by the other within 1 s; the
stream resumes after a broken connection without missing a change; a store that cannot stream
changes leaves the 2 s cache in charge and says so."""
import asyncio
import json
import subprocess
import time
import uuid

import pytest
from tornado.httpclient import AsyncHTTPClient

from relay.auth import Authenticator
from relay.keys import hash_key
from relay.store.base import KeyRecord
from relay.store.changes import EMPTY_EVERY_S, KeyWatcher
from relay.store.connect import close_client, open_store
from relay.store.embedded import _answers, _server_command
from tests.conftest import ADMIN_TOKEN
from tests.conservation import assert_conserved
from tests.faultproxy import FaultProxy
from tests.helpers import PRICING, TEST_KEY, add_key, eventually, start_fake, unused_port
from tests.processes import RelayProcess, db_uri, relay_cli

APPLIED_WITHIN_S = 1.0  # the bound for a change made on one host to apply on another
COST = 560              # a gpt-4 chat of the fake upstream with max_tokens 10: 8 prompt + 10 completion tokens


def config(fake) -> str:
    return f"upstreams:\n  - {{name: p, base_url: '{fake.base_url}', keys: [sk-w1]}}\n{PRICING}"


async def chat(c, url: str, key: str = TEST_KEY) -> int:
    r = await c.fetch(url + "/v1/chat/completions", method="POST", raise_error=False,
                      headers={"Authorization": f"Bearer {key}"},
                      body=json.dumps({"model": "gpt-4", "max_tokens": 10,
                                       "messages": [{"role": "user", "content": "Hi"}]}))
    return r.code


async def admin(c, url: str, path: str, body: dict | None = None) -> dict:
    r = await c.fetch(url + "/admin/keys/" + path, method="POST", body=json.dumps(body or {}),
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    return json.loads(r.body)


POLL_S = 0.05  # between chats: a disabled key's 401s count toward the address's bad-key limit (20 a minute)


async def until_code(c, url: str, code: int, within_s: float = 5.0) -> float:
    """Chats with ``url`` every ``POLL_S`` until one gets ``code``; seconds it took."""
    started = time.monotonic()
    while (got := await chat(c, url)) != code:
        assert time.monotonic() - started < within_s, f"still {got} after {within_s} s, not {code}"
        await asyncio.sleep(POLL_S)
    return time.monotonic() - started


@pytest.fixture
def two_relays(embedded, tmp_path, io_loop):
    """Relays A and B as processes on one embedded store (their own database), TEST_KEY funded."""
    uri = db_uri(embedded, "changes" + uuid.uuid4().hex[:6])
    fake = start_fake()
    env = {"RELAY_ADMIN_TOKEN": ADMIN_TOKEN}
    relays = [RelayProcess(config(fake), tmp_path, "--mongodb-uri", uri, "--data-dir", str(tmp_path / name), env=env)
              for name in ("a", "b")]
    yield uri, relays
    for r in relays:
        io_loop.run_sync(r.stop)
    fake.stop()


@pytest.mark.timeout(seconds=120)
async def test_a_change_through_one_relay_applies_on_the_other_within_a_second(two_relays, tmp_path, io_loop):
    uri, (a, b) = two_relays
    store = await open_store(uri)
    c = AsyncHTTPClient(force_instance=True)
    try:
        await add_key(store, quota=COST * 30)
        await a.start()
        await b.start()
        assert await chat(c, b.url) == 200  # B has the key cached, and a slice of it
        assert "following the store's change stream" in b.log()
        prefix = TEST_KEY[:10]

        await admin(c, a.url, prefix + "/disable")
        disabled = await until_code(c, b.url, 401, within_s=APPLIED_WITHIN_S)
        await admin(c, a.url, prefix + "/enable")
        enabled = await until_code(c, b.url, 200, within_s=APPLIED_WITHIN_S)

        # The CLI writes to the store and leaves: only the stream tells the relays.
        done = await asyncio.get_running_loop().run_in_executor(
            None, lambda: relay_cli("keys", "disable", prefix, "--mongodb-uri", uri))
        assert done.returncode == 0, done.stderr
        by_cli = await until_code(c, b.url, 401, within_s=APPLIED_WITHIN_S)
        await admin(c, a.url, prefix + "/enable")
        await until_code(c, b.url, 200, within_s=APPLIED_WITHIN_S)

        # A top-up through A lets B serve a key it had found exhausted, at once.
        while await chat(c, b.url) == 200:
            pass
        await admin(c, a.url, prefix + "/topup", {"quota": COST * 5})
        topped = await until_code(c, b.url, 200, within_s=APPLIED_WITHIN_S)
        print(f"\napplied on the other relay: disable {disabled * 1000:.0f} ms, enable {enabled * 1000:.0f} ms, "
              f"disable by the CLI {by_cli * 1000:.0f} ms, top-up {topped * 1000:.0f} ms")
        await a.stop()
        await b.stop()
        await assert_conserved(store)
    finally:
        await close_client(store.client)
        c.close()


async def test_a_store_without_change_streams_falls_back_to_the_cache_and_says_so(tmp_path, io_loop):
    """A standalone server (no replica set) refuses ``watch``: one log line at start-up, and a
    change made elsewhere applies within the 2 s cache, as before."""
    port = unused_port()
    with open(tmp_path / "standalone.log", "wb") as out:
        server = subprocess.Popen([*_server_command(port, str(tmp_path / "standalone")), "--standalone"],
                                  stdout=out, stderr=out, start_new_session=True)
    uri = f"mongodb://127.0.0.1:{port}/relay?directConnection=true"
    fake = start_fake()
    relay = RelayProcess(config(fake), tmp_path, "--mongodb-uri", uri, "--data-dir", str(tmp_path / "r"))
    c = AsyncHTTPClient(force_instance=True)
    store = None
    try:
        await eventually(lambda: _answers(uri), timeout=30, interval=0.2, message="the standalone server answers")
        store = await open_store(uri)
        await add_key(store, quota=COST * 100)
        await relay.start()
        await eventually(lambda: "key changes:" in relay.log(), message="the start-up line")
        lines = [line for line in relay.log().splitlines() if "key changes:" in line]
        assert len(lines) == 1 and "does not stream changes (code 40573" in lines[0] \
            and "within the 2 s key cache" in lines[0], lines
        assert await chat(c, relay.url) == 200
        await store.set_status(hash_key(TEST_KEY), "disabled")
        took = await until_code(c, relay.url, 401, within_s=2.0 + 1.0)
        print(f"\nwithout a change stream a disable applied after {took:.2f} s (the cache: 2 s)")
        await relay.stop()
        await assert_conserved(store)
    finally:
        await relay.stop()
        if store is not None:
            await close_client(store.client)
        server.terminate()
        server.wait(20)
        fake.stop()
        c.close()


async def test_the_stream_resumes_after_a_cut_without_missing_a_change(embedded, io_loop):
    """A change made while the watcher's connection is cut arrives once it is back: the stream
    is resumed from its token, not started afresh (which would have missed it)."""
    port = int(embedded.split(":")[2].split("/")[0])
    proxy = await FaultProxy(port).start()
    db = "resume" + uuid.uuid4().hex[:6]
    direct = await open_store(db_uri(embedded, db))
    watched = await open_store(db_uri(f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true", db))
    seen: list[str] = []
    resets: list[float] = []
    watcher = KeyWatcher(watched, seen.append, on_reset=lambda: resets.append(time.monotonic()))
    task = asyncio.ensure_future(watcher.run())
    try:
        await eventually(lambda: watcher.watching, message="the stream opens")
        key = await add_key(direct, quota=1000)  # an insert: a change
        await eventually(lambda: hash_key(key) in seen, message="the new key is seen")

        # Money bookkeeping is not a change: a lease taken, committed and returned, a sweep note.
        before = len(seen)
        await direct.open_lease(hash_key(key), "lease-x-1", 10, 100)
        await direct.commit_lease(hash_key(key), "lease-x-1", 100, 0, [], 100, 0)
        await direct.keys.update_one({"_id": hash_key(key)}, {"$inc": {"days.2026-01-01.cost": 0}})
        await direct.set_status(hash_key(key), "disabled")  # a change, after them: all of them have passed
        await eventually(lambda: len(seen) > before, message="the disable is seen")
        assert seen[before:] == [hash_key(key)], "only the disable, none of the money updates"

        proxy.cut()  # every connection dropped, new ones refused
        await eventually(lambda: not watcher.watching, message="the watcher finds the stream broken")
        await direct.topup(hash_key(key), 500)  # made while the watcher cannot hear
        await asyncio.sleep(0.5)  # (only to show the change waits: nothing arrives while cut)
        assert seen.count(hash_key(key)) == 2
        proxy.restore()
        await eventually(lambda: seen.count(hash_key(key)) == 3, message="the top-up arrives after the cut")
        assert watcher.watching and watcher.opened >= 2 and len(resets) == 1, \
            "resumed from its token: no fresh start, nothing missed"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await close_client(direct.client)
        await close_client(watched.client)
        await proxy.stop()


async def test_money_writes_do_not_make_the_watcher_ask_many_times_a_second(embedded, io_loop):
    """The embedded store answers a waiting getMore at once, empty, for every write the filter
    drops; group commits write ~10 times a second per process. The watcher asks again no sooner
    than EMPTY_EVERY_S after an empty answer (each ask is a round trip on relay's loop), and a
    real change made among the money writes still arrives within a second."""
    db = "paced" + uuid.uuid4().hex[:6]
    store = await open_store(db_uri(embedded, db))
    seen: list[float] = []  # when each change arrived
    watcher = KeyWatcher(store, lambda key_hash: seen.append(time.monotonic()))
    task = asyncio.ensure_future(watcher.run())
    try:
        key = await add_key(store, quota=1000)
        await eventually(lambda: watcher.watching and seen, message="the stream opens and sees the new key")
        empty_before, started = watcher.empty, time.monotonic()
        changed_at = None
        for i in range(80):  # 40 money writes a second for 2 s, the key disabled halfway
            await store.keys.update_one({"_id": hash_key(key)}, {"$inc": {"used": 1}})
            if i == 40:
                changed_at = time.monotonic()
                await store.set_status(hash_key(key), "disabled")
            await asyncio.sleep(0.025)
        elapsed = time.monotonic() - started
        asks = watcher.empty - empty_before
        assert asks <= elapsed / EMPTY_EVERY_S + 2, f"{asks} empty answers in {elapsed:.1f} s"
        assert len(seen) == 2 and seen[1] - changed_at < APPLIED_WITHIN_S, "the disable arrives within a second"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await close_client(store.client)


async def test_a_lookup_that_overlaps_a_change_is_not_trusted_for_long(io_loop):
    """The stream lengthens the cache; a lookup read before a change that the stream announced
    while the lookup was on its way must not be kept for that long."""
    gate = asyncio.Event()
    record = KeyRecord("h", "ak-xxxxxxx", "active")

    class SlowStore:
        async def find_key(self, key_hash: str) -> KeyRecord:
            await gate.wait()
            return record

    auth = Authenticator(SlowStore(), ttl_s=30.0)
    lookup = asyncio.ensure_future(auth.lookup("h"))
    await asyncio.sleep(0)
    auth.forget("h")  # the key changed while the lookup was reading it
    gate.set()
    assert await lookup is record
    assert auth._cache["h"][0] <= time.monotonic(), "kept for an outage, but asked again next time"
    assert await auth.lookup("h") is record
    assert auth._cache["h"][0] > time.monotonic() + 20, "an undisturbed lookup is trusted for the TTL"
    auth.set_ttl(2.0)
    assert auth._cache["h"][0] <= time.monotonic() + 2.0, "a shorter TTL applies to what is cached"

