"""The per-key rate limiter (relay/limits.py) on its own: several processes' books on one store
(mongomock), driven by a simulated clock, so that minutes of traffic take a moment and the
tolerance can be checked exactly."""
import asyncio
import bisect
import datetime as dt
import random

import pytest
from mongomock_motor import AsyncMongoMockClient

from relay.errors import RateLimited, StoreUnavailable
from relay.limits import HOLD_S, SLOT_TTL_S, LimitBook, duration
from relay.policy import Policy
from relay.store.base import KeyRecord
from relay.store.mongo import MongoStore


class Clock:
    def __init__(self):
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> dt.datetime:
        return dt.datetime(2026, 1, 1) + dt.timedelta(seconds=self.t)


def books(clock: Clock, n: int) -> list[LimitBook]:
    """``n`` processes' limit books on one store."""
    client = AsyncMongoMockClient()
    return [LimitBook(MongoStore(client, "relay", instance_id=f"p{i}", clock=clock.wall, monotonic=clock.monotonic),
                      clock=clock.monotonic) for i in range(n)]


async def run_traffic(clock, procs, key, seconds, per_second, tokens=10, used=10, rng=None):
    """``seconds × per_second`` requests spread over the processes; each process's upkeep every
    0.1 s. Returns the (simulated) times requests were admitted at."""
    rng = rng or random.Random(7)
    admitted, step, next_tick = [], 1.0 / per_second, clock.t
    for _ in range(round(seconds * per_second)):
        book = rng.choice(procs)
        try:
            ticket = await book.admit(key, tokens)
        except RateLimited:
            pass
        else:
            book.finish(ticket, used)
            admitted.append(clock.t)
        clock.t += step
        if clock.t >= next_tick:
            for b in procs:
                await b.tick()
            next_tick = clock.t + 0.1
    for b in procs:
        await b.close()
    return admitted


@pytest.mark.parametrize("rpm,procs", [(60, 2), (600, 3), (6000, 2)])
async def test_requests_per_minute_hold_across_processes_within_the_tolerance(rpm, procs, io_loop):
    clock = Clock()
    key = KeyRecord("h1", "ak-1234567", "active", policy=Policy(rpm=rpm))
    seconds = 120.0
    admitted = await run_traffic(clock, books(clock, procs), key, seconds, per_second=min(rpm / 60 * 4, 200))
    promise = rpm + rpm * seconds / 60            # a full bucket, then the refill
    tolerance = rpm * HOLD_S / 60                 # units out of the bucket refill it meanwhile
    assert len(admitted) <= promise + tolerance
    assert len(admitted) >= 0.97 * promise, "the limit is not much stricter than it says either"
    # Any minute: at most a full bucket and a minute's refill.
    worst = max(bisect.bisect_right(admitted, t + 60) - i for i, t in enumerate(admitted))
    assert worst <= 2 * rpm + tolerance


async def test_below_the_limit_few_store_round_trips(io_loop):
    clock = Clock()
    procs = books(clock, 2)
    key = KeyRecord("h1", "ak-1234567", "active", policy=Policy(rpm=60_000, tpm=10**9))
    admitted = await run_traffic(clock, procs, key, 20.0, per_second=500)
    assert len(admitted) == 10_000, "nothing refused below the limits"
    trips = sum(b.store.round_trips for b in procs)
    assert trips < len(admitted) / 20, f"{trips} store round trips for {len(admitted)} requests"


async def test_tokens_are_counted_on_admission_and_corrected_when_the_request_ends(io_loop):
    clock = Clock()
    [book] = books(clock, 1)
    key = KeyRecord("h1", "ak-1234567", "active", policy=Policy(tpm=600))  # 10 tokens a second
    big = await book.admit(key, 400)          # a prompt plus its allowance
    with pytest.raises(RateLimited) as refused:
        await book.admit(key, 400)
    assert refused.value.limit == "tpm" and refused.value.status == 429
    assert refused.value.headers["x-ratelimit-limit-tokens"] == "600"
    book.finish(big, 50)                      # it used 50: 350 go back
    await book.tick()
    assert await book.admit(key, 400), "the unused tokens came back to the bucket"
    # Used more than counted: taken from the bucket too, which then owes (at most a whole limit).
    key2 = KeyRecord("h2", "ak-7654321", "active", policy=Policy(tpm=600))
    ticket = await book.admit(key2, 100)
    book.finish(ticket, 5000)
    clock.t += HOLD_S  # what this process took ahead lapses and goes back too
    await book.tick()
    with pytest.raises(RateLimited) as refused:
        await book.admit(key2, 100)
    assert int(refused.value.headers["Retry-After"]) > 60, "a whole limit owed: over a minute to wait"
    clock.t += 60  # the debt is paid, not yet the request
    with pytest.raises(RateLimited):
        await book.admit(key2, 100)
    clock.t += 11
    assert await book.admit(key2, 100)
    await book.close()


async def test_concurrency_slots_are_shared_and_come_back(io_loop):
    clock = Clock()
    a, b = books(clock, 2)
    key = KeyRecord("h1", "ak-1234567", "active", policy=Policy(max_concurrency=3))
    held = [await a.admit(key, 1), await a.admit(key, 1), await b.admit(key, 1)]
    for book in (a, b):
        with pytest.raises(RateLimited) as refused:
            await book.admit(key, 1)
        assert refused.value.limit == "concurrency" and refused.value.headers["Retry-After"] == "1"
    a.finish(held[0], 0)
    clock.t += 1.0
    await a.tick()  # a's unused slot goes back...
    assert await b.admit(key, 1), "...and b can take it"
    # A process that dies holding slots (b holds two): they lapse after SLOT_TTL_S.
    with pytest.raises(RateLimited):
        await a.admit(key, 1)
    clock.t += SLOT_TTL_S + 1
    assert await a.admit(key, 1) and await a.admit(key, 1)
    assert a.keys["h1"].in_flight == 3
    await a.close()


async def test_a_ramp_of_requests_in_flight_takes_slots_in_doublings_and_leaves_others_most(io_loop):
    """64 requests in flight under a large limit: a handful of compare-and-sets, not one per
    request. Under a limit the other process also needs, the first takes what it needs plus at
    most a quarter of the rest, and the second still gets what is left."""
    from relay.limits import slot_headroom
    clock = Clock()
    a, b = books(clock, 2)
    writes = []
    real = a.store.limits_cas

    async def counted(*args, **kwargs):
        writes.append(args)
        return await real(*args, **kwargs)
    a.store.limits_cas = counted
    big = KeyRecord("h1", "ak-1234567", "active", policy=Policy(max_concurrency=10_000))
    tickets = [await a.admit(big, 1) for _ in range(64)]
    assert a.keys["h1"].in_flight == 64 and a.keys["h1"].slots >= 64
    assert len(writes) <= 8, f"{len(writes)} compare-and-sets to ramp to 64 in flight"
    for t in tickets:
        a.finish(t, 0)

    tight = KeyRecord("h2", "ak-7654321", "active", policy=Policy(max_concurrency=12))
    held = [await a.admit(tight, 1) for _ in range(4)]
    assert a.keys["h2"].slots <= 4 + (12 - 4) // 4, "at most a quarter of the rest beyond the need"
    others = [await b.admit(tight, 1) for _ in range(12 - 4 - (a.keys["h2"].slots - 4))]
    assert len(others) >= 6
    with pytest.raises(RateLimited):
        await b.admit(tight, 1)
    for t in held:
        a.finish(t, 0)
    assert [slot_headroom(n, free) for n, free in ((1, 3), (2, 2), (1, 9), (8, 1000), (5, -1))] == [0, 0, 1, 8, 0]
    await a.close()
    await b.close()


async def test_an_unreachable_store_leaves_each_process_limiting_alone(io_loop):
    clock = Clock()
    [book] = books(clock, 1)
    key = KeyRecord("h1", "ak-1234567", "active", policy=Policy(rpm=3))

    async def down(*args, **kwargs):
        raise StoreUnavailable("down")
    book.store.limits_doc = down
    tickets = [await book.admit(key, 1) for _ in range(3)]
    assert all(t.alone for t in tickets)
    with pytest.raises(RateLimited):
        await book.admit(key, 1)


def test_durations_read_like_openais():
    assert [duration(s) for s in (0.02, 1.0, 1.5, 59.9, 360.0, 90.25)] == \
        ["20ms", "1s", "1.5s", "59.9s", "6m0s", "1m30.25s"]


async def test_two_processes_racing_for_the_last_units_never_exceed_them(io_loop):
    clock = Clock()
    procs = books(clock, 2)
    key = KeyRecord("h1", "ak-1234567", "active", policy=Policy(rpm=40))
    results = await asyncio.gather(*(procs[i % 2].admit(key, 1) for i in range(100)), return_exceptions=True)
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 40
    assert all(isinstance(r, RateLimited) for r in results if isinstance(r, BaseException))
    for b in procs:
        await b.close()


async def test_units_a_process_kept_lapse_before_the_refill_could_double_them(io_loop):
    """A process that took a big chunk during a burst, then went quiet while the store's bucket
    refilled: its chunk must not add to the next burst (that is what HOLD_S bounds)."""
    clock = Clock()
    a, b = books(clock, 2)
    key = KeyRecord("h1", "ak-1234567", "active", policy=Policy(rpm=600))
    for _ in range(300):  # a burst through a: its chunks grow to a tenth of the limit
        await a.admit(key, 1)
        clock.t += 1.0 / 300
        await asyncio.sleep(0)  # its chunk taken ahead, in the background
    await asyncio.sleep(0.05)
    assert a.keys["h1"].rpm.held > 600 * HOLD_S / 60, "a holds more than the tolerance"
    clock.t += 120  # quiet: the store's bucket is full again
    admitted = 0
    for _ in range(2000):  # then a burst through both, in one instant
        for book in (a, b):
            try:
                await book.admit(key, 1)
                admitted += 1
            except RateLimited:
                pass
    assert admitted <= 600 + 600 * HOLD_S / 60
    for book in (a, b):
        await book.close()
