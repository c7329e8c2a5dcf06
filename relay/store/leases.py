"""Leases: a process's slice of a key's balance (``leases.<rid>``, counted in ``reserved``),
charged in batches whose ledger entries are inserted first and charged second."""
from __future__ import annotations

from relay.metering.ledger import LedgerEntry, day_counts, ledger_doc, ledger_page
from relay.store.core import Document, _op
from relay.store.holds import HoldsMixin

TOMBSTONE_SEQ = -1           # a returned lease: no batch can apply to it
# Entries per ledger page: a commit behind a slow store carries a second or more of entries, and
# building and encoding them all at once raised relay's peak memory (RSS) for good.
LEDGER_CHUNK = 256


def unapplied_filter(rid: str, seq: int) -> Document:
    """The ledger pages of lease ``rid``'s batches from ``seq`` on (the index ``lease_1_lseq_1``)."""
    return {"lease": rid, "lseq": {"$gte": seq}}


class LeaseGone(LookupError):
    """The sweeper returned this lease (its process looked dead). ``unapplied_from``: the
    first of its batches that never applied, as the tombstone records; None when even the
    tombstone is gone."""

    def __init__(self, rid: str, unapplied_from: int | None):
        super().__init__(f"lease {rid} is gone (swept)")
        self.unapplied_from = unapplied_from



class LeasesMixin(HoldsMixin):
    @_op("open_lease")
    async def open_lease(self, key_hash: str, rid: str, minimum: int, full: int) -> int:
        """A lease: a slice of the balance this process spends locally (see relay/quota/lease_book.py)."""
        now = self.now()
        lease = {"owner": self.instance_id, "at": now, "seq": 0}
        return await self._take(key_hash, minimum, full, lambda amount: {
            "$inc": {"balance": -amount, "reserved": amount}, "$set": {f"leases.{rid}": {**lease, "amount": amount}}})

    @_op("commit_lease")
    async def commit_lease(self, key_hash: str, rid: str, amount: int, seq: int, entries: list[LedgerEntry],
                           returned: int, extra: int) -> int | None:
        """Apply one process's batch against its lease hold.

        The lease ``rid`` holds ``amount`` (at version ``seq``). The batch charges the entries'
        costs, gives ``returned`` units back to the balance and takes ``extra`` more from it.
        Returns the lease's new amount; or None when the balance lacks ``extra``: the batch is
        then applied without it (the lease holds ``amount - Σ costs - returned`` at ``seq + 1``).

        The entries go straight into ``ledger``, in pages of up to ``LEDGER_CHUNK`` tagged with
        the lease and ``seq`` (``lease``, ``lseq``; see ``ledger_page``), before the key's
        document is charged in one atomic update filtered on the lease as it was at ``seq``. An
        entry thus exists before its cost leaves the lease, and a crash in between leaves pages
        of a batch that was never charged: the sweeper deletes them when it returns the lease
        (``lseq >= `` the lease's last ``seq``). No outbox: the ledger is written once per page
        (with outbox, flush and pull the embedded store spent 1.14 ms of CPU per relay request in
        bench/proxy_compare.py).

        Idempotent when repeated with the same arguments: the insert skips what is there, and
        the update applies only to the hold as it was at ``seq``; a repeat after a lost answer
        finds the lease at ``seq + 1`` and reports the same result (its amount says whether
        ``extra`` was granted). A repeat must carry exactly the same batch (see ``LeaseBook``):
        the lease's version says that batch ``seq`` applied, not which pages it wrote. That is
        why a version never carries a second batch, not even when ``extra`` is refused: a page
        of the first batch landing late (a write the client gave up on, executed after all)
        would otherwise stay in the ledger beside the second batch's pages.
        """
        spent = sum(e.cost for e in entries)
        new_amount = amount - spent - returned + extra
        for part, start in enumerate(range(0, len(entries), LEDGER_CHUNK)):
            self.round_trips += 1
            # It may be there from an attempt whose answer was lost.
            await self._insert_ledger([ledger_page(entries[start:start + LEDGER_CHUNK], rid, seq, part)])
        if await self._apply(key_hash, rid, amount, seq, entries, spent, returned, extra):
            return new_amount
        # Not applied now: applied before (an answer lost on the way), the balance is short,
        # or the lease is gone (the sweeper returned it).
        lease = await self._lease(key_hash, rid)
        if lease.get("seq") == seq + 1:
            return new_amount if lease.get("amount") == new_amount else None
        if extra and lease.get("seq") == seq and lease.get("amount") == amount:
            if await self._apply(key_hash, rid, amount, seq, entries, spent, returned, 0):
                return None
            lease = await self._lease(key_hash, rid)
        raise LeaseGone(rid, lease.get("unapplied_from") if lease.get("seq") == TOMBSTONE_SEQ else None)

    async def _apply(self, key_hash: str, rid: str, amount: int, seq: int, entries: list[LedgerEntry], spent: int,
                     returned: int, extra: int) -> bool:
        """The batch's one atomic update of the key, if the lease is still at ``amount`` and
        ``seq`` and the balance has ``extra``."""
        new_amount = amount - spent - returned + extra
        inc = {"reserved": new_amount - amount, "balance": returned - extra, "used": spent, **day_counts(entries)}
        flt: Document = {"_id": key_hash, f"leases.{rid}.amount": amount, f"leases.{rid}.seq": seq}
        if extra:
            flt["balance"] = {"$gte": extra}
        # An emptied lease stays (amount 0) so that a repeat of this batch can still tell it applied.
        update = {"$inc": inc, "$set": {f"leases.{rid}.amount": new_amount, f"leases.{rid}.seq": seq + 1,
                                       f"leases.{rid}.at": self.now()}}
        self.round_trips += 1
        res = await self.keys.update_one(flt, update)
        return res.modified_count == 1

    async def _lease(self, key_hash: str, rid: str) -> Document:
        doc = await self.keys.find_one({"_id": key_hash}, {f"leases.{rid}": 1})
        lease: Document = ((doc or {}).get("leases") or {}).get(rid) or {}
        return lease

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
            {"$inc": {"balance": -spent, "used": spent, **day_counts(entries)},
             "$push": {"pending": {"$each": [ledger_doc(e) for e in entries]}},
             "$set": {f"leases.{rid}.late_seq": seq + 1}})
        if res.modified_count == 1:
            self.dirty.add(key_hash)
            return True
        doc = await self.keys.find_one({"_id": key_hash}, {f"leases.{rid}": 1})
        tomb = ((doc or {}).get("leases") or {}).get(rid) or {}
        return tomb.get("seq") == TOMBSTONE_SEQ and tomb.get("late_seq", seq) > seq

    @_op("discard_unapplied")
    async def discard_unapplied(self, key_hash: str, rid: str, seq: int) -> int:
        """Delete the ledger pages of lease ``rid``'s batches from ``seq`` on, which were never
        charged (the lease was returned before they applied); returns how many pages.

        Found by the ledger's (lease, lseq) index alone: the sweeper repeats this for every
        tombstone on every pass for as long as the tombstone lives, so it must cost what the
        lease's own entries cost. (A filter on the key and a time bound read every entry of the
        key since that time: with one key and a few hours of traffic, every pass of every
        process made the store read the key's whole recent ledger, and the store stopped
        answering.) ``rid`` names its process (``lease-<instance>-<n>``), so it names one key's
        lease."""
        res = await self.ledger.delete_many(unapplied_filter(rid, seq))
        return res.deleted_count
