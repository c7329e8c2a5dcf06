"""Crash recovery: heartbeats, and the sweeper that returns what dead processes held.

Liveness is whether a process's heartbeat count moves, judged by the sweeper's own elapsed
time, so no two hosts' clocks are compared. A swept hold leaves a note (``swept``) and a
swept lease a tombstone, so that a process that only looked dead is billed, once, for what
it served meanwhile.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from relay.store.core import Document, _op
from relay.store.leases import TOMBSTONE_SEQ, LeasesMixin

log = logging.getLogger("relay.store")

HEARTBEAT_EVERY_S = 5.0
DEAD_AFTER_S = 30.0          # a process whose heartbeat did not move this long (by the sweeper's own
                             # clock) has crashed or lost the store; its holds and leases are swept
MAX_HOLD_AGE_S = 6 * 3600.0  # no request lives this long, whatever its owner says


class RecoveryMixin(LeasesMixin):
    @_op("heartbeat")
    async def heartbeat(self) -> None:
        """Count one beat (liveness is whether the count moves, not what a clock says), and
        measure how far this process's clock is from the store's."""
        await self._beat()

    async def _beat(self) -> None:
        await self.processes.update_one({"_id": self.instance_id},
                                        {"$inc": {"beat": 1}, "$currentDate": {"at": True}}, upsert=True)
        await self._measure_clock()

    async def _back(self) -> None:
        """Back from an outage, a beat goes first: before this process opens or commits a
        lease again, its count has moved, so a sweeper that still takes it for dead spares
        what it writes from now on (``sweep`` reads the counts again before it returns anything)."""
        await self._beat()

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
        # A process of an earlier release writes no count, only its time ``at`` at each beat:
        # that moves as a count does, so a rolling upgrade does not sweep the old processes.
        beats = {p["_id"]: p.get("beat", p.get("at"))
                 for p in await self.processes.find({}, {"beat": 1, "at": 1}).to_list(length=None)}
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
        held = await self.keys.find({"holds.0": {"$exists": True}}, {"holds": 1}).to_list(length=None)
        leased = await self.keys.find({"leases": {"$exists": True, "$ne": {}}}, {"leases": 1}).to_list(length=None)
        holds = [(doc["_id"], hold) for doc in held for hold in doc["holds"]]
        leases = [(doc["_id"], rid, lease) for doc in leased for rid, lease in doc["leases"].items()]
        if any(dead(h.get("owner")) for _, h in holds) or \
                any(dead(lease.get("owner")) for _, _, lease in leases if lease["seq"] != TOMBSTONE_SEQ):
            # The counts again, read after the keys: a process back from an outage beats before
            # it writes anything else (``_back``), so what it holds was read above only after
            # its count moved, and it is spared here. Only a process still silent is swept.
            dead = await self._is_dead()
        for key_hash, hold in holds:
            if dead(hold.get("owner")) or hold["at"] < oldest:
                swept += await self._sweep_hold(key_hash, hold, now)
        await self.keys.update_many({"swept.at": {"$lt": oldest}}, {"$pull": {"swept": {"at": {"$lt": oldest}}}})
        for key_hash, rid, lease in leases:
            if lease["seq"] == TOMBSTONE_SEQ:
                await self._clear_tombstone(key_hash, rid, lease, oldest)
            elif dead(lease.get("owner")) or lease["at"] < oldest:
                swept += await self._return_lease(key_hash, rid, lease, now)
        await self.processes.delete_many({"at": {"$lt": now - dt.timedelta(seconds=MAX_HOLD_AGE_S)}})
        await self.flush_ledger()
        return swept

    async def _sweep_hold(self, key_hash: str, hold: Document, now: dt.datetime) -> int:
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

    async def _return_lease(self, key_hash: str, rid: str, lease: Document, now: dt.datetime) -> int:
        """Give a dead process's slice back to the balance, leaving a tombstone that no commit
        can match (``seq`` -1) and that remembers which batches never applied."""
        amount = lease["amount"]
        tomb = {"owner": lease.get("owner"), "amount": 0, "seq": TOMBSTONE_SEQ, "unapplied_from": lease["seq"],
                "late_seq": lease["seq"], "at": now}
        res = await self.keys.update_one(
            {"_id": key_hash, f"leases.{rid}.seq": lease["seq"], f"leases.{rid}.amount": amount},
            {"$set": {f"leases.{rid}": tomb}, "$inc": {"balance": amount, "reserved": -amount}})
        if res.modified_count != 1:
            return 0
        await self.discard_unapplied(key_hash, rid, lease["seq"])
        if amount:
            log.warning("returned a stale lease of %d units (owner %s)", amount, lease.get("owner"))
        return 1 if amount else 0

    async def _clear_tombstone(self, key_hash: str, rid: str, tomb: Document, oldest: dt.datetime) -> None:
        """Every sweep deletes the lease's unapplied entries again: a process that only looked
        dead (stalled, or cut off from the store) may still insert a batch before its commit
        finds the tombstone; it then charges that batch through ``commit_late``."""
        await self.discard_unapplied(key_hash, rid, tomb["unapplied_from"])
        if tomb["at"] < oldest:
            await self.keys.update_one({"_id": key_hash, f"leases.{rid}.seq": TOMBSTONE_SEQ},
                                       {"$unset": {f"leases.{rid}": ""}})
