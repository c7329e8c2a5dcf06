"""What a key used: per day, its recent requests, and recent timings for the speed panel."""
from __future__ import annotations

import datetime as dt

from relay.store.core import Document, StoreCore, _op


class UsageMixin(StoreCore):
    @_op("usage_days")
    async def usage_days(self, key_hash: str, first_day: str, last_day: str) -> list[Document]:
        """Daily usage with ``first_day <= day <= last_day`` (YYYY-MM-DD), oldest first."""
        doc = await self.keys.find_one({"_id": key_hash}, {"days": 1})
        days = (doc or {}).get("days") or {}
        return [{"day": d, **days[d]} for d in sorted(days) if first_day <= d <= last_day]

    @_op("recent_ledger")
    async def recent_ledger(self, key_hash: str, limit: int = 50) -> list[Document]:
        return await self.ledger.find({"key_hash": key_hash}).sort("at", -1).to_list(length=limit)

    @_op("recent_timings")
    async def recent_timings(self, since: dt.datetime, limit: int = 5000) -> list[Document]:
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
