"""Keys, reservations, the ledger and daily usage in MongoDB (PyMongo async or motor).

Conservation, per key: granted = balance + reserved + used, and
used = Σ ledger costs + Σ costs of entries still waiting in the key's outbox.

Every money movement is one atomic update of the key's own document, so no transaction
is needed (a standalone MongoDB works too) and concurrent requests on one key never
conflict the way multi-document transactions do:
- reserve: push a hold and move its amount from ``balance`` to ``reserved``;
- settle: pull the hold, charge ``used``, count the day's usage (``days``), and push the
  ledger entry onto the key's outbox (``pending``);
- refund: pull the hold and return its amount.
Every update that removes a hold filters on that hold, so nothing happens twice. The
outbox is moved to the ``ledger`` collection by ``flush_ledger`` (insert by request id,
then pull: a repeat after a crash inserts nothing twice). The sweeper refunds holds whose
owning process stopped sending heartbeats (a crash), and flushes every outbox.

With leases (relay/lease.py) a process charges batches against a slice it holds on the key
(``leases.<rid>``, counted in ``reserved``); a batch's ledger entries are inserted first and
charged second (``commit_lease``), and the sweeper returns a dead process's slice and deletes
the entries of its batches that never applied.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

from pymongo.errors import BulkWriteError, ConnectionFailure

from relay.errors import InsufficientQuota, InvalidRequest, KeyDisabled, RelayError, StoreUnavailable
from relay.keys import display_prefix, generate_key, hash_key
from relay.metering.bounds import MAX_UNITS
from relay.store.base import KeyRecord
from relay.store.breaker import Breaker

log = logging.getLogger("relay.store")

HEARTBEAT_EVERY_S = 5.0
RESERVE_ATTEMPTS = 50
DEAD_AFTER_S = 30.0          # a process whose heartbeat did not move this long (by the sweeper's own
                             # clock) has crashed or lost the store; its holds and leases are swept
CALL_TIMEOUT_S = 2.5         # one store call, at most: past it the store counts as unreachable
PROBE_EVERY_S = 0.25         # while it is, a ping this often finds out when it is back
UNAVAILABLE = "The quota store is unavailable; nothing was charged. Retry shortly."
MAX_HOLD_AGE_S = 6 * 3600.0  # no request lives this long, whatever its owner says
DUPLICATE_KEY = 11000         # MongoDB's error code for an _id (or unique index) already taken
TOMBSTONE_SEQ = -1           # a returned lease: no batch can apply to it
UNAPPLIED_MARGIN = dt.timedelta(seconds=60)  # wall clocks step back (NTP); a batch's entries are never older


@dataclass(frozen=True)
class LedgerEntry:
    request_id: str
    key_hash: str
    model: str
    upstream: str
    prompt_tokens: int
    completion_tokens: int
    cost: int
    status: int
    latency_ms: float
    ttfb_ms: float
    stream: bool
    at: dt.datetime


class LeaseGone(LookupError):
    """The sweeper returned this lease (its process looked dead). ``unapplied_from``: the
    first of its batches that never applied, as the tombstone records; None when even the
    tombstone is gone."""

    def __init__(self, rid: str, unapplied_from: int | None):
        super().__init__(f"lease {rid} is gone (swept)")
        self.unapplied_from = unapplied_from


def _op(op: str, bounded: bool = True):
    """Every store call: failed at once while the store is known to be unreachable; bounded
    by ``CALL_TIMEOUT_S`` (``bounded``); an unreachable store becomes ``StoreUnavailable``
    and starts the probe; latency and success reported to ``store.observe``."""
    def wrap(fn):
        @functools.wraps(fn)
        async def call(self, *args, **kwargs):
            if not self.breaker.up:
                self._report(op, 0.0, False)
                raise StoreUnavailable(UNAVAILABLE)
            started, ok = time.perf_counter(), False
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
            except (ConnectionFailure, asyncio.TimeoutError):
                self._unreachable()
                raise StoreUnavailable(UNAVAILABLE) from None
            finally:
                self._report(op, time.perf_counter() - started, ok)
        return call
    return wrap


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def day_of(at: dt.datetime) -> str:
    return at.strftime("%Y-%m-%d")


_ENTRY_FIELDS = tuple(f for f in LedgerEntry.__dataclass_fields__ if f != "request_id")


def _ledger_doc(entry: LedgerEntry, lease: str | None = None, lseq: int | None = None) -> dict:
    """A ledger entry as stored: its request id is the document's _id; entries settled under a
    lease carry the lease and the batch (``lseq``) that charges them."""
    # Not dataclasses.asdict: it deep-copies every field, 15 µs an entry, paid inside the event
    # loop for every entry of every group commit.
    doc = {"_id": entry.request_id}
    for name in _ENTRY_FIELDS:
        doc[name] = getattr(entry, name)
    if lease is not None:
        doc["lease"], doc["lseq"] = lease, lseq
    return doc


def _day_counts(entries: list[LedgerEntry]) -> dict[str, int]:
    """``$inc`` fields that count these entries into the key's per-day usage (``days``)."""
    inc: dict[str, int] = {}
    for e in entries:
        day = f"days.{day_of(e.at)}"
        for field, value in (("cost", e.cost), ("requests", 1), ("prompt_tokens", e.prompt_tokens),
                             ("completion_tokens", e.completion_tokens)):
            inc[f"{day}.{field}"] = inc.get(f"{day}.{field}", 0) + value
    return inc


class MongoStore:
    def __init__(self, client: Any, db_name: str = "relay",
                 instance_id: str | None = None, clock: Callable[[], dt.datetime] = utc_now,
                 monotonic: Callable[[], float] = time.monotonic):
        self.client = client
        self.db = client[db_name]
        self.instance_id = instance_id or "p_" + secrets.token_hex(6)
        self.clock = clock
        self.monotonic = monotonic
        self.clock_offset = dt.timedelta(0)  # the store's clock minus this process's, measured
        self.breaker = Breaker(monotonic)
        self.call_timeout_s = CALL_TIMEOUT_S
        self._probe_task: asyncio.Task | None = None
        self._beats: dict[str, tuple[Any, float]] = {}  # process -> (heartbeat count, when it last moved)
        self.keys = self.db["keys"]
        self.ledger = self.db["ledger"]
        self.grants = self.db["grants"]
        self.processes = self.db["processes"]
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

    def _unreachable(self) -> None:
        if self.breaker.tripped():
            log.error("the store is unreachable; requests that need it get 503 until it answers again")
            if self.on_unreachable is not None:
                self.on_unreachable(True)
            self._probe_task = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            try:
                await asyncio.wait_for(self.ping(), self.call_timeout_s)
            except Exception:
                continue
            log.warning("the store answers again after %.1f s", self.breaker.down_for())
            self.breaker.reset()
            if self.on_unreachable is not None:
                self.on_unreachable(False)
            return

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()

    # --- set-up -------------------------------------------------------------------------

    async def ensure_indexes(self) -> None:
        await self.keys.create_index("prefix")
        await self.keys.create_index("holds.owner")
        await self.ledger.create_index([("key_hash", 1), ("at", -1)])
        await self.ledger.create_index([("at", -1)])
        await self.grants.create_index([("key_hash", 1), ("at", 1)])

    async def ping(self) -> None:
        await self.client.admin.command("ping")

    # --- keys ---------------------------------------------------------------------------

    @_op("create_key")
    async def create_key(self, quota: int, note: str = "", key: str | None = None) -> tuple[str, dict]:
        """A new key holding ``quota`` units; ``key`` lets tests choose it, otherwise it is random."""
        if not 0 <= quota <= MAX_UNITS:
            raise InvalidRequest(f"quota must be between 0 and {MAX_UNITS}", param="quota")
        key = key or generate_key()
        now = self.now()
        doc = {"_id": hash_key(key), "prefix": display_prefix(key), "note": note, "status": "active",
               "granted": quota, "balance": quota, "reserved": 0, "used": 0, "holds": [], "pending": [],
               "days": {}, "created_at": now}
        await self.keys.insert_one(doc)
        await self.grants.insert_one({"key_hash": doc["_id"], "amount": quota, "kind": "create", "at": now})
        return key, doc

    @_op("find_key")
    async def find_key(self, key_hash: str) -> KeyRecord | None:
        self.round_trips += 1
        doc = await self.keys.find_one({"_id": key_hash}, {"prefix": 1, "status": 1, "note": 1})
        if doc is None:
            return None
        return KeyRecord(doc["_id"], doc["prefix"], doc["status"], doc.get("note", ""))

    @_op("key_doc")
    async def key_doc(self, key_hash: str) -> dict | None:
        return await self.keys.find_one({"_id": key_hash})

    @_op("resolve")
    async def resolve(self, key_or_prefix: str) -> dict:
        """A key document by the full key, its hash, or its display prefix (unique)."""
        if len(key_or_prefix) > 20:
            doc = await self.keys.find_one({"_id": hash_key(key_or_prefix)}) or \
                await self.keys.find_one({"_id": key_or_prefix})
            if doc:
                return doc
        else:
            docs = await self.keys.find({"prefix": key_or_prefix}).to_list(length=2)
            if len(docs) > 1:
                raise InvalidRequest("That prefix matches more than one key; give the whole key.")
            if docs:
                return docs[0]
        raise LookupError("no such key")

    @_op("topup")
    async def topup(self, key_hash: str, amount: int) -> dict:
        if not 0 < amount <= MAX_UNITS:
            raise InvalidRequest(f"a top-up must be between 1 and {MAX_UNITS}", param="quota")
        doc = await self._find_and_update({"_id": key_hash, "granted": {"$lte": MAX_UNITS - amount}},
                                          {"$inc": {"granted": amount, "balance": amount}})
        if doc is None:
            if await self.keys.find_one({"_id": key_hash}, {"_id": 1}) is None:
                raise LookupError("no such key")
            raise InvalidRequest(f"a key may be granted at most {MAX_UNITS} units in all", param="quota")
        await self.grants.insert_one({"key_hash": key_hash, "amount": amount, "kind": "topup", "at": self.now()})
        return doc

    @_op("set_status")
    async def set_status(self, key_hash: str, status: str) -> dict:
        doc = await self._find_and_update({"_id": key_hash}, {"$set": {"status": status}})
        if doc is None:
            raise LookupError("no such key")
        return doc

    @_op("list_keys")
    async def list_keys(self, limit: int = 1000) -> list[dict]:
        return await self.keys.find({}, {"holds": 0, "pending": 0, "days": 0}).sort("created_at", 1).to_list(
            length=limit)

    async def _find_and_update(self, flt: dict, update: dict) -> dict | None:
        from pymongo import ReturnDocument
        return await self.keys.find_one_and_update(flt, update, return_document=ReturnDocument.AFTER)

    # --- charging -----------------------------------------------------------------------

    @_op("reserve")
    async def reserve(self, key_hash: str, request_id: str, minimum: int, full: int) -> int:
        """Hold ``full`` units, or whatever is left if that still covers ``minimum``.

        Returns the amount held. Raises InsufficientQuota when even ``minimum`` is not there.
        """
        hold_base = {"rid": request_id, "owner": self.instance_id, "at": self.now()}
        return await self._take(key_hash, minimum, full, lambda amount: {
            "$inc": {"balance": -amount, "reserved": amount}, "$push": {"holds": {**hold_base, "amount": amount}}})

    @_op("open_lease")
    async def open_lease(self, key_hash: str, rid: str, minimum: int, full: int) -> int:
        """A lease: a slice of the balance this process spends locally (see relay/lease.py)."""
        now = self.now()
        lease = {"owner": self.instance_id, "at": now, "next_from": self.clock(), "seq": 0}
        return await self._take(key_hash, minimum, full, lambda amount: {
            "$inc": {"balance": -amount, "reserved": amount}, "$set": {f"leases.{rid}": {**lease, "amount": amount}}})

    async def _take(self, key_hash: str, minimum: int, full: int, update_for) -> int:
        amount = full
        for attempt in range(RESERVE_ATTEMPTS):  # compare-and-set on the balance when only a part is left
            if attempt > 1:
                await asyncio.sleep(random.uniform(0.001, 0.005))  # others settle and reserve meanwhile
            flt: dict = {"_id": key_hash, "status": "active"}
            if full > 0:  # one that costs nothing needs no balance, even an overdrawn one
                flt["balance"] = {"$gte": amount} if amount == full else amount
            self.round_trips += 1
            res = await self.keys.update_one(flt, update_for(amount))
            if res.modified_count == 1:
                return amount
            self.round_trips += 1
            doc = await self.keys.find_one({"_id": key_hash}, {"balance": 1, "status": 1})
            if doc is None:
                raise LookupError("no such key")
            if doc["status"] != "active":
                raise KeyDisabled("This relay key has been disabled.")
            balance = doc["balance"]
            if balance < max(minimum, 1) and not (minimum == 0 and full == 0):
                raise InsufficientQuota(
                    "You exceeded your current quota: this key's balance "
                    f"({max(balance, 0)} units) does not cover the prompt ({minimum} units). Top it up to continue.")
            amount = min(full, balance)
        raise StoreUnavailable("The quota could not be reserved under contention; retry.")

    @_op("refund")
    async def refund(self, key_hash: str, request_id: str, amount: int) -> bool:
        """Return a hold of ``amount`` in full. False when it was already settled or swept."""
        self.round_trips += 1
        res = await self.keys.update_one(
            {"_id": key_hash, "holds": {"$elemMatch": {"rid": request_id, "amount": amount}}},
            {"$pull": {"holds": {"rid": request_id}}, "$inc": {"balance": amount, "reserved": -amount}})
        if res.modified_count == 1:
            return True
        # Swept meanwhile: its units are back already; only the sweeper's note goes.
        await self.keys.update_one({"_id": key_hash, "swept.rid": request_id},
                                   {"$pull": {"swept": {"rid": request_id}}})
        return False

    @_op("settle")
    async def settle(self, entry: LedgerEntry, held: int) -> bool:
        """Charge ``entry.cost`` against the hold: balance, usage, day and outbox move together.

        False when the hold was gone (already settled, or swept): nothing is charged.
        """
        self.round_trips += 1
        res = await self.keys.update_one(
            {"_id": entry.key_hash, "holds": {"$elemMatch": {"rid": entry.request_id, "amount": held}}},
            {"$pull": {"holds": {"rid": entry.request_id}},
             "$push": {"pending": _ledger_doc(entry)},
             "$inc": {"reserved": -held, "balance": held - entry.cost, "used": entry.cost,
                      **_day_counts([entry])}})
        if res.modified_count == 1:
            self.dirty.add(entry.key_hash)
            return True
        # The sweeper returned the hold (its process looked dead: cut off from the store, or
        # stalled); the request was served all the same, so the balance pays, exactly once.
        res = await self.keys.update_one(
            {"_id": entry.key_hash, "swept.rid": entry.request_id},
            {"$pull": {"swept": {"rid": entry.request_id}}, "$push": {"pending": _ledger_doc(entry)},
             "$inc": {"balance": -entry.cost, "used": entry.cost, **_day_counts([entry])}})
        if res.modified_count == 1:
            self.dirty.add(entry.key_hash)
            log.warning("settled %s after its hold was swept: charged to the balance", entry.request_id)
            return True
        return False

    @_op("commit_lease")
    async def commit_lease(self, key_hash: str, rid: str, amount: int, seq: int, entries: list[LedgerEntry],
                           returned: int, extra: int, taken_at: dt.datetime | None = None) -> int | None:
        """Apply one process's batch against its lease hold.

        The lease ``rid`` holds ``amount`` (at version ``seq``). The batch charges the entries'
        costs, gives ``returned`` units back to the balance and takes ``extra`` more from it.
        Returns the lease's new amount, or None when the balance lacks ``extra``.

        The entries go straight into ``ledger``, tagged with the lease and ``seq`` (``lease``,
        ``lseq``), before the key's document is charged in one atomic update filtered on the
        lease as it was at ``seq``. An entry thus exists before its cost leaves the lease, and
        a crash in between leaves entries of a batch that was never charged: the sweeper
        deletes them when it returns the lease (``lseq >= `` the lease's last ``seq``). No
        outbox: the ledger is written once per entry (with outbox, flush and pull the embedded
        store spent 1.14 ms of CPU per relay request in bench/proxy_compare.py; this way 0.24).

        ``taken_at``: when the batch was taken from the process's list; entries of later
        batches settled after it (``next_from`` on the lease), which bounds the sweeper's search.

        Idempotent when repeated with the same arguments: the insert skips what is there, and
        the update applies only to the hold as it was at ``seq``; a repeat after a lost answer
        finds the lease at ``seq + 1`` and reports the same result. A repeat must carry exactly
        the same batch (see ``LeaseBook``): the lease's version says that batch ``seq`` applied,
        not which entries it held.
        """
        spent = sum(e.cost for e in entries)
        new_amount = amount - spent - returned + extra
        if entries:
            self.round_trips += 1
            # Some may be there from an attempt whose answer was lost.
            await self._insert_ledger([_ledger_doc(e, lease=rid, lseq=seq) for e in entries])
        inc = {"reserved": new_amount - amount, "balance": returned - extra, "used": spent, **_day_counts(entries)}
        flt: dict = {"_id": key_hash, f"leases.{rid}.amount": amount, f"leases.{rid}.seq": seq}
        if extra:
            flt["balance"] = {"$gte": extra}
        # An emptied lease stays (amount 0) so that a repeat of this batch can still tell it applied.
        update = {"$inc": inc, "$set": {f"leases.{rid}.amount": new_amount, f"leases.{rid}.seq": seq + 1,
                                       f"leases.{rid}.at": self.now(),
                                       f"leases.{rid}.next_from": taken_at or self.clock()}}
        self.round_trips += 1
        res = await self.keys.update_one(flt, update)
        if res.modified_count == 1:
            return new_amount
        # Not applied now: applied before (an answer lost on the way), the balance is short,
        # or the lease is gone (the sweeper returned it).
        doc = await self.keys.find_one({"_id": key_hash}, {f"leases.{rid}": 1})
        lease = ((doc or {}).get("leases") or {}).get(rid) or {}
        if lease.get("seq") == seq + 1:
            return new_amount
        if extra and lease.get("seq") == seq and lease.get("amount") == amount:
            return None  # the entries wait, inserted, for this ``seq`` to apply with a smaller ``extra``
        raise LeaseGone(rid, lease.get("unapplied_from") if lease.get("seq") == TOMBSTONE_SEQ else None)

    @_op("commit_late")
    async def commit_late(self, key_hash: str, rid: str, seq: int, entries: list[LedgerEntry]) -> bool:
        """Charge entries settled against lease ``rid`` after the sweeper returned it: to the
        balance, with the ledger entries through the key's outbox, in one update.

        The tombstone counts these late batches (``late_seq``), so a repeat after a lost answer
        charges nothing twice. False when the tombstone is gone too (the process was away for
        longer than ``MAX_HOLD_AGE_S``): nothing can be charged exactly any more."""
        spent = sum(e.cost for e in entries)
        self.round_trips += 1
        res = await self.keys.update_one(
            {"_id": key_hash, f"leases.{rid}.seq": TOMBSTONE_SEQ, f"leases.{rid}.late_seq": seq},
            {"$inc": {"balance": -spent, "used": spent, **_day_counts(entries)},
             "$push": {"pending": {"$each": [_ledger_doc(e) for e in entries]}},
             "$set": {f"leases.{rid}.late_seq": seq + 1}})
        if res.modified_count == 1:
            self.dirty.add(key_hash)
            return True
        doc = await self.keys.find_one({"_id": key_hash}, {f"leases.{rid}": 1})
        tomb = ((doc or {}).get("leases") or {}).get(rid) or {}
        return tomb.get("seq") == TOMBSTONE_SEQ and tomb.get("late_seq", seq) > seq

    async def _insert_ledger(self, docs: list[dict]) -> None:
        """Insert ledger documents, each exactly once: those already there (same request id,
        the _id) are skipped, any other failure is raised."""
        try:
            await self.ledger.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            if any(err.get("code") != DUPLICATE_KEY for err in exc.details.get("writeErrors", [])):
                raise

    @_op("discard_unapplied")
    async def discard_unapplied(self, key_hash: str, rid: str, seq: int, since: dt.datetime) -> int:
        """Delete ledger entries of lease ``rid``'s batches from ``seq`` on, which were never
        charged (the lease was returned before they applied). ``since``: no such entry is
        older, so the key's ledger index finds them without reading the key's whole history."""
        res = await self.ledger.delete_many({"key_hash": key_hash, "at": {"$gte": since}, "lease": rid,
                                             "lseq": {"$gte": seq}})
        return res.deleted_count

    @_op("flush_ledger", bounded=False)
    async def flush_ledger(self, key_hashes: set[str] | None = None) -> int:
        """Move outbox entries to the ledger collection; returns how many were moved.

        With no ``key_hashes``, every key with an outbox (the sweeper's pass).
        """
        if key_hashes is None:
            flt: dict = {"pending.0": {"$exists": True}}
        else:
            if not key_hashes:
                return 0
            flt = {"_id": {"$in": list(key_hashes)}, "pending.0": {"$exists": True}}
        moved = 0
        for doc in await self.keys.find(flt, {"pending": 1}).to_list(length=None):
            entries = doc["pending"]
            await self._insert_ledger(entries)  # some may be there from a flush that crashed before its pull
            await self.keys.update_one({"_id": doc["_id"]},
                                       {"$pull": {"pending": {"_id": {"$in": [e["_id"] for e in entries]}}}})
            moved += len(entries)
        return moved

    # --- billing ------------------------------------------------------------------------

    @_op("usage_days")
    async def usage_days(self, key_hash: str, first_day: str, last_day: str) -> list[dict]:
        """Daily usage with ``first_day <= day <= last_day`` (YYYY-MM-DD), oldest first."""
        doc = await self.keys.find_one({"_id": key_hash}, {"days": 1})
        days = (doc or {}).get("days") or {}
        return [{"day": d, **days[d]} for d in sorted(days) if first_day <= d <= last_day]

    @_op("recent_ledger")
    async def recent_ledger(self, key_hash: str, limit: int = 50) -> list[dict]:
        return await self.ledger.find({"key_hash": key_hash}).sort("at", -1).to_list(length=limit)

    @_op("recent_timings")
    async def recent_timings(self, since: dt.datetime, limit: int = 5000) -> list[dict]:
        """Model and time to first byte of recent requests of every key, for the speed panel."""
        cursor = self.ledger.find({"at": {"$gte": since}, "status": 200},
                                  {"model": 1, "ttfb_ms": 1, "stream": 1, "_id": 0})
        return await cursor.sort("at", -1).to_list(length=limit)

    async def ledger_total(self, key_hash: str) -> int:
        """Σ cost of the key's ledger entries, flushed or still in its outbox (an entry a flush
        inserted but has not yet pulled is in both, and counts once)."""
        costs = {d["_id"]: d["cost"] for d in await self.ledger.find({"key_hash": key_hash}, {"cost": 1}).to_list(
            length=None)}
        key = await self.keys.find_one({"_id": key_hash}, {"pending": 1}) or {}
        costs.update({e["_id"]: e["cost"] for e in key.get("pending", [])})
        return sum(costs.values())

    # --- crash recovery -----------------------------------------------------------------

    @_op("heartbeat")
    async def heartbeat(self) -> None:
        """Count one beat (liveness is whether the count moves, not what a clock says), and
        measure how far this process's clock is from the store's."""
        await self.processes.update_one({"_id": self.instance_id},
                                        {"$inc": {"beat": 1}, "$currentDate": {"at": True}}, upsert=True)
        await self._measure_clock()

    async def _measure_clock(self) -> None:
        sent = self.clock()
        try:
            reply = await self.client.admin.command("hello")
        except Exception:
            return  # a store that does not say its time (a test double): keep the last offset
        at = reply.get("localTime")
        if isinstance(at, dt.datetime):
            at = at.replace(tzinfo=None)
            self.clock_offset = at - (sent + (self.clock() - sent) / 2)

    async def _is_dead(self) -> Callable[[str | None], bool]:
        """Which owners of holds and leases are dead: those whose heartbeat count did not
        move for ``DEAD_AFTER_S`` of this sweeper's own clock. No two hosts' clocks are
        compared, so a host whose clock is off is not taken for dead."""
        seen = self.monotonic()
        beats = {p["_id"]: p.get("beat") for p in await self.processes.find({}, {"beat": 1}).to_list(length=None)}
        for pid, beat in beats.items():
            last = self._beats.get(pid)
            if last is None or last[0] != beat:
                self._beats[pid] = (beat, seen)
        for pid in [p for p in self._beats if p not in beats and self._beats[p][0] is not None]:
            self._beats[pid] = (None, seen)  # its document went: silent from now on

        def dead(owner: str | None) -> bool:
            if owner == self.instance_id:
                return False
            last = self._beats.setdefault(owner or "", (None, seen))
            return seen - last[1] >= DEAD_AFTER_S
        return dead

    @_op("sweep", bounded=False)
    async def sweep(self) -> int:
        """Return the holds and leases of processes whose heartbeat stopped, and any older
        than a request can live. Returns how many were returned."""
        dead = await self._is_dead()
        now = self.now()
        oldest = now - dt.timedelta(seconds=MAX_HOLD_AGE_S)
        swept = 0
        candidates = await self.keys.find({"holds.0": {"$exists": True}}, {"holds": 1}).to_list(length=None)
        for doc in candidates:
            for hold in doc["holds"]:
                if dead(hold.get("owner")) or hold["at"] < oldest:
                    swept += await self._sweep_hold(doc["_id"], hold, now)
        await self.keys.update_many({"swept.at": {"$lt": oldest}}, {"$pull": {"swept": {"at": {"$lt": oldest}}}})
        leased = await self.keys.find({"leases": {"$exists": True, "$ne": {}}}, {"leases": 1}).to_list(length=None)
        for doc in leased:
            for rid, lease in doc["leases"].items():
                if lease["seq"] == TOMBSTONE_SEQ:
                    await self._clear_tombstone(doc["_id"], rid, lease, oldest)
                elif dead(lease.get("owner")) or lease["at"] < oldest:
                    swept += await self._return_lease(doc["_id"], rid, lease, now)
        await self.processes.delete_many({"at": {"$lt": now - dt.timedelta(seconds=MAX_HOLD_AGE_S)}})
        await self.flush_ledger()
        return swept

    async def _sweep_hold(self, key_hash: str, hold: dict, now: dt.datetime) -> int:
        """Return a dead process's hold to the balance, noting it (``swept``) so that the
        settlement it may still send (from its journal, once it reaches the store) is charged."""
        res = await self.keys.update_one(
            {"_id": key_hash, "holds": {"$elemMatch": {"rid": hold["rid"], "amount": hold["amount"]}}},
            {"$pull": {"holds": {"rid": hold["rid"]}}, "$push": {"swept": {"rid": hold["rid"], "at": now}},
             "$inc": {"balance": hold["amount"], "reserved": -hold["amount"]}})
        if res.modified_count != 1:
            return 0
        log.warning("returned a stale reservation of %d units (owner %s)", hold["amount"], hold.get("owner"))
        return 1


    async def _return_lease(self, key_hash: str, rid: str, lease: dict, now: dt.datetime) -> int:
        """Give a dead process's slice back to the balance, leaving a tombstone that no commit
        can match (``seq`` -1) and that remembers which batches never applied."""
        amount = lease["amount"]
        since = lease.get("next_from", lease["at"]) - UNAPPLIED_MARGIN
        tomb = {"owner": lease.get("owner"), "amount": 0, "seq": TOMBSTONE_SEQ, "unapplied_from": lease["seq"],
                "late_seq": lease["seq"], "unapplied_since": since, "at": now}
        res = await self.keys.update_one(
            {"_id": key_hash, f"leases.{rid}.seq": lease["seq"], f"leases.{rid}.amount": amount},
            {"$set": {f"leases.{rid}": tomb}, "$inc": {"balance": amount, "reserved": -amount}})
        if res.modified_count != 1:
            return 0
        await self.discard_unapplied(key_hash, rid, lease["seq"], since)
        if amount:
            log.warning("returned a stale lease of %d units (owner %s)", amount, lease.get("owner"))
        return 1 if amount else 0

    async def _clear_tombstone(self, key_hash: str, rid: str, tomb: dict, oldest: dt.datetime) -> None:
        """Every sweep deletes the lease's unapplied entries again: a process that only looked
        dead (stalled, or cut off from the store) may still insert a batch before its commit
        finds the tombstone; it then charges that batch through ``commit_late``."""
        await self.discard_unapplied(key_hash, rid, tomb["unapplied_from"], tomb["unapplied_since"])
        if tomb["at"] < oldest:
            await self.keys.update_one({"_id": key_hash, f"leases.{rid}.seq": TOMBSTONE_SEQ},
                                       {"$unset": {f"leases.{rid}": ""}})


def key_view(doc: dict) -> dict:
    """What an operator sees of a key: never its hash or the key itself."""
    return {"prefix": doc["prefix"], "note": doc.get("note", ""), "status": doc["status"],
            "granted": doc["granted"], "used": doc["used"], "reserved": doc["reserved"],
            "balance": doc["balance"], "created_at": _iso(doc.get("created_at"))}


def _iso(at: dt.datetime | None) -> str | None:
    return at.replace(tzinfo=dt.timezone.utc).isoformat().replace("+00:00", "Z") if at else None
