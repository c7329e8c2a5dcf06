"""The store's connection: collections, the circuit breaker around every call, the store's time."""
from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeAlias, TypeVar

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure

from relay.errors import RelayError, StoreUnavailable
from relay.metering.ledger import utc_now
from relay.store.breaker import Breaker

log = logging.getLogger("relay.store")

CALL_TIMEOUT_S = 2.5         # one store call, at most: past it the store counts as unreachable
PROBE_EVERY_S = 0.25         # while it is, a ping this often finds out when it is back
UNAVAILABLE = "The quota store is unavailable; nothing was charged. Retry shortly."

# A document as the drivers read and write it (BSON values: str, int, datetime, lists, dicts).
Document: TypeAlias = dict[str, Any]
# A collection, typed as PyMongo's async one: motor's (RELAY_MONGO_CLIENT=motor, untyped) and
# the tests' mongomock_motor have the same surface for every call the store makes.
Collection: TypeAlias = AsyncCollection[Document]

S = TypeVar("S", bound="StoreCore")
P = ParamSpec("P")
R = TypeVar("R")
# A store method (``async def``): the store, then its own parameters.
StoreMethod: TypeAlias = Callable[Concatenate[S, P], Coroutine[Any, Any, R]]


def _op(op: str, bounded: bool = True) -> Callable[[StoreMethod[S, P, R]], StoreMethod[S, P, R]]:
    """Every store call: failed at once while the store is known to be unreachable; bounded
    by ``CALL_TIMEOUT_S`` (``bounded``); an unreachable store becomes ``StoreUnavailable``
    and starts the probe; latency and success reported to ``store.observe``."""
    def wrap(fn: StoreMethod[S, P, R]) -> StoreMethod[S, P, R]:
        @functools.wraps(fn)
        async def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            if not self.breaker.up:
                self._report(op, 0.0, False)
                raise StoreUnavailable(UNAVAILABLE)
            began, started, ok = self.breaker.clock(), time.perf_counter(), False
            try:
                work = fn(self, *args, **kwargs)
                result = await (asyncio.wait_for(work, self.call_timeout_s) if bounded else work)
                ok = True
                return result
            except StoreUnavailable:
                raise
            except RelayError:
                ok = True  # an answer about the key (no quota, disabled), not a store failure
                raise
            except (TimeoutError, ConnectionFailure):
                self._unreachable(began)
                raise StoreUnavailable(UNAVAILABLE) from None
            finally:
                self._report(op, time.perf_counter() - started, ok)
        return call
    return wrap



class StoreCore:
    def __init__(self, client: Any, db_name: str = "relay",
                 instance_id: str | None = None, clock: Callable[[], dt.datetime] = utc_now,
                 monotonic: Callable[[], float] = time.monotonic):
        self.client = client
        self.db: AsyncDatabase[Document] = client[db_name]
        self.instance_id = instance_id or "p_" + secrets.token_hex(6)
        self.clock = clock
        self.monotonic = monotonic
        self.clock_offset = dt.timedelta(0)  # the store's clock minus this process's, measured
        self.breaker = Breaker(monotonic)
        self.call_timeout_s = CALL_TIMEOUT_S
        self._probe_task: asyncio.Task[None] | None = None
        self._beats: dict[str, tuple[Any, float]] = {}  # process -> (heartbeat count, when it last moved)
        self.keys: Collection = self.db["keys"]
        self.ledger: Collection = self.db["ledger"]
        self.grants: Collection = self.db["grants"]
        self.processes: Collection = self.db["processes"]
        self.codes: Collection = self.db["codes"]    # top-up codes, by hash (store/codes.py)
        self.limits: Collection = self.db["limits"]  # per-key rate limit buckets (store/limits.py)
        self.round_trips = 0  # store operations issued, for the benchmark's per-request count
        self.dirty: set[str] = set()  # keys whose outbox this process filled since its last flush
        self.observe: Callable[[str, float, bool], None] | None = None
        self.on_unreachable: Callable[[bool], None] | None = None  # True: lost; False: back

    def now(self) -> dt.datetime:
        """The store's time, as well as this process can tell: what a timestamp another
        process compares (hold and lease ages) is written in."""
        return self.clock() + self.clock_offset

    def _report(self, op: str, seconds: float, ok: bool) -> None:
        if self.observe is not None:
            self.observe(op, seconds, ok)

    def _unreachable(self, began: float) -> None:
        if self.breaker.tripped(began):
            log.error("the store is unreachable; requests that need it get 503 until it answers again")
            if self.on_unreachable is not None:
                self.on_unreachable(True)
            self._probe_task = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            try:
                await asyncio.wait_for(self.ping(), self.call_timeout_s)
                await asyncio.wait_for(self._back(), self.call_timeout_s)
            except Exception:
                continue
            log.warning("the store answers again after %.1f s", self.breaker.down_for())
            self.breaker.reset()
            if self.on_unreachable is not None:
                self.on_unreachable(False)
            return

    async def _back(self) -> None:
        """The store answers again: what must reach it before anything else does (the
        breaker is still open meanwhile). See ``RecoveryMixin._back``."""

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()

    async def ensure_indexes(self) -> None:
        await self.keys.create_index("prefix")
        await self.keys.create_index("holds.owner")
        await self.ledger.create_index([("key_hash", 1), ("at", -1)])
        await self.ledger.create_index([("at", -1)])
        await self.ledger.create_index([("lease", 1), ("lseq", 1)])  # the sweeper's discard_unapplied
        await self.grants.create_index([("key_hash", 1), ("at", 1)])
        await self.codes.create_index("prefix")
        await self.codes.create_index("applied")

    async def ping(self) -> None:
        await self.client.admin.command("ping")
