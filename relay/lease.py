"""Leases: each process holds a slice of a key's balance and spends it locally.

The common request then waits for no store round trip: it reserves from, settles into and
refunds to this process's wallet for the key, in memory. The slice is recorded on the key's
document (``leases.<rid>``, counted in ``reserved``), so conservation and crash recovery are
the store's usual ones: granted = balance + reserved + used, and the sweeper returns the
leases of a process that stopped heartbeating.

Every ``COMMIT_EVERY_S`` a batch per key goes to the store (group commit): the settled
requests' ledger entries in one insert, then their costs and any units handed back or taken
on in one atomic update of the key (``MongoStore.commit_lease``). A wallet takes more from
the balance when its slice cannot cover a request, and hands its slice back after
``IDLE_RETURN_S`` without traffic.

After a kill -9 at most the last commit interval of a process's requests goes unbilled (its
slice is returned whole by the sweeper, which also deletes the entries of batches that never
applied); no unit is charged twice (each batch applies to one version of the hold, and a
batch whose answer was lost is repeated exactly) and no unit of a balance is lost.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from relay.errors import InsufficientQuota
from relay.store.mongo import UNAPPLIED_MARGIN, LedgerEntry, MongoStore

log = logging.getLogger("relay.charging")

COMMIT_EVERY_S = 0.1  # the bound on what a kill -9 leaves unbilled
IDLE_RETURN_S = 2.0
SLICE_REQUESTS = 8     # a slice covers at least this many requests like the one that asked for it,
SLICE_SECONDS = 0.5    # and at least this long of the key's recent reservations in this process
RATE_WINDOW_S = 0.5    # the recent rate is measured over windows this long
EXHAUSTED_RECHECK_S = 1.0  # after the balance could not grow a slice, ask the store again only this late


@dataclass
class Wallet:
    """This process's share of one key."""

    rid: str = ""          # the lease on the key's document (``leases.<rid>``; "" while there is none)
    amount: int = 0        # the lease's amount in the store, as of ``seq``
    seq: int = 0
    available: int = 0     # in the slice, neither held nor spent (negative after an overdraft)
    holds: dict[str, int] = field(default_factory=dict)
    batch: list[LedgerEntry] = field(default_factory=list)  # settled here, not yet committed
    last_used: float = 0.0
    exhausted_until: float = float("-inf")  # the balance had nothing more: spare the store until then
    inflight: tuple | None = None  # a commit sent without an answer: (entries, returned, extra, taken_at)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    rate: float = 0.0           # units reserved per second, over the last window
    window_units: int = 0
    window_start: float = 0.0
    topping_up: asyncio.Task | None = None
    top_up_after: float = float("-inf")

    def target(self, full: int) -> int:
        """The slice size to aim for: several requests like this one (twice as many as are in
        flight, when that is more), or half a second's worth."""
        return max(full * max(SLICE_REQUESTS, 2 * len(self.holds)), int(self.rate * SLICE_SECONDS))

    def count(self, units: int, now: float) -> None:
        self.window_units += units
        elapsed = now - self.window_start
        if elapsed >= RATE_WINDOW_S:
            # A window that spans a pause says nothing about the traffic that resumes: the last
            # rate stands until a window of traffic measures a new one.
            if elapsed < 4 * RATE_WINDOW_S:
                self.rate = self.window_units / elapsed
            self.window_units, self.window_start = 0, now


class LeaseBook:
    def __init__(self, store: MongoStore, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.clock = clock
        self.wallets: dict[str, Wallet] = {}
        self._leases = 0
        self.on_store_wait: Callable[[], None] | None = None  # a request waits for the store

    def _wallet(self, key_hash: str) -> Wallet:
        w = self.wallets.get(key_hash)
        if w is None:
            w = self.wallets[key_hash] = Wallet()
        w.last_used = self.clock()
        return w

    async def reserve(self, key_hash: str, request_id: str, minimum: int, full: int) -> int:
        """Hold ``full`` units from the slice (or what is left, if that covers ``minimum``)."""
        w = self._wallet(key_hash)
        if w.available < full and self.clock() >= w.exhausted_until:
            if self.on_store_wait is not None:
                self.on_store_wait()
            async with w.lock:
                if w.available < full and self.clock() >= w.exhausted_until:
                    if not await self._grow(key_hash, w, full - w.available, max(minimum - w.available, 0), full):
                        w.exhausted_until = self.clock() + EXHAUSTED_RECHECK_S
            if self.wallets.get(key_hash) is not w:  # its slice was swept meanwhile: start afresh
                return await self.reserve(key_hash, request_id, minimum, full)
        if w.available >= full:
            held = full
        elif w.available >= max(minimum, 1) or (minimum == 0 and full == 0):
            held = max(w.available, 0)
        else:
            raise InsufficientQuota(
                "You exceeded your current quota: this key's balance does not cover the prompt "
                f"({minimum} units). Top it up to continue.")
        w.available -= held
        w.holds[request_id] = held
        now = self.clock()
        w.count(full, now)
        if w.rid and w.topping_up is None and w.available < w.target(full) // 2 and now >= w.top_up_after:
            # Grow before the slice runs dry, so that requests keep being served from it meanwhile.
            w.topping_up = asyncio.ensure_future(self._top_up(key_hash, w, full))
        return held

    def balance_changed(self, key_hash: str) -> None:
        """A top-up through this process: ask the store again at once, not after
        ``EXHAUSTED_RECHECK_S`` (other processes notice within that time)."""
        w = self.wallets.get(key_hash)
        if w is not None:
            w.exhausted_until = w.top_up_after = float("-inf")

    async def _top_up(self, key_hash: str, w: Wallet, full: int) -> None:
        try:
            async with w.lock:
                target = w.target(full)
                if self.wallets.get(key_hash) is w and w.available < target // 2:
                    if await self._commit(key_hash, w, extra=target - w.available) is None:
                        # Not that much left: requests grow it by what they need, as they come.
                        w.top_up_after = self.clock() + EXHAUSTED_RECHECK_S
        except Exception as exc:
            # The request that finds the slice empty asks again, and reports an outage if it is one.
            log.warning("topping up the slice of a key failed (%s)", type(exc).__name__)
            w.top_up_after = self.clock() + EXHAUSTED_RECHECK_S
        finally:
            w.topping_up = None

    async def _grow(self, key_hash: str, w: Wallet, need: int, least: int, full: int) -> bool:
        """Take more of the balance into the slice: ``need`` wanted, ``least`` required.

        False when the balance had not even ``least``."""
        want = max(need, w.target(full) - w.available)
        if not w.rid:
            self._leases += 1
            rid = f"lease-{self.store.instance_id}-{self._leases}"
            try:
                got = await self.store.open_lease(key_hash, rid, least, want)
            except InsufficientQuota:
                return False
            w.rid, w.amount, w.seq = rid, got, 0
            w.available += got
            return True
        for extra in (want, need, least):  # less and less, down to what this request needs
            if extra <= 0:
                return True
            if await self._commit(key_hash, w, extra=extra) is not None:
                return True
            if self.wallets.get(key_hash) is not w:
                return True  # swept: the caller starts again with a new slice
        return False

    def settle(self, key_hash: str, request_id: str, entry: LedgerEntry) -> None:
        w = self._wallet(key_hash)
        held = w.holds.pop(request_id, 0)
        w.available += held - entry.cost
        w.batch.append(entry)

    def refund(self, key_hash: str, request_id: str) -> None:
        w = self._wallet(key_hash)
        w.available += w.holds.pop(request_id, 0)

    async def _commit(self, key_hash: str, w: Wallet, extra: int = 0, return_rest: bool = False) -> int | None:
        """Send the batch (and any change to the slice) in one update; None if ``extra`` is not there.

        An attempt whose outcome is unknown (the store did not answer) is repeated exactly,
        same entries and amounts, before anything new is sent: the store can tell whether a
        batch applied, not what it held."""
        if w.inflight is not None:
            if await self._send(key_hash, w, *w.inflight) is None and self.wallets.get(key_hash) is not w:
                return None  # swept
        # Handing back a slice that ended overdrawn charges the overdraft to the balance.
        returned = w.available if return_rest else 0
        return await self._send(key_hash, w, list(w.batch), returned, extra, self.store.clock())

    async def _send(self, key_hash: str, w: Wallet, entries: list[LedgerEntry], returned: int, extra: int,
                    taken_at) -> int | None:
        w.inflight = (entries, returned, extra, taken_at)
        try:
            new_amount = await self.store.commit_lease(key_hash, w.rid, w.amount, w.seq, entries, returned, extra,
                                                       taken_at)
        except LookupError:
            # The sweeper returned the slice (this process looked dead): what it held is back on
            # the balance, and what was spent from it since the last commit goes unbilled.
            w.inflight = None
            self.wallets.pop(key_hash, None)
            log.error("lease %s was swept; %d unit(s) of settled requests go unbilled", w.rid,
                      sum(e.cost for e in w.batch))
            # Entries this attempt inserted belong to no charge: take them out of the ledger.
            await self.store.discard_unapplied(key_hash, w.rid, w.seq, taken_at - UNAPPLIED_MARGIN)
            return None
        w.inflight = None
        if new_amount is None:
            return None
        del w.batch[:len(entries)]
        w.amount, w.seq = new_amount, w.seq + 1
        w.available += extra - returned
        return new_amount

    async def commit_all(self, return_idle: bool = True) -> None:
        """One group commit: every key with settled requests; idle slices handed back."""
        now = self.clock()
        for key_hash, w in list(self.wallets.items()):
            if not w.rid:
                continue
            idle = return_idle and not w.holds and now - w.last_used > IDLE_RETURN_S and w.available != 0
            if not w.batch and not idle and w.inflight is None:
                continue
            async with w.lock:
                await self._commit(key_hash, w, return_rest=idle)

    async def release_all(self) -> None:
        """At shutdown: commit everything and hand every slice back."""
        for w in self.wallets.values():
            w.last_used = float("-inf")
            w.top_up_after = float("inf")
        await asyncio.gather(*(w.topping_up for w in self.wallets.values() if w.topping_up is not None),
                             return_exceptions=True)
        await self.commit_all()
