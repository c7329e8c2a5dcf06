"""The store's money operations on mongomock-motor: atomic, idempotent, conserved."""
import datetime as dt

import pytest

from relay.errors import InsufficientQuota, KeyDisabled
from relay.keys import hash_key
from relay.metering.ledger import LedgerEntry, day_of, utc_now
from relay.store.mongo import MongoStore
from relay.store.recovery import DEAD_AFTER_S, MAX_HOLD_AGE_S
from tests.conservation import assert_conserved, conserved_now
from tests.helpers import TEST_KEY, add_key, mock_store


def entry(rid: str, cost: int, key=TEST_KEY, at=None) -> LedgerEntry:
    return LedgerEntry(rid, hash_key(key), "gpt-4", "primary", 10, 5, cost, 200, 12.0, 3.0, False,
                       at or utc_now())


@pytest.fixture
def store(io_loop):
    return mock_store()


async def test_keys_are_stored_hashed_with_a_display_prefix(store):
    key, doc = await store.create_key(500, "note")
    raw = await store.keys.find_one({})
    assert key not in str(raw) and raw["_id"] == hash_key(key)
    assert raw["prefix"] == key[:10] and len(key) >= 35 and key.startswith("ak-")
    assert (raw["granted"], raw["balance"], raw["used"], raw["reserved"]) == (500, 500, 0, 0)
    assert (await store.resolve(key))["_id"] == raw["_id"]
    assert (await store.resolve(key[:10]))["_id"] == raw["_id"]


async def test_reserve_holds_full_then_partial_then_refuses(store):
    await add_key(store, quota=100)
    h = hash_key(TEST_KEY)
    assert await store.reserve(h, "r1", 10, 60) == 60
    assert await store.reserve(h, "r2", 10, 60) == 40  # covers the prompt: holds what is left
    with pytest.raises(InsufficientQuota) as info:
        await store.reserve(h, "r3", 1, 60)
    assert info.value.status == 429 and info.value.code == "insufficient_quota"
    doc = await store.key_doc(h)
    assert (doc["balance"], doc["reserved"], len(doc["holds"])) == (0, 100, 2)
    await assert_conserved(store, settled=False)


async def test_reserve_refuses_disabled_keys(store):
    await add_key(store, quota=100, status="disabled")
    with pytest.raises(KeyDisabled):
        await store.reserve(hash_key(TEST_KEY), "r1", 1, 5)


async def test_settle_charges_once_and_returns_the_rest(store):
    await add_key(store, quota=100)
    h = hash_key(TEST_KEY)
    held = await store.reserve(h, "r1", 10, 60)
    assert await store.settle(entry("r1", 25), held)
    assert not await store.settle(entry("r1", 25), held), "a second settlement charges nothing"
    assert not await store.refund(h, "r1", held), "nor does a refund after settlement"
    doc = await store.key_doc(h)
    assert (doc["balance"], doc["used"], doc["reserved"]) == (75, 25, 0)
    day = await store.usage_days(h, "2000-01-01", "2999-01-01")
    assert [(d["cost"], d["requests"]) for d in day] == [(25, 1)]
    await assert_conserved(store)


async def test_settle_may_overdraw_by_the_requests_own_excess(store):
    await add_key(store, quota=50)
    h = hash_key(TEST_KEY)
    held = await store.reserve(h, "r1", 10, 80)
    assert held == 50
    assert await store.settle(entry("r1", 70), held)
    doc = await store.key_doc(h)
    assert doc["balance"] == -20  # the excess over its reservation, no more
    with pytest.raises(InsufficientQuota):
        await store.reserve(h, "r2", 0, 1)
    await assert_conserved(store)


async def test_refund_returns_everything_once(store):
    await add_key(store, quota=100)
    h = hash_key(TEST_KEY)
    held = await store.reserve(h, "r1", 10, 60)
    assert await store.refund(h, "r1", held)
    assert not await store.refund(h, "r1", held)
    assert not await store.settle(entry("r1", 5), held), "a refunded request cannot be charged"
    assert (await store.key_doc(h))["balance"] == 100
    await assert_conserved(store)


async def test_topup_and_status_changes(store):
    await add_key(store, quota=10)
    h = hash_key(TEST_KEY)
    doc = await store.topup(h, 90)
    assert (doc["granted"], doc["balance"]) == (100, 100)
    assert (await store.set_status(h, "disabled"))["status"] == "disabled"
    assert not (await store.find_key(h)).active
    await assert_conserved(store)


class Clocks:
    """One wall clock and one elapsed-time clock for several store instances of a test."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 1, 12, 0, 0)
        self.elapsed = 0.0

    def store(self, client, instance_id: str, skew_s: float = 0.0) -> MongoStore:
        return MongoStore(client, instance_id=instance_id, clock=lambda: self.now + dt.timedelta(seconds=skew_s),
                          monotonic=lambda: self.elapsed)

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)
        self.elapsed += seconds


async def test_sweeper_returns_holds_of_dead_processes_only(io_loop):
    clocks = Clocks()
    client = mock_store().client
    crashed, alive = clocks.store(client, "p_dead"), clocks.store(client, "p_alive")
    await add_key(crashed, quota=100)
    h = hash_key(TEST_KEY)
    await crashed.heartbeat()
    await alive.heartbeat()
    await crashed.reserve(h, "dead-1", 1, 30)
    await alive.reserve(h, "live-1", 1, 20)
    assert await alive.sweep() == 0  # it has seen both beat
    clocks.advance(DEAD_AFTER_S + 1)
    await alive.heartbeat()  # only the live process keeps beating
    assert await alive.sweep() == 1
    doc = await alive.key_doc(h)
    assert [x["rid"] for x in doc["holds"]] == ["live-1"] and doc["balance"] == 80
    await assert_conserved(alive, settled=False)
    clocks.advance(MAX_HOLD_AGE_S)
    await alive.heartbeat()
    assert await alive.sweep() == 1, "no hold outlives the longest possible request"
    await assert_conserved(alive)


async def test_a_host_whose_clock_is_off_is_not_taken_for_dead(io_loop):
    """Liveness is whether a heartbeat count moves in the sweeper's own time: a host whose
    wall clock is ten minutes behind keeps its holds while it beats."""
    clocks = Clocks()
    client = mock_store().client
    behind, sweeper = clocks.store(client, "p_behind", skew_s=-600), clocks.store(client, "p_sweeper")
    await add_key(behind, quota=100)
    h = hash_key(TEST_KEY)
    await behind.heartbeat()
    await behind.reserve(h, "live", 1, 30)
    for _ in range(10):  # 100 s of both beating
        clocks.advance(10)
        await behind.heartbeat()
        await sweeper.heartbeat()
        assert await sweeper.sweep() == 0
    assert [x["rid"] for x in (await sweeper.key_doc(h))["holds"]] == ["live"]
    await assert_conserved(sweeper, settled=False)


async def test_a_settlement_whose_hold_was_swept_is_charged_once(io_loop):
    """A process cut off from the store for longer than DEAD_AFTER_S: its hold is swept; the
    settlement it sends when the link returns (from its journal) is charged to the balance,
    and a repeat of it charges nothing."""
    clocks = Clocks()
    client = mock_store().client
    cut, sweeper = clocks.store(client, "p_cut"), clocks.store(client, "p_sweeper")
    await add_key(cut, quota=1000)
    h = hash_key(TEST_KEY)
    await cut.heartbeat()
    held = await cut.reserve(h, "r1", 1, 300)
    held2 = await cut.reserve(h, "r2", 1, 300)
    await sweeper.sweep()
    clocks.advance(DEAD_AFTER_S + 1)
    assert await sweeper.sweep() == 2
    assert (await sweeper.key_doc(h))["balance"] == 1000
    assert await cut.settle(entry("r1", 120), held)
    assert not await cut.settle(entry("r1", 120), held), "a repeat charges nothing"
    assert not await cut.refund(h, "r2", held2), "a late refund: the sweeper returned its units already"
    doc = await cut.key_doc(h)
    assert (doc["balance"], doc["used"], doc["reserved"], doc["swept"]) == (880, 120, 0, [])
    await assert_conserved(cut)


async def test_ledger_outbox_moves_each_entry_exactly_once(store):
    await add_key(store, quota=1000)
    h = hash_key(TEST_KEY)
    for rid in ("r1", "r2"):
        held = await store.reserve(h, rid, 1, 100)
        assert await store.settle(entry(rid, 30), held)
    doc = await store.key_doc(h)
    assert [e["_id"] for e in doc["pending"]] == ["r1", "r2"] and doc["used"] == 60
    assert doc["days"][day_of(utc_now())] == {"cost": 60, "requests": 2, "prompt_tokens": 20,
                                                          "completion_tokens": 10}
    await conserved_now(store, settled=False)  # exact while entries wait in the outbox, too
    # A flush that crashed after inserting but before pulling: the next one inserts nothing twice.
    await store.ledger.insert_one(dict(doc["pending"][0]))
    assert await store.flush_ledger() == 2
    assert sorted(e["_id"] for e in await store.ledger_entries()) == ["r1", "r2"]
    assert (await store.key_doc(h))["pending"] == []
    await assert_conserved(store)


def test_day_counts_sum_each_days_entries_in_one_increment_per_field():
    import datetime as dt

    from relay.metering.ledger import day_counts

    def entry(i, at):
        return LedgerEntry(request_id=f"r{i}", key_hash="k", model="m", upstream="u", prompt_tokens=10 + i,
                           completion_tokens=i, cost=100 * i, status=200, latency_ms=1.0, ttfb_ms=1.0,
                           stream=False, at=at)
    late, early = dt.datetime(2026, 11, 30, 23, 59, 59, 999999), dt.datetime(2026, 12, 1, 0, 0, 0)
    entries = [entry(1, late), entry(2, early), entry(3, late), entry(4, dt.datetime(999, 1, 2))]
    assert day_counts(entries) == {
        "days.2026-11-30.cost": 400, "days.2026-11-30.requests": 2, "days.2026-11-30.prompt_tokens": 24,
        "days.2026-11-30.completion_tokens": 4,
        "days.2026-12-01.cost": 200, "days.2026-12-01.requests": 1, "days.2026-12-01.prompt_tokens": 12,
        "days.2026-12-01.completion_tokens": 2,
        "days.0999-01-02.cost": 400, "days.0999-01-02.requests": 1, "days.0999-01-02.prompt_tokens": 14,
        "days.0999-01-02.completion_tokens": 4}
    assert day_of(late) == late.strftime("%Y-%m-%d") and day_of(early) == "2026-12-01"
