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
from collections.abc import Callable
from dataclasses import dataclass, field

from bson.errors import InvalidDocument

from relay.errors import InsufficientQuota
from relay.metering.bounds import MAX_UNITS
from relay.metering.ledger import LedgerEntry
from relay.store.leases import LeaseGone
from relay.store.mongo import MongoStore

log = logging.getLogger("relay.charging")

COMMIT_EVERY_S = 0.1  # the bound on what a kill -9 leaves unbilled
IDLE_RETURN_S = 2.0
SLICE_REQUESTS = 8     # a slice covers at least this many requests like the one that asked for it,
SLICE_SECONDS = 0.5    # and at least this long of the key's recent reservations in this process
RATE_WINDOW_S = 0.5    # the recent rate is measured over windows this long
EXHAUSTED_RECHECK_S = 1.0  # after the balance could not grow a slice, ask the store again only this late


@dataclass
class Attempt:
    """A commit sent whose outcome is not known yet: repeated exactly until it is."""

    entries: list[LedgerEntry]
    returned: int
    extra: int
    refused: bool = False  # the store refused it once already (logged then)


@dataclass
class LateBatch:
    """What is owed on a slice the sweeper returned while this process still spent it (it
    looked dead: stalled, or cut off from the store): the requests settled since its last
    commit, and those still in flight that reserved from it. Charged to the balance."""

    seq: int | None                # the tombstone's next late batch; None: the tombstone is gone
    entries: list[LedgerEntry] = field(default_factory=list)
    inflight: list[LedgerEntry] | None = None
    holds: int = 0                 # requests in flight that reserved from the slice
    discard: int | None = None  # this process's own unapplied entries (from this batch on),
                                # to delete before anything is charged

    @property
    def finished(self) -> bool:
        return not self.entries and self.inflight is None and self.holds == 0


@dataclass
class Wallet:
    """This process's share of one key."""

    rid: str = ""          # the lease on the key's document (``leases.<rid>``; "" while there is none)
    amount: int = 0        # the lease's amount in the store, as of ``seq``
    seq: int = 0
    available: int = 0     # in the slice, neither held nor spent (negative after an overdraft)
    holds: dict[str, int] = field(default_factory=dict)
    batch: list[LedgerEntry] = field(default_factory=list)  # settled here, not yet sent
    last_used: float = 0.0
    exhausted_until: float = float("-inf")  # the balance lacked ``exhausted_at`` units: spare the store
    exhausted_at: int = 0                   # until then for requests that need as much or more
    inflight: Attempt | None = None  # a commit sent without an answer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    rate: float = 0.0           # units reserved per second, over the last window
    window_units: int = 0
    window_start: float = 0.0
    topping_up: asyncio.Task[None] | None = None
    top_up_after: float = float("-inf")
    orphans: dict[str, str] = field(default_factory=dict)  # request id -> swept lease it reserved from
    late: dict[str, LateBatch] = field(default_factory=dict)  # by swept lease

    def target(self, full: int) -> int:
        """The slice size to aim for: several requests like this one (twice as many as are in
        flight, when that is more), or half a second's worth."""
        return min(max(full * max(SLICE_REQUESTS, 2 * len(self.holds)), int(self.rate * SLICE_SECONDS)), MAX_UNITS)

    def known_short(self, minimum: int, now: float) -> bool:
        """The balance was found lacking what this request needs beyond the slice, a moment ago."""
        return now < self.exhausted_until and minimum - self.available >= self.exhausted_at

    def count(self, units: int, now: float) -> None:
        self.window_units += units
        elapsed = now - self.window_start
        if elapsed >= RATE_WINDOW_S:
            # A window that spans a pause says nothing about the traffic that resumes: the last
            # rate stands until a window of traffic measures a new one.
            if elapsed < 4 * RATE_WINDOW_S:
                self.rate = self.window_units / elapsed
            self.window_units, self.window_start = 0, now

    def lost_slice(self) -> LateBatch:
        """The slice was swept: what was settled or held against it becomes a late batch, and
        the wallet starts again with no lease (the next request opens a new one)."""
        late = LateBatch(seq=None, entries=self.batch, holds=len(self.holds))
        for request_id in self.holds:
            self.orphans[request_id] = self.rid
        self.late[self.rid] = late
        self.rid, self.amount, self.seq, self.available = "", 0, 0, 0
        self.holds, self.batch, self.inflight = {}, [], None
        return late


class LeaseBook:
    def __init__(self, store: MongoStore, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.clock = clock
        self.wallets: dict[str, Wallet] = {}
        self._leases = 0
        self.on_store_wait: Callable[[], None] | None = None  # a request waits for the store
        self.on_unbillable: Callable[[str, int], None] | None = None  # (reason, requests) that cannot be billed

    def _wallet(self, key_hash: str) -> Wallet:
        w = self.wallets.get(key_hash)
        if w is None:
            w = self.wallets[key_hash] = Wallet()
        w.last_used = self.clock()
        return w

    async def reserve(self, key_hash: str, request_id: str, minimum: int, full: int) -> int:
        """Hold ``full`` units from the slice (or what is left, if that covers ``minimum``)."""
        full = min(full, MAX_UNITS)
        minimum = min(minimum, full)
        w = self._wallet(key_hash)
        if w.available < full and not w.known_short(minimum, self.clock()):
            if self.on_store_wait is not None:
                self.on_store_wait()
            async with w.lock:
                if w.available < full and not w.known_short(minimum, self.clock()):
                    if not await self._grow(key_hash, w, minimum, full):
                        w.exhausted_until = self.clock() + EXHAUSTED_RECHECK_S
                        w.exhausted_at = max(minimum - w.available, 1)
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
                if w.rid and w.available < target // 2:
                    if await self._commit(key_hash, w, extra=target - w.available) is None:
                        # Not that much left: requests grow it by what they need, as they come.
                        w.top_up_after = self.clock() + EXHAUSTED_RECHECK_S
        except Exception as exc:
            # The request that finds the slice empty asks again, and reports an outage if it is one.
            log.warning("topping up the slice of a key failed (%s)", type(exc).__name__)
            w.top_up_after = self.clock() + EXHAUSTED_RECHECK_S
        finally:
            w.topping_up = None

    async def _grow(self, key_hash: str, w: Wallet, minimum: int, full: int) -> bool:
        """Take more of the balance into the slice, to cover ``full`` (at least ``minimum``).

        False when the balance had not even what ``minimum`` lacks."""
        while True:
            need, least = full - w.available, max(minimum - w.available, 0)
            want = max(need, w.target(full) - w.available)
            if not w.rid:
                return await self._open(key_hash, w, least, want)
            rid = w.rid
            for extra in (want, need, least):  # less and less, down to what this request needs
                if extra <= 0:
                    return True
                if await self._commit(key_hash, w, extra=extra) is not None:
                    return True
                if w.rid != rid:
                    break  # the slice was swept: open a new one
            else:
                return False

    async def _open(self, key_hash: str, w: Wallet, least: int, want: int) -> bool:
        self._leases += 1
        rid = f"lease-{self.store.instance_id}-{self._leases}"
        try:
            got = await self.store.open_lease(key_hash, rid, least, want)
        except InsufficientQuota:
            return False
        w.rid, w.amount, w.seq = rid, got, 0
        w.available += got
        return True

    def settle(self, key_hash: str, request_id: str, entry: LedgerEntry) -> None:
        w = self._wallet(key_hash)
        swept = w.orphans.pop(request_id, None)
        if swept is not None:  # it reserved from a slice the sweeper has returned since
            late = w.late[swept]
            late.holds -= 1
            late.entries.append(entry)
            return
        held = w.holds.pop(request_id, 0)
        w.available += held - entry.cost
        entry.encoded()  # now, not in the group commit (see LedgerEntry._bson)
        w.batch.append(entry)

    def refund(self, key_hash: str, request_id: str) -> None:
        w = self._wallet(key_hash)
        swept = w.orphans.pop(request_id, None)
        if swept is not None:
            w.late[swept].holds -= 1  # the sweeper returned its units with the slice
            return
        w.available += w.holds.pop(request_id, 0)

    async def _commit(self, key_hash: str, w: Wallet, extra: int = 0, return_rest: bool = False) -> int | None:
        """Send the batch (and any change to the slice) in one update; None if ``extra`` is not
        there (the batch applied without it), or if the slice turned out to be swept (``w.rid``
        is then "").

        An attempt whose outcome is unknown (the store did not answer) is repeated exactly,
        same entries and amounts, before anything new is sent: the store can tell whether a
        batch applied, not what it held."""
        if w.inflight is not None:
            await self._send(key_hash, w, w.inflight)
            if not w.rid:
                return None
        # Units handed back leave the slice now, before the store hears of it: a request that
        # arrives meanwhile must not reserve what is on its way back. Handing back a slice that
        # ended overdrawn charges the overdraft to the balance.
        attempt = Attempt(w.batch, w.available if return_rest else 0, extra)
        w.batch = []
        w.available -= attempt.returned
        return await self._send(key_hash, w, attempt)

    async def _send(self, key_hash: str, w: Wallet, a: Attempt) -> int | None:
        w.inflight = a
        try:
            new_amount = await self.store.commit_lease(key_hash, w.rid, w.amount, w.seq, a.entries, a.returned,
                                                       a.extra)
        except LeaseGone as gone:
            self._swept(w, a, gone.unapplied_from)
            return None
        except Exception as exc:
            if _retry_fixes(exc):
                raise  # the outcome is unknown: ``inflight`` is repeated exactly
            await self._reject(key_hash, w, a, exc)
            return None
        w.inflight = None
        if new_amount is None:  # the balance lacked ``extra``: the batch applied without it
            w.amount, w.seq = w.amount - sum(e.cost for e in a.entries) - a.returned, w.seq + 1
            return None
        w.amount, w.seq = new_amount, w.seq + 1
        w.available += a.extra
        return new_amount

    def _swept(self, w: Wallet, a: Attempt, unapplied_from: int | None) -> None:
        rid, seq = w.rid, w.seq
        applied = unapplied_from is not None and unapplied_from > seq  # its answer was lost, it did apply
        if not applied:
            w.batch[:0] = a.entries
        late = w.lost_slice()
        late.seq = unapplied_from
        if not applied and a.entries:
            # What this attempt inserted was never charged: out of the ledger before the late
            # batch charges it again (the sweeper deletes it too, on its next pass).
            late.discard = seq
        log.error("lease %s was swept (this process looked dead); %d settled and %d held request(s) are "
                  "charged to the balance directly", rid, len(late.entries), late.holds)

    async def _reject(self, key_hash: str, w: Wallet, a: Attempt, exc: Exception) -> None:
        """The store refused the batch for a reason no retry can fix (nothing it holds can be
        out of range: entries are bounded when settled, so this is a defect). Its requests go
        unbilled, once, loudly; what it may have inserted leaves the ledger; the slice keeps
        the units, so conservation holds."""
        if not a.refused:
            a.refused = True
            log.error("a group commit of %d request(s) was refused by the store (%s); they go unbilled",
                      len(a.entries), type(exc).__name__, exc_info=exc)
            if self.on_unbillable is not None and a.entries:
                self.on_unbillable("commit_refused", len(a.entries))
        if a.entries:  # until this succeeds, the attempt stays in flight and comes back here
            await self.store.discard_unapplied(key_hash, w.rid, w.seq)
        w.inflight = None
        w.available += a.returned + sum(e.cost for e in a.entries)

    async def _commit_late(self, key_hash: str, w: Wallet) -> None:
        for rid, late in list(w.late.items()):
            if late.discard is not None:
                await self.store.discard_unapplied(key_hash, rid, late.discard)
                late.discard = None
            if late.inflight is None and late.entries:
                late.inflight, late.entries = late.entries, []
            if late.inflight is not None:
                if late.seq is not None and await self.store.commit_late(key_hash, rid, late.seq, late.inflight):
                    late.seq += 1
                else:
                    log.error("%d request(s) settled against lease %s cannot be billed: the store forgot the "
                              "lease (away longer than its tombstone lives)", len(late.inflight), rid)
                    if self.on_unbillable is not None:
                        self.on_unbillable("lease_forgotten", len(late.inflight))
                late.inflight = None
            if late.finished:
                del w.late[rid]

    def busy(self) -> bool:
        """Requests hold units, or a commit's outcome is not known yet."""
        return any(w.holds or w.orphans or w.inflight is not None for w in self.wallets.values())

    async def commit_all(self, return_idle: bool = True, hand_back: bool = False) -> None:
        """One group commit: every key with settled requests; idle slices handed back (with
        ``hand_back``, every slice no request holds from)."""
        now = self.clock()
        for key_hash, w in list(self.wallets.items()):
            if w.late:
                async with w.lock:
                    await self._commit_late(key_hash, w)
            if not w.rid:
                if not w.batch:
                    continue
                async with w.lock:  # settled without a slice (a request that cost nothing): open one
                    if not w.rid and not await self._open(key_hash, w, 0, 0):
                        continue
            idle = not w.holds and w.available != 0 and (
                hand_back or (return_idle and now - w.last_used > IDLE_RETURN_S))
            if not w.batch and not idle and w.inflight is None:
                continue
            async with w.lock:
                if w.rid:
                    await self._commit(key_hash, w, return_rest=idle)

    async def release_all(self) -> None:
        """At shutdown: commit everything and hand every slice back."""
        for w in self.wallets.values():
            w.top_up_after = float("inf")
        await asyncio.gather(*(w.topping_up for w in self.wallets.values() if w.topping_up is not None),
                             return_exceptions=True)
        await self.commit_all(hand_back=True)


def _retry_fixes(exc: Exception) -> bool:
    """Whether repeating the same commit can succeed: the store was unreachable or busy, or
    any other server-side condition; not an error raised before anything was sent (encoding)."""
    return not isinstance(exc, (OverflowError, InvalidDocument, TypeError, ValueError))
