"""Leases: requests reserve, settle and refund in memory; group commits keep the money exact."""
import asyncio
import datetime as dt
import json
from dataclasses import replace

import bson
import pytest
from tornado.httpclient import AsyncHTTPClient

from relay.errors import InsufficientQuota
from relay.keys import hash_key
from relay.metering.ledger import ENTRY_FIELDS, LedgerEntry, entries_of, ledger_doc, ledger_page, utc_now
from relay.observability import metrics
from relay.quota.lease_book import LeaseBook
from relay.store.leases import TOMBSTONE_SEQ
from relay.store.mongo import MongoStore
from relay.store.recovery import DEAD_AFTER_S, MAX_HOLD_AGE_S
from tests.conservation import assert_conserved, conserved_now
from tests.helpers import PRICING, TEST_KEY, add_key, mock_store, serve, start_fake

H = hash_key(TEST_KEY)


def entry(rid, cost):
    return LedgerEntry(rid, H, "gpt-4", "p", 8, 10, cost, 200, 1.0, 1.0, False, utc_now())


async def spend(book, rid, minimum, full, cost):
    held = await book.reserve(H, rid, minimum, full)
    book.settle(H, rid, entry(rid, cost))
    return held


@pytest.fixture
def store(io_loop):
    return mock_store()


class Processes:
    """A relay process on the key (``store``, ``book``) and another that sweeps, on one clock."""

    def __init__(self, instance_id: str):
        self.now = [dt.datetime(2026, 1, 1)]
        self.elapsed = [0.0]
        client = mock_store().client
        clocks = {"clock": lambda: self.now[0], "monotonic": lambda: self.elapsed[0]}
        self.store = MongoStore(client, instance_id=instance_id, **clocks)
        self.sweeper = MongoStore(client, instance_id="p_other", **clocks)
        self.book = LeaseBook(self.store)

    async def start(self, quota: int) -> "Processes":
        await add_key(self.store, quota=quota)
        await self.store.heartbeat()
        await self.sweeper.sweep()  # the sweeper has seen it beat
        return self

    async def sweep_after(self, seconds: float) -> int:
        """``seconds`` later (the first process silent all along), the other one sweeps."""
        self.now[0] += dt.timedelta(seconds=seconds)
        self.elapsed[0] += seconds
        await self.sweeper.heartbeat()
        return await self.sweeper.sweep()


async def test_a_hundred_requests_cost_a_handful_of_store_operations(store):
    await add_key(store, quota=1_000_000)
    book = LeaseBook(store)
    before = store.round_trips
    for i in range(100):
        await spend(book, f"r{i}", 160, 560, 560)
        if i % 10 == 9:
            await book.commit_all()
    # Per request without leases: a reservation and a settlement, 200 writes for these 100.
    assert store.round_trips - before < 50, "an insert and an update per group, not two writes per request"
    await conserved_now(store, settled=False)  # exact while the slice is out, too
    await book.release_all()
    doc = await store.key_doc(H)
    assert (doc["used"], doc["balance"], doc["reserved"]) == (56_000, 1_000_000 - 56_000, 0)
    assert await store.ledger_total(H) == 56_000
    await assert_conserved(store)


async def test_refunds_return_to_the_slice(store):
    await add_key(store, quota=10_000)
    book = LeaseBook(store)
    await book.reserve(H, "a", 160, 560)
    book.refund(H, "a")
    await book.release_all()
    assert (await store.key_doc(H))["balance"] == 10_000
    await assert_conserved(store)


async def test_small_balance_partial_slice_and_bounded_overdraft(store):
    await add_key(store, quota=1_000)
    book = LeaseBook(store)
    assert await spend(book, "r1", 160, 560, 560) == 560
    assert await spend(book, "r2", 160, 560, 560) == 440  # what is left covers the prompt
    with pytest.raises(InsufficientQuota):
        await book.reserve(H, "r3", 160, 560)
    await book.release_all()
    doc = await store.key_doc(H)
    assert doc["balance"] == -120, "overdrawn by that request's excess over its reservation, no more"
    assert doc["used"] == 1120
    await assert_conserved(store)


async def test_commit_is_idempotent_when_an_answer_is_lost(store):
    await add_key(store, quota=10_000)
    held = await store.open_lease(H, "lease-x", 0, 5_000)
    first = await store.commit_lease(H, "lease-x", held, 0, [entry("e1", 300)], 0, 0)
    again = await store.commit_lease(H, "lease-x", held, 0, [entry("e1", 300)], 0, 0)
    assert first == again == 4_700
    doc = await store.key_doc(H)
    assert doc["used"] == 300 and len(await store.ledger_entries(H)) == 1
    await conserved_now(store, settled=False)


async def test_a_large_batch_is_inserted_in_pages_each_entry_once(store):
    """A commit behind a slow store carries many entries: they go in pages of LEDGER_CHUNK, one
    insert each (so relay never builds them all at once), and a repeat after a lost answer
    inserts none twice."""
    from relay.store.leases import LEDGER_CHUNK
    await add_key(store, quota=10**6)
    held = await store.open_lease(H, "lease-x", 0, 100_000)
    batch = [entry(f"e{i}", 10) for i in range(2 * LEDGER_CHUNK + 10)]
    trips = store.round_trips
    assert await store.commit_lease(H, "lease-x", held, 0, batch, 0, 0) == held - 10 * len(batch)
    assert store.round_trips - trips == 3 + 1, "three inserts and the key's update"
    assert await store.commit_lease(H, "lease-x", held, 0, batch, 0, 0) == held - 10 * len(batch)
    pages = await store.ledger.find({"key_hash": H}).sort("_id", 1).to_list(None)
    assert [len(p["entries"]) for p in pages] == [LEDGER_CHUNK, LEDGER_CHUNK, 10]
    assert [p["at"] for p in pages] == [max(e["at"] for e in p["entries"]) for p in pages]
    assert sorted(e["_id"] for e in await store.ledger_entries(H)) == sorted(e.request_id for e in batch)
    assert (await store.key_doc(H))["used"] == 10 * len(batch)
    await conserved_now(store, settled=False)


def test_a_page_holds_each_entry_as_ledger_doc_makes_it_and_a_changed_copy_is_encoded_anew():
    """Entries are encoded when settled (``LedgerEntry.encoded``), not in the group commit: the
    page decodes to the documents ``ledger_doc`` makes, every field, and an entry copied with a
    change carries no encoding of the one it was copied from."""
    e = LedgerEntry("r1", H, "gpt-4o", "p", 80, 20, 1234, 200, 3.5, 1.25, True,
                    dt.datetime(2026, 5, 6, 7, 8, 9, 123000), cached_tokens=64, reasoning_tokens=5,
                    image_tokens=7, audio_tokens=9, images=1, seconds=2, characters=3,
                    requested_model="my-4o", api="responses")
    assert e.encoded() is e.encoded(), "encoded once"
    page = bson.decode(bson.encode(ledger_page([e, entry("r2", 5)], "lease-x", 0, 0)))
    assert page["entries"][0] == ledger_doc(e) and list(page["entries"][0]) == ["_id", *ENTRY_FIELDS[1:]]
    assert [x["_id"] for x in page["entries"]] == ["r1", "r2"]
    changed = replace(e, cost=99)
    assert bson.decode(bson.encode(ledger_page([changed], "lease-x", 0, 0)))["entries"][0]["cost"] == 99
    assert changed == replace(e, cost=99) and changed != e


async def test_a_batch_whose_extra_the_balance_lacks_applies_without_it(store):
    """A commit asking for more than the balance has still charges its batch (the lease moves
    to the next version), so a version never carries two different batches: a page of the
    first landing late, executed after the client gave up on it, cannot stand in for a page of
    the second. A repeat after a lost answer says the same: applied, the extra not granted."""
    await add_key(store, quota=1_000)
    held = await store.open_lease(H, "lease-x", 0, 500)
    first = [entry("a", 100), entry("b", 100)]
    assert await store.commit_lease(H, "lease-x", held, 0, first, 0, 10_000) is None
    assert await store.commit_lease(H, "lease-x", held, 0, first, 0, 10_000) is None, "the repeat"
    lease = (await store.key_doc(H))["leases"]["lease-x"]
    assert (lease["seq"], lease["amount"]) == (1, held - 200)
    assert sorted(e["_id"] for e in await store.ledger_entries(H)) == ["a", "b"]
    late = await store.ledger.find_one({"lease": "lease-x", "lseq": 0})
    await store._insert_ledger([late])  # the first attempt's insert, landing late: skipped, the same page
    assert await store.commit_lease(H, "lease-x", held - 200, 1, [entry("c", 100)], 0, 100) == held - 300 + 100
    assert sorted(e["_id"] for e in await store.ledger_entries(H)) == ["a", "b", "c"]
    assert (await store.key_doc(H))["used"] == 300
    await conserved_now(store, settled=False)


async def test_a_page_of_other_entries_never_passes_for_the_batchs_own(store):
    """A batch the store refused for good is dropped (unbilled) and its pages deleted; the next
    batch goes out at the same version. Should a page of the dropped batch land after the
    delete (a write the client gave up on, executed after all), the next batch's page, of other
    entries, is still inserted: a page's id carries a digest of its entries' ids."""
    await add_key(store, quota=10_000)
    held = await store.open_lease(H, "lease-x", 0, 5_000)
    await store._insert_ledger([ledger_page([entry("dropped", 300)], "lease-x", 0, 0)])  # landing late
    assert await store.commit_lease(H, "lease-x", held, 0, [entry("charged", 200)], 0, 0) == held - 200
    assert "charged" in {e["_id"] for e in await store.ledger_entries(H)}
    assert await store.ledger_total(H) == 500 and (await store.key_doc(H))["used"] == 200, \
        "the late page of the dropped batch is the only excess: outside the charge, and visible"


async def test_a_slice_the_balance_cannot_grow_charges_what_it_served(store):
    """Through the lease book: a request the slice cannot cover, whose top-up the balance cannot
    give in full, gets what is left; the refused top-up still charged what was served, and each
    entry is in the ledger once."""
    await add_key(store, quota=1_000)
    book = LeaseBook(store)
    assert await spend(book, "r1", 160, 560, 560) == 560
    assert await spend(book, "r2", 160, 560, 300) == 440
    assert (await store.key_doc(H))["used"] == 560, "the grow that found the balance short charged r1"
    await book.release_all()
    assert sorted(e["_id"] for e in await store.ledger_entries(H)) == ["r1", "r2"]
    await assert_conserved(store)


async def test_the_newest_entries_are_read_across_interleaved_pages(store):
    """Two processes' leases on one key commit pages whose times interleave: the usage page's
    newest entries and the speed panel's recent timings are the newest across all pages."""
    import datetime as dt
    await add_key(store, quota=10**6)
    t0 = utc_now()

    def at(second, status=200):
        return LedgerEntry(f"s{second}", H, "gpt-4", "p", 8, 10, 1, status, 1.0, float(second), True,
                           t0 + dt.timedelta(seconds=second))
    pages = {"lease-a": [[0, 2, 4], [6, 8, 10]], "lease-b": [[1, 3, 5, 7], [9, 11]]}
    for rid, batches in pages.items():
        held = await store.open_lease(H, rid, 0, 1000)
        for seq, seconds in enumerate(batches):
            batch = [at(s, status=500 if s == 9 else 200) for s in seconds]
            held = await store.commit_lease(H, rid, held, seq, batch, 0, 0)
    assert [e["_id"] for e in await store.recent_ledger(H, 5)] == ["s11", "s10", "s9", "s8", "s7"]
    assert [e["_id"] for e in await store.recent_ledger(H, 50)] == [f"s{s}" for s in range(11, -1, -1)]
    timings = await store.recent_timings(t0 + dt.timedelta(seconds=3.5))
    assert [t["ttfb_ms"] for t in timings] == [11.0, 10.0, 8.0, 7.0, 6.0, 5.0, 4.0], "answered, since then"
    assert [t["ttfb_ms"] for t in await store.recent_timings(t0, limit=3)] == [11.0, 10.0, 8.0]
    # Entries charged through the outbox are a document each, beside the pages.
    await store._insert_ledger([ledger_doc(at(s)) for s in (12, 3.5)])
    assert [e["_id"] for e in await store.recent_ledger(H, 4)] == ["s12", "s11", "s10", "s9"]
    every = ["s12", *(f"s{s}" for s in range(11, 3, -1)), "s3.5", "s3", "s2", "s1", "s0"]
    assert [e["_id"] for e in await store.recent_ledger(H, 50)] == every
    assert await store.recent_ledger(H, 0) == []


class LostAnswer(Exception):
    """The store applied the write; the answer never came back."""


async def test_a_batch_whose_answer_was_lost_is_repeated_exactly(store):
    await add_key(store, quota=100_000)
    book = LeaseBook(store)
    await spend(book, "a", 160, 560, 500)
    await book.commit_all()
    real = store.commit_lease
    calls = []

    async def applies_then_fails(*args):
        calls.append(args)
        await real(*args)
        if len(calls) == 1:
            raise LostAnswer()
        return await real(*args)
    store.commit_lease = applies_then_fails
    await spend(book, "b", 160, 560, 300)
    with pytest.raises(LostAnswer):
        await book.commit_all()
    await spend(book, "c", 160, 560, 200)  # settled while the outcome of b's batch is unknown
    await book.commit_all()
    assert [e.request_id for e in calls[1][4]] == ["b"], "the repeat carries b alone, as the first attempt did"
    store.commit_lease = real
    await book.commit_all()
    await book.release_all()
    doc = await store.key_doc(H)
    assert doc["used"] == 1000 and doc["balance"] == 99_000
    assert await store.ledger_total(H) == 1000
    await assert_conserved(store)


async def test_entries_of_a_batch_that_never_applied_leave_the_ledger_with_the_lease(io_loop):
    """kill -9 between a batch's insert and its charge: the sweeper returns the slice and
    deletes the entries nobody paid for, so the ledger says exactly what was charged."""
    p = await Processes("p_dies").start(quota=100_000)
    store, book = p.store, p.book
    await spend(book, "paid", 160, 560, 400)
    await book.commit_all()
    await spend(book, "unpaid", 160, 560, 300)
    w = book.wallets[H]
    # The commit's insert lands; the process dies before the charge.
    await store.ledger.insert_one(ledger_page(w.batch, w.rid, w.seq, 0))
    assert await store.ledger_total(H) == 700, "the insert landed, the charge did not"
    assert await p.sweep_after(DEAD_AFTER_S + 1) == 1
    assert await store.ledger_total(H) == 400
    doc = await store.key_doc(H)
    assert (doc["used"], doc["balance"], doc["reserved"]) == (400, 99_600, 0)
    await assert_conserved(store)


async def test_a_stalled_process_bills_its_late_batch_once(io_loop):
    """Looked dead, was swept, woke up and sent its batch: the insert lands, the charge finds
    the lease's tombstone; the process takes its insert back out and charges the batch to the
    balance through the outbox, once."""
    p = await Processes("p_sleepy").start(quota=100_000)
    store, book = p.store, p.book
    await spend(book, "first", 160, 560, 400)
    await book.commit_all()
    await spend(book, "late", 160, 560, 300)
    assert await p.sweep_after(DEAD_AFTER_S + 1) == 1
    await book.commit_all()  # finds the tombstone: the batch becomes a late batch ...
    await book.commit_all()  # ... charged to the balance
    assert book.wallets[H].rid == "" and not book.wallets[H].late
    await store.flush_ledger()
    holding = [d for d in await store.ledger.find({}).to_list(None) if "late" in {e["_id"] for e in entries_of(d)}]
    assert [d.get("lease") for d in holding] == [None], "in the ledger once, as charged through the outbox"
    doc = await store.key_doc(H)
    assert (doc["used"], doc["balance"], doc["reserved"]) == (700, 100_000 - 700, 0)
    await p.sweep_after(1)  # the sweeper's next pass deletes unapplied entries: not this one
    assert await store.ledger_total(H) == 700
    await assert_conserved(store)
    tomb = next(iter((await store.key_doc(H))["leases"].values()))
    assert tomb["seq"] == TOMBSTONE_SEQ and tomb["amount"] == 0
    await p.sweep_after(MAX_HOLD_AGE_S + 1)
    assert not (await store.key_doc(H))["leases"], "the tombstone goes once no late batch can come"


async def test_a_swept_slice_is_replaced_and_every_request_is_billed(io_loop):
    p = await Processes("p_sleepy").start(quota=100_000)
    store, book = p.store, p.book
    await spend(book, "before", 160, 560, 560)
    await book.commit_all()
    await spend(book, "swept", 160, 560, 560)  # settled here, not committed when the slice goes
    held = await book.reserve(H, "in-flight", 160, 560)  # still running when the slice goes
    assert await p.sweep_after(DEAD_AFTER_S + 1) == 1
    await book.commit_all()  # finds its slice gone
    await store.heartbeat()
    await spend(book, "after", 160, 560, 560)  # a new slice
    book.settle(H, "in-flight", entry("in-flight", held - 60))
    await book.release_all()
    doc = await store.key_doc(H)
    assert doc["used"] == 3 * 560 + held - 60 and doc["balance"] == 100_000 - doc["used"]
    assert len(doc["leases"]) == 2, "the tombstone and the one new slice, nothing stranded"
    await assert_conserved(store)


async def test_concurrent_requests_on_half_a_budget(store):
    await add_key(store, quota=560 * 50)
    book = LeaseBook(store)

    async def one(i):
        try:
            assert await book.reserve(H, f"c{i}", 160, 560) == 560
        except InsufficientQuota:
            return 429
        await asyncio.sleep(0.001)
        book.settle(H, f"c{i}", entry(f"c{i}", 560))
        return 200
    codes = await asyncio.gather(*(one(i) for i in range(100)))
    assert codes.count(200) == 50 and codes.count(429) == 50
    await book.release_all()
    assert (await store.key_doc(H))["balance"] == 0
    await assert_conserved(store)


async def test_http_with_leases_charges_exactly(io_loop):
    fake = start_fake()
    store = mock_store()
    await add_key(store, quota=1_000_000)
    text = f"upstreams:\n  - {{name: p, base_url: '{fake.base_url}', keys: [sk-l1]}}\n" \
           f"quota: {{leases: true}}\n{PRICING}"
    url, server, services = await serve(text, store)
    assert services.quota.book is not None
    c = AsyncHTTPClient(force_instance=True, max_clients=50)
    results = await asyncio.gather(*(c.fetch(url + "/v1/chat/completions", method="POST", raise_error=False,
                                             headers={"Authorization": f"Bearer {TEST_KEY}"},
                                             body=json.dumps({"model": "gpt-4", "stream": i % 2 == 0,
                                                              "messages": [{"role": "user", "content": "Hi"}]}))
                                     for i in range(40)))
    assert {r.code for r in results} == {200}
    waits = metrics.QUOTA_STORE_WAITS._value.get()
    for _ in range(40):  # one at a time, after the burst: served from the slice
        r = await c.fetch(url + "/v1/chat/completions", method="POST", raise_error=False,
                          headers={"Authorization": f"Bearer {TEST_KEY}"},
                          body=json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]}))
        assert r.code == 200
    assert metrics.QUOTA_STORE_WAITS._value.get() - waits <= 2, "sequential requests wait for no store round trip"
    server.stop()
    await services.close()  # commits and hands the slice back
    doc = await store.key_doc(H)
    assert doc["used"] == 80 * 560 and doc["balance"] == 1_000_000 - 80 * 560 and doc["reserved"] == 0
    await assert_conserved(store)
    fake.stop()
    c.close()


async def test_the_slice_is_topped_up_before_it_runs_dry(store):
    """A top-up waits on the store in the background; requests go on spending what is left."""
    await add_key(store, quota=1_000_000)
    book = LeaseBook(store)
    await spend(book, "first", 100, 100, 100)  # opens a slice of 8 such requests
    gate = asyncio.Event()
    real = store.commit_lease
    sent = []

    async def slow_commit(*args):
        sent.append(args)
        await gate.wait()
        return await real(*args)
    store.commit_lease = slow_commit
    served = 0
    for i in range(6):  # the slice still covers these: none of them waits for the store
        await asyncio.wait_for(spend(book, f"r{i}", 100, 100, 100), 1.0)
        served += 1
    assert served == 6 and len(sent) == 1, "one top-up went out when half the slice was spent"
    extra = sent[0][6]
    assert extra > 0
    top_up = book.wallets[H].topping_up
    gate.set()
    await top_up
    assert book.wallets[H].available >= extra
    store.commit_lease = real
    await book.release_all()
    doc = await store.key_doc(H)
    assert doc["used"] == 700 and doc["balance"] == 1_000_000 - 700
    await assert_conserved(store)


async def test_a_request_that_finds_its_slice_swept_gets_a_new_one(io_loop):
    p = await Processes("p_sleepy").start(quota=100_000)
    store, book = p.store, p.book
    await spend(book, "first", 100, 100, 100)
    await book.commit_all()
    assert await p.sweep_after(DEAD_AFTER_S + 1) == 1
    await store.heartbeat()
    real, calls = store.commit_lease, []

    async def counted(*args):
        calls.append(args)
        return await real(*args)
    store.commit_lease = counted
    assert await book.reserve(H, "big", 5_000, 5_000) == 5_000  # more than the old slice held
    assert len(calls) == 1, "one commit finds the lease gone; the next slice is a new lease"
    book.settle(H, "big", entry("big", 4_000))
    store.commit_lease = real
    await book.release_all()
    doc = await store.key_doc(H)
    assert doc["used"] == 4_100 and doc["balance"] == 100_000 - 4_100
    await assert_conserved(store)


async def test_a_top_up_through_the_admin_api_serves_the_key_at_once(io_loop):
    """With leases an exhausted key is not asked about again for a second; a top-up made
    through this process clears that at once."""
    fake = start_fake()
    store = mock_store()
    await add_key(store, quota=600)
    text = (f"upstreams:\n  - {{name: p, base_url: '{fake.base_url}', keys: [sk-l1]}}\n"
            f"quota: {{leases: true}}\n{PRICING}")
    url, server, services = await serve(text, store, admin_token="admin-token-0123456789abcdef")
    c = AsyncHTTPClient(force_instance=True)

    async def chat():
        return (await c.fetch(url + "/v1/chat/completions", method="POST", raise_error=False,
                              headers={"Authorization": f"Bearer {TEST_KEY}"},
                              body=json.dumps({"model": "gpt-4",
                                               "messages": [{"role": "user", "content": "Hi"}]}))).code
    assert await chat() == 200  # 600 covers the prompt; costs 560
    assert await chat() == 429  # 40 left < 160
    prefix = (await store.key_doc(H))["prefix"]
    r = await c.fetch(f"{url}/admin/keys/{prefix}/topup", method="POST", raise_error=False,
                      headers={"Authorization": "Bearer admin-token-0123456789abcdef"},
                      body=json.dumps({"quota": 1000}))
    assert r.code == 200, r.body
    assert await chat() == 200
    server.stop()
    await services.close()
    doc = await store.key_doc(H)
    assert doc["used"] == 1120 and doc["granted"] == 1600
    await assert_conserved(store)
    fake.stop()
    c.close()


def test_slice_size_follows_the_rate_and_a_pause_does_not_reset_it():
    from relay.quota.lease_book import Wallet
    w = Wallet()
    assert w.target(100) == 800  # no rate yet: eight requests like this one
    t = 0.0
    for _ in range(1000):  # 1000 requests of 100 units in one second
        t += 0.001
        w.count(100, t)
    assert 90_000 <= w.rate <= 110_000
    assert w.target(100) == int(w.rate * 0.5)  # half a second's worth
    w.count(100, t + 30.0)  # the next request after a 30 s pause
    assert 90_000 <= w.rate <= 110_000, "the pause says nothing about the traffic that resumes"
    w.holds = {f"r{i}": 100 for i in range(600)}
    assert w.target(100) == 120_000  # twice the requests in flight, when that is more


async def test_a_slice_being_handed_back_cannot_be_spent_twice(store):
    """An idle slice is on its way back to the balance: a request arriving meanwhile waits for
    it and takes from the balance, instead of reserving units that are being returned."""
    await add_key(store, quota=1000)
    now = [0.0]
    book = LeaseBook(store, clock=lambda: now[0])
    await spend(book, "a", 100, 1000, 100)  # the slice is the whole balance; 900 left in it
    if book.wallets[H].topping_up is not None:
        await book.wallets[H].topping_up  # finds nothing more on the balance
    await book.commit_all()
    gate, sent, real = asyncio.Event(), asyncio.Event(), store.commit_lease

    async def slow_commit(*args):
        if args[5] == 900:  # returned: the hand-back is on its way
            sent.set()
        await gate.wait()
        return await real(*args)
    store.commit_lease = slow_commit
    now[0] += 3  # idle: the next group commit hands the 900 back
    handing_back = asyncio.ensure_future(book.commit_all())
    await asyncio.wait_for(sent.wait(), 1)
    arriving = asyncio.ensure_future(book.reserve(H, "b", 100, 900))
    await asyncio.sleep(0.01)
    assert not arriving.done(), "it waits for the units on their way back"
    gate.set()
    await handing_back
    assert await arriving == 900
    book.settle(H, "b", entry("b", 900))
    store.commit_lease = real
    await book.release_all()
    doc = await store.key_doc(H)
    assert (doc["used"], doc["balance"], doc["reserved"]) == (1000, 0, 0), "never spent twice"
    await assert_conserved(store)


async def test_a_commit_the_store_refuses_is_not_retried_forever(store):
    """A batch that cannot be written (a defect: entries are bounded when settled) is given up
    once, logged and counted; its requests go unbilled and the units stay with the key."""
    await add_key(store, quota=100_000)
    book = LeaseBook(store)
    refused = []
    book.on_unbillable = lambda reason, n: refused.append((reason, n))
    await spend(book, "ok", 100, 100, 100)
    await book.commit_all()
    real, calls = store.commit_lease, []

    async def unencodable(*args):
        calls.append(args)
        raise OverflowError("MongoDB can only handle up to 8-byte ints")
    store.commit_lease = unencodable
    await spend(book, "bad", 100, 100, 100)
    for _ in range(3):
        await book.commit_all()
    assert len(calls) == 1 and refused == [("commit_refused", 1)]
    store.commit_lease = real
    await spend(book, "after", 100, 100, 100)
    await book.release_all()
    doc = await store.key_doc(H)
    assert (doc["used"], doc["balance"], doc["reserved"]) == (200, 100_000 - 200, 0)
    await assert_conserved(store)


async def test_hostile_numbers_cannot_poison_the_group_commit(store):
    """A reservation far beyond any balance, and usage beyond 64 bits: the commit still
    encodes, the key is billed, and conservation holds."""
    await add_key(store, quota=100_000)
    book = LeaseBook(store)
    held = await book.reserve(H, "huge", 100, 10**30)
    assert held == 100_000, "it holds what there is"
    book.settle(H, "huge", entry("huge", 500))
    await book.commit_all()
    await spend(book, "next", 100, 100, 100)
    await book.release_all()
    doc = await store.key_doc(H)
    assert (doc["used"], doc["balance"], doc["reserved"]) == (600, 100_000 - 600, 0)
    await assert_conserved(store)


async def test_a_process_of_the_earlier_release_is_not_swept_while_it_beats(io_loop):
    """An earlier release's heartbeat writes only its time (``at``), no count: during a
    rolling upgrade the new sweepers must see it beat, and sweep it only once it stops."""
    p = await Processes("p_old").start(quota=100_000)
    await spend(p.book, "r1", 160, 560, 400)
    await p.book.commit_all()
    await p.store.processes.update_one({"_id": "p_old"}, {"$unset": {"beat": ""}})

    async def old_heartbeat():
        await p.store.processes.update_one({"_id": "p_old"}, {"$set": {"at": p.now[0]}}, upsert=True)
    for _ in range(6):  # a minute of beats every ten seconds
        await old_heartbeat()
        assert await p.sweep_after(10) == 0, "a process that beats is alive"
    assert await p.sweep_after(DEAD_AFTER_S + 1) == 1, "silent since: swept"
    await assert_conserved(p.store)
