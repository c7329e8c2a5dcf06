"""The store's circuit breaker: what opens it, and what does not (a failure older than the
store's return)."""
import asyncio

import pytest
from pymongo.errors import ConnectionFailure, ServerSelectionTimeoutError

from relay.errors import StoreUnavailable
from relay.store.breaker import Breaker
from relay.store.core import PROBE_EVERY_S, _op
from tests.helpers import eventually, mock_store


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_opens_the_breaker_once_and_the_return_closes_it():
    clock = Clock()
    b = Breaker(clock)
    assert b.up and b.tripped(began=clock.now) and not b.up
    clock.now += 1
    assert not b.tripped(began=clock.now), "already open: no second probe"
    assert b.down_for() == 1 and b.trips == 1
    b.reset()
    assert b.up and b.back_at == clock.now


def test_a_call_begun_before_the_store_came_back_does_not_open_the_breaker_again():
    clock = Clock()
    b = Breaker(clock)
    old = clock.now                  # a call begins, and waits through the outage
    clock.now += 0.5
    assert b.tripped(began=clock.now)  # another call finds the outage
    clock.now += 0.5
    b.reset()                        # the probe finds the store back
    clock.now += 0.4
    assert not b.tripped(began=old) and b.up, "the old call's failure is news of the old outage"
    assert b.tripped(began=b.back_at + 0.1) and not b.up, "a call begun since tells of a new one"
    assert b.trips == 2


async def test_a_store_call_failing_after_the_probe_found_the_store_back_leaves_it_serving(io_loop):
    """As seen in CI: a call waiting in the driver's server selection during an outage failed
    after the probe had found the store back, and opened the breaker again until the next probe
    (every request in between got 503)."""
    store = mock_store()
    down = True

    async def ping() -> None:
        if down:
            raise ServerSelectionTimeoutError("no server")

    store.ping = ping

    @_op("waits")
    async def waits(self, outcome: asyncio.Future):
        return await outcome

    stuck: asyncio.Future = asyncio.get_running_loop().create_future()
    old_call = asyncio.ensure_future(waits(store, stuck))  # begun while the breaker is up
    await asyncio.sleep(0)
    failed: asyncio.Future = asyncio.get_running_loop().create_future()
    failed.set_exception(ConnectionFailure("connection refused"))
    with pytest.raises(StoreUnavailable):
        await waits(store, failed)
    assert not store.breaker.up

    down = False
    await eventually(lambda: store.breaker.up, timeout=10 * PROBE_EVERY_S, message="the probe finds the store back")
    stuck.set_exception(ServerSelectionTimeoutError("timed out during the outage"))
    with pytest.raises(StoreUnavailable):
        await old_call  # the call itself failed, and says so
    assert store.breaker.up and store.breaker.trips == 1, "a stale failure opened the breaker"

    answered: asyncio.Future = asyncio.get_running_loop().create_future()
    answered.set_result("ok")
    assert await waits(store, answered) == "ok"

    down = True
    failed_now: asyncio.Future = asyncio.get_running_loop().create_future()
    failed_now.set_exception(ConnectionFailure("refused again"))
    with pytest.raises(StoreUnavailable):
        await waits(store, failed_now)
    assert not store.breaker.up and store.breaker.trips == 2, "a new outage still opens it"
    await store.close()
