"""Per-request holds on a key (``leases: false``) and the ledger outbox they settle into.

reserve pushes a hold and moves its amount from ``balance`` to ``reserved``; settle pulls it,
charges ``used`` and the day's counters and pushes the ledger entry onto the key's outbox
(``pending``), all in one update filtered on the hold, so nothing happens twice; refund
returns it. ``flush_ledger`` moves outboxes to the ``ledger`` collection (insert by request
id, then pull: a repeat after a crash inserts nothing twice).
"""
from __future__ import annotations

import logging

from pymongo.errors import BulkWriteError

from relay.metering.ledger import LedgerEntry, day_counts, ledger_doc
from relay.store.core import Document, _op
from relay.store.keys import KeysMixin

log = logging.getLogger("relay.store")

DUPLICATE_KEY = 11000  # MongoDB's error code for an _id (or unique index) already taken


class HoldsMixin(KeysMixin):
    @_op("reserve")
    async def reserve(self, key_hash: str, request_id: str, minimum: int, full: int) -> int:
        """Hold ``full`` units, or whatever is left if that still covers ``minimum``.

        Returns the amount held. Raises InsufficientQuota when even ``minimum`` is not there.
        """
        hold_base = {"rid": request_id, "owner": self.instance_id, "at": self.now()}
        return await self._take(key_hash, minimum, full, lambda amount: {
            "$inc": {"balance": -amount, "reserved": amount}, "$push": {"holds": {**hold_base, "amount": amount}}})

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
             "$push": {"pending": ledger_doc(entry)},
             "$inc": {"reserved": -held, "balance": held - entry.cost, "used": entry.cost,
                      **day_counts([entry])}})
        if res.modified_count == 1:
            self.dirty.add(entry.key_hash)
            return True
        # The sweeper returned the hold (its process looked dead: cut off from the store, or
        # stalled); the request was served all the same, so the balance pays, exactly once.
        res = await self.keys.update_one(
            {"_id": entry.key_hash, "swept.rid": entry.request_id},
            {"$pull": {"swept": {"rid": entry.request_id}}, "$push": {"pending": ledger_doc(entry)},
             "$inc": {"balance": -entry.cost, "used": entry.cost, **day_counts([entry])}})
        if res.modified_count == 1:
            self.dirty.add(entry.key_hash)
            log.warning("settled %s after its hold was swept: charged to the balance", entry.request_id)
            return True
        return False

    async def _insert_ledger(self, docs: list[Document]) -> None:
        """Insert ledger documents, each exactly once: those already there (same _id: an
        entry's request id, a page's batch and entries) are skipped, any other failure is raised."""
        try:
            await self.ledger.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            if any(err.get("code") != DUPLICATE_KEY for err in exc.details.get("writeErrors", [])):
                raise

    @_op("flush_ledger", bounded=False)
    async def flush_ledger(self, key_hashes: set[str] | None = None) -> int:
        """Move outbox entries to the ledger collection; returns how many were moved.

        With no ``key_hashes``, every key with an outbox (the sweeper's pass).
        """
        if key_hashes is None:
            flt: Document = {"pending.0": {"$exists": True}}
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
