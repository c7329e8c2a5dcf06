"""Leases over the wire: the embedded store, several processes, and a kill -9."""
import asyncio
import json
import signal
import time
import uuid

from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from relay.store.connect import close_client, open_store
from tests.conservation import assert_conserved, settled
from tests.helpers import PRICING, TEST_KEY, add_key, serve, start_fake
from tests.processes import RelayProcess, db_uri

COST = 560


def leased_config(fake) -> str:
    return f"upstreams:\n  - {{name: p, base_url: '{fake.base_url}', keys: [sk-w1]}}\nquota: {{leases: true}}\n{PRICING}"


async def post(c, url, stream=False):
    return await c.fetch(url + "/v1/chat/completions", method="POST", raise_error=False,
                         headers={"Authorization": f"Bearer {TEST_KEY}"},
                         body=json.dumps({"model": "gpt-4", "stream": stream, "max_tokens": 10,
                                          "messages": [{"role": "user", "content": "Hi"}]}))


async def test_leases_conserve_under_concurrency_on_the_embedded_store(embedded, io_loop):
    store = await open_store(db_uri(embedded, "lease" + uuid.uuid4().hex[:6]))
    await add_key(store, quota=COST * 50)
    fake = start_fake()
    url, server, services = await serve(leased_config(fake), store)
    c = AsyncHTTPClient(force_instance=True, max_clients=100)
    before = store.round_trips
    codes = [r.code for r in await asyncio.gather(*(post(c, url, stream=i % 2 == 0) for i in range(100)))]
    assert codes.count(200) == 50 and codes.count(429) == 50
    assert store.round_trips - before < 50, "far fewer store operations than requests"
    server.stop()
    await services.close()
    await settled(store, services)
    doc = await store.key_doc(hash_key(TEST_KEY))
    assert (doc["balance"], doc["used"], doc["reserved"]) == (0, COST * 50, 0)
    await assert_conserved(store)
    await close_client(store.client)
    fake.stop()
    c.close()


async def test_two_processes_with_leases_stay_exact(embedded, tmp_path, io_loop):
    uri = db_uri(embedded, "lease2" + uuid.uuid4().hex[:6])
    store = await open_store(uri)
    await add_key(store, quota=COST * 50)
    fake = start_fake()
    relays = [await RelayProcess(leased_config(fake), tmp_path, "--mongodb-uri", uri,
                                 "--data-dir", str(tmp_path / f"d{i}")).start() for i in range(2)]
    c = AsyncHTTPClient(force_instance=True, max_clients=100)
    codes = [r.code for r in await asyncio.gather(*(post(c, relays[i % 2].url, stream=i % 3 == 0)
                                                    for i in range(100)))]
    ok = codes.count(200)
    assert set(codes) <= {200, 429} and 0 < ok <= 50
    for r in relays:
        await r.stop()  # SIGTERM: each commits and hands its slice back
    await settled(store)
    doc = await store.key_doc(hash_key(TEST_KEY))
    assert doc["used"] == COST * ok and doc["balance"] == COST * (50 - ok) and doc["reserved"] == 0
    await assert_conserved(store)
    await close_client(store.client)
    fake.stop()
    c.close()


async def test_kill_9_with_leases_loses_no_unit(embedded, tmp_path, io_loop):
    uri = db_uri(embedded, "lease9" + uuid.uuid4().hex[:6])
    store = await open_store(uri)
    await add_key(store, quota=10_000_000)
    fake = start_fake()
    relay = await RelayProcess(leased_config(fake), tmp_path, "--mongodb-uri", uri).start()
    c = AsyncHTTPClient(force_instance=True, max_clients=50)
    done = [r.code for r in await asyncio.gather(*(post(c, relay.url) for _ in range(30)))]
    assert set(done) == {200}
    fake.state.behaviour.chunk_delay = 0.2
    streams = [asyncio.ensure_future(post(c, relay.url, stream=True)) for _ in range(5)]
    await asyncio.sleep(0.5)
    await relay.stop(signal.SIGKILL)
    await asyncio.gather(*streams, return_exceptions=True)
    h = hash_key(TEST_KEY)
    assert (await store.key_doc(h))["leases"], "the crash left its slice behind"
    restarted = time.monotonic()
    relay = await RelayProcess(leased_config(fake), tmp_path, "--mongodb-uri", uri).start()
    while any(lease["amount"] for lease in (await store.key_doc(h)).get("leases", {}).values()):
        assert time.monotonic() - restarted < 60, "the dead process's slice is returned within 60 s"
        await asyncio.sleep(0.5)
    await settled(store)
    doc = await store.key_doc(h)
    # The 30 ended half a second (five commit intervals) before the kill: all billed. The 5
    # streams were cut before they ended: none billed, and their holds came back with the slice.
    assert doc["used"] == 30 * COST, "what ended more than a commit interval before the kill is billed"
    assert await store.ledger.count_documents({"key_hash": h}) == 30
    await assert_conserved(store)
    await relay.stop()
    await close_client(store.client)
    fake.stop()
    c.close()


async def test_store_outage_with_leases_keeps_known_keys_served_and_loses_nothing(embedded, io_loop):
    from tests.faultproxy import FaultProxy
    port = int(embedded.split(":")[2].split("/")[0])
    proxy = await FaultProxy(port).start()
    name = "lease_outage" + uuid.uuid4().hex[:6]
    store = await open_store(db_uri(f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true", name))
    direct = await open_store(db_uri(embedded, name))
    await add_key(store, quota=10_000_000)
    fake = start_fake()
    url, server, services = await serve(leased_config(fake), store)
    c = AsyncHTTPClient(force_instance=True, max_clients=20)
    assert (await post(c, url)).code == 200  # the key is known; its process holds a slice
    proxy.cut()
    during = [(await post(c, url, stream=i % 2 == 0)).code for i in range(6)]
    assert during == [200] * 6, "served from the slice while the store is away"
    await asyncio.sleep(0.5)  # commits fail meanwhile and are kept
    assert services.charger.book.wallets[hash_key(TEST_KEY)].batch, "charges wait in memory"
    proxy.restore()
    t0 = time.monotonic()
    while services.charger.book.wallets[hash_key(TEST_KEY)].batch:
        assert time.monotonic() - t0 < 20, "committed once the store is back"
        await asyncio.sleep(0.1)
    server.stop()
    await services.close()
    await settled(direct, services)
    doc = await direct.key_doc(hash_key(TEST_KEY))
    assert doc["used"] == 7 * COST and doc["reserved"] == 0
    assert await direct.ledger.count_documents({}) == 7
    await assert_conserved(direct)
    await close_client(store.client)
    await close_client(direct.client)
    await proxy.stop()
    fake.stop()
    c.close()


async def test_a_repeated_batch_and_a_dead_lease_on_the_embedded_store(embedded, io_loop):
    """The wire server's duplicate-key answer to a repeated insert, and the sweeper's
    deletion of entries whose batch never applied, on the real store."""
    import datetime as dt
    from relay.store import mongo
    from relay.store.mongo import LedgerEntry, MongoStore
    uri = db_uri(embedded, "leasedup" + uuid.uuid4().hex[:6])
    store = await open_store(uri)
    await add_key(store, quota=100_000)
    h = hash_key(TEST_KEY)
    now, elapsed = [mongo.utc_now()], [0.0]
    clocks = {"clock": lambda: now[0], "monotonic": lambda: elapsed[0]}
    dying = MongoStore(store.client, store.db.name, instance_id="p_dying", **clocks)
    sweeper = MongoStore(store.client, store.db.name, instance_id="p_sweeper", **clocks)
    await dying.heartbeat()
    await sweeper.sweep()  # it has seen the other one beat

    def entry(rid, cost):
        return LedgerEntry(rid, h, "gpt-4", "p", 8, 10, cost, 200, 1.0, 1.0, False, now[0])
    held = await dying.open_lease(h, "lease-d", 0, 10_000)
    first = await dying.commit_lease(h, "lease-d", held, 0, [entry("a", 300), entry("b", 200)], 0, 0)
    again = await dying.commit_lease(h, "lease-d", held, 0, [entry("a", 300), entry("b", 200)], 0, 0)
    assert first == again == held - 500
    assert await store.ledger.count_documents({"key_hash": h}) == 2
    # Killed between the next batch's insert and its charge:
    await store.ledger.insert_one(mongo._ledger_doc(entry("c", 400), lease="lease-d", lseq=1))
    assert await store.ledger_total(h) == 900
    now[0] += dt.timedelta(seconds=mongo.DEAD_AFTER_S + 1)
    elapsed[0] += mongo.DEAD_AFTER_S + 1
    await sweeper.heartbeat()
    assert await sweeper.sweep() == 1
    doc = await store.key_doc(h)
    assert (doc["used"], doc["balance"], doc["reserved"]) == (500, 99_500, 0)
    assert await store.ledger_total(h) == 500, "the entry nobody paid for is gone"
    await assert_conserved(store)
    await close_client(store.client)
