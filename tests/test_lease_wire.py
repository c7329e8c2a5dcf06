"""Leases over the wire: the embedded store, several processes, and a kill -9."""
import asyncio
import datetime as dt
import json
import signal
import time
import uuid

from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from relay.metering.ledger import ledger_page, utc_now
from relay.quota.lease_book import COMMIT_EVERY_S
from relay.store.connect import close_client, open_store
from relay.store.leases import TOMBSTONE_SEQ
from relay.store.mongo import MongoStore
from relay.store.recovery import DEAD_AFTER_S
from tests.conservation import assert_conserved, settled
from tests.helpers import PRICING, TEST_KEY, add_key, eventually, serve, start_fake
from tests.processes import RelayProcess, db_uri

COST = 560


def leased_config(fake) -> str:
    return (f"upstreams:\n  - {{name: p, base_url: '{fake.base_url}', keys: [sk-w1]}}\n"
            f"quota: {{leases: true}}\n{PRICING}")


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


CLIENTS = 8  # concurrent clients of the kill -9 test, each sending one request after another
UNBILLED_BOUND_S = 2 * COMMIT_EVERY_S + 0.3  # two group commits, and a margin for a loaded machine


async def test_kill_9_with_leases_loses_no_unit(embedded, tmp_path, io_loop):
    """Requests run right up to a kill -9: what was answered more than a group commit or two
    before it is billed, what went unbilled is measured, and the sweeper returns the slice
    with every unit that was not spent."""
    uri = db_uri(embedded, "lease9" + uuid.uuid4().hex[:6])
    store = await open_store(uri)
    await add_key(store, quota=10_000_000)
    h = hash_key(TEST_KEY)
    fake = start_fake()
    relay = await RelayProcess(leased_config(fake), tmp_path, "--mongodb-uri", uri).start()
    c = AsyncHTTPClient(force_instance=True, max_clients=CLIENTS)
    answered: dict[str, float] = {}  # request id -> when its whole 200 response had arrived
    killing = asyncio.Event()

    async def steady_client(i: int) -> None:
        n = 0
        while not killing.is_set():
            stream = (i + n) % 2 == 0
            n += 1
            try:
                r = await post(c, relay.url, stream=stream)
            except Exception as exc:  # cut by the kill: reset, refused, stream closed
                assert killing.is_set(), exc
                continue
            if r.code == 200 and (not stream or r.body.endswith(b"data: [DONE]\n\n")):
                answered[r.headers["X-Request-Id"]] = time.monotonic()
            elif not killing.is_set():
                raise AssertionError(f"{r.code} {r.body[:200]!r}")

    clients = [asyncio.ensure_future(steady_client(i)) for i in range(CLIENTS)]
    # Steady traffic for a while (several commits, slice top-ups), then the kill, mid-stream.
    await eventually(lambda: len(answered) >= 500 or any(t.done() for t in clients), timeout=30,
                     message="steady traffic")
    assert not any(t.done() for t in clients), [t.exception() for t in clients if t.done()]
    relay.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    killing.set()
    await relay.stop(signal.SIGKILL)  # waits for the process to be gone
    await asyncio.gather(*clients)
    left = (await store.key_doc(h)).get("leases", {})
    assert any(lease["amount"] > 0 for lease in left.values()), "the crash left its slice behind"

    # The sweeper (here a store of this test's, whose own clock is moved past DEAD_AFTER_S
    # after it has seen the dead process's last heartbeat) returns the slice. Each pass also
    # deletes ledger entries of batches that never applied, so pass again until the store is
    # quiet: the dead process's last writes may still be reaching the server.
    elapsed = [0.0]
    sweeper = MongoStore(store.client, store.db.name, instance_id="p_test_sweeper", monotonic=lambda: elapsed[0])
    await sweeper.sweep()
    elapsed[0] += DEAD_AFTER_S + 1

    async def swept_and_quiet():
        await sweeper.sweep()
        doc = await store.key_doc(h)
        returned = all(lease["seq"] == TOMBSTONE_SEQ for lease in doc.get("leases", {}).values())
        return returned and doc["reserved"] == 0 and doc["used"] == await store.ledger_total(h)
    await eventually(swept_and_quiet, timeout=20, interval=0.2, message="the dead process's slice is returned")
    await assert_conserved(store)  # granted = balance + used, reserved 0, used = Σ ledger: no unit lost

    billed = {e["_id"] for e in await store.ledger_entries(h)}
    unbilled = sorted(answered[r] for r in answered if r not in billed)
    last_answered = max(answered.values())
    last_billed = max(t for r, t in answered.items() if r in billed)
    window = last_answered - last_billed
    oldest_unbilled_age = killed_at - unbilled[0] if unbilled else 0.0
    doc = await store.key_doc(h)
    print(f"\nkill -9 under load: {len(answered)} answered 200, {len(billed)} billed, "
          f"{len(unbilled)} answered but unbilled ({len(unbilled) * COST} units); "
          f"{len(billed - set(answered))} billed without a whole answer (cut by the kill); "
          f"last billed answer {window * 1000:.0f} ms before the last answer; oldest unbilled answer "
          f"{oldest_unbilled_age * 1000:.0f} ms before the kill; last answer seen "
          f"{(last_answered - killed_at) * 1000:+.0f} ms from the kill; "
          f"granted {doc['granted']} = balance {doc['balance']} + used {doc['used']}")
    assert killed_at - last_answered < 1.0, "requests ran right up to the kill"
    assert window <= UNBILLED_BOUND_S, f"{window * 1000:.0f} ms of answered requests went unbilled"
    assert oldest_unbilled_age <= UNBILLED_BOUND_S, \
        f"a request answered {oldest_unbilled_age * 1000:.0f} ms before the kill went unbilled"
    assert doc["balance"] == doc["granted"] - COST * len(billed), "every unit not billed is back on the balance"
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
    failed_commits = []
    observe = store.observe

    def watch(op: str, seconds: float, ok: bool) -> None:
        if op == "commit_lease" and not ok:
            failed_commits.append(seconds)
        observe(op, seconds, ok)
    store.observe = watch
    c = AsyncHTTPClient(force_instance=True, max_clients=20)
    assert (await post(c, url)).code == 200  # the key is known; its process holds a slice
    proxy.cut()
    during = [(await post(c, url, stream=i % 2 == 0)).code for i in range(6)]
    assert during == [200] * 6, "served from the slice while the store is away"
    await eventually(lambda: failed_commits, message="a group commit failed while the store was away")
    assert services.quota.book.wallets[hash_key(TEST_KEY)].batch, "charges wait in memory"
    proxy.restore()
    await eventually(lambda: not services.quota.book.wallets[hash_key(TEST_KEY)].batch, timeout=20,
                     message="committed once the store is back")
    server.stop()
    await services.close()
    await settled(direct, services)
    doc = await direct.key_doc(hash_key(TEST_KEY))
    assert doc["used"] == 7 * COST and doc["reserved"] == 0
    assert len(await direct.ledger_entries()) == 7
    await assert_conserved(direct)
    await close_client(store.client)
    await close_client(direct.client)
    await proxy.stop()
    fake.stop()
    c.close()


async def test_a_repeated_batch_and_a_dead_lease_on_the_embedded_store(embedded, io_loop):
    """The wire server's duplicate-key answer to a repeated insert, and the sweeper's
    deletion of entries whose batch never applied, on the real store."""
    from relay.metering.ledger import LedgerEntry
    from relay.store.mongo import MongoStore
    from relay.store.recovery import DEAD_AFTER_S
    uri = db_uri(embedded, "leasedup" + uuid.uuid4().hex[:6])
    store = await open_store(uri)
    await add_key(store, quota=100_000)
    h = hash_key(TEST_KEY)
    now, elapsed = [utc_now()], [0.0]
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
    assert len(await store.ledger_entries(h)) == 2
    # Killed between the next batch's insert and its charge:
    await store.ledger.insert_one(ledger_page([entry("c", 400)], "lease-d", 1, 0))
    assert await store.ledger_total(h) == 900
    now[0] += dt.timedelta(seconds=DEAD_AFTER_S + 1)
    elapsed[0] += DEAD_AFTER_S + 1
    await sweeper.heartbeat()
    assert await sweeper.sweep() == 1
    doc = await store.key_doc(h)
    assert (doc["used"], doc["balance"], doc["reserved"]) == (500, 99_500, 0)
    assert await store.ledger_total(h) == 500, "the entry nobody paid for is gone"
    await assert_conserved(store)
    await close_client(store.client)


async def test_the_sweepers_repeated_discards_read_only_the_swept_leases_entries(embedded, io_loop):
    """Every sweep deletes a tombstone's unapplied entries again, for the tombstone's six
    hours. Each pass must read that lease's entries only: a filter on the key and a time
    bound read every entry of the key since then (with a few hours of one key's traffic, the
    store spent whole seconds per pass and stopped answering)."""
    from relay.metering.ledger import LedgerEntry
    uri = db_uri(embedded, "leasescan" + uuid.uuid4().hex[:6])
    store = await open_store(uri)
    await add_key(store, quota=10**9)
    h = hash_key(TEST_KEY)
    now, elapsed = [utc_now()], [0.0]
    clocks = {"clock": lambda: now[0], "monotonic": lambda: elapsed[0]}
    dying = MongoStore(store.client, store.db.name, instance_id="p_dying", **clocks)
    live = MongoStore(store.client, store.db.name, instance_id="p_live", **clocks)
    sweeper = MongoStore(store.client, store.db.name, instance_id="p_sweeper", **clocks)
    await dying.heartbeat()
    await live.heartbeat()
    await sweeper.sweep()

    def entry(rid, cost):
        return LedgerEntry(rid, h, "gpt-4", "p", 8, 10, cost, 200, 1.0, 1.0, False, now[0])
    held = await dying.open_lease(h, "lease-p_dying-1", 0, 10_000)
    await dying.commit_lease(h, "lease-p_dying-1", held, 0, [entry("d0", 300)], 0, 0)
    await store.ledger.insert_one(ledger_page([entry("d1", 400)], "lease-p_dying-1", 1, 0))  # killed here
    # The live process's traffic on the same key, before and after the sweep.
    held_live = await live.open_lease(h, "lease-p_live-1", 0, 10**6)
    seq, batch = 0, 200
    for _ in range(3):
        entries = [entry(f"l{seq}-{i}", 1) for i in range(batch)]
        held_live = await live.commit_lease(h, "lease-p_live-1", held_live, seq, entries, 0, 0)
        seq += 1
    now[0] += dt.timedelta(seconds=DEAD_AFTER_S + 1)
    elapsed[0] += DEAD_AFTER_S + 1
    await live.heartbeat()
    await sweeper.heartbeat()
    assert await sweeper.sweep() == 1
    for _ in range(3):
        entries = [entry(f"l{seq}-{i}", 1) for i in range(batch)]
        held_live = await live.commit_lease(h, "lease-p_live-1", held_live, seq, entries, 0, 0)
        seq += 1
    # A stalled process's batch lands after the sweep: the next pass deletes it.
    await store.ledger.insert_one(ledger_page([entry("d2", 500)], "lease-p_dying-1", 1, 0))

    filters = []
    real_delete = sweeper.ledger.delete_many

    async def recording_delete(flt, *args, **kwargs):
        filters.append(flt)
        return await real_delete(flt, *args, **kwargs)
    sweeper.ledger.delete_many = recording_delete
    await live.heartbeat()
    await sweeper.heartbeat()
    await sweeper.sweep()
    assert "d2" not in {e["_id"] for e in await store.ledger_entries()}, "the late entry nobody paid for is gone"
    assert len(await store.ledger_entries(h)) == 1 + 6 * batch
    assert filters, "the tombstone's entries were deleted again"
    for flt in filters:
        plan = await store.db.command("explain", {"find": "ledger", "filter": flt}, verbosity="executionStats")
        stats = plan["executionStats"]
        assert stats["totalDocsExamined"] <= 1 and stats["totalKeysExamined"] <= 2, (flt, stats)
    await live.commit_lease(h, "lease-p_live-1", held_live, seq, [], held_live, 0)  # the live slice handed back
    await assert_conserved(store)
    await close_client(store.client)
