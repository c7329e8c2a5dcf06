"""What a key used: per day, its recent requests, and recent timings for the speed panel."""
from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Callable

from relay.metering.ledger import entries_of
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
        """The key's ``limit`` newest entries, newest first."""
        return await self._newest({"key_hash": key_hash}, limit, lambda e: True)

    @_op("recent_timings")
    async def recent_timings(self, since: dt.datetime, limit: int = 5000) -> list[Document]:
        """Model and time to first byte of recent answered requests of every key, for the speed
        panel, newest first."""
        newest = await self._newest({"at": {"$gte": since}}, limit, lambda e: e["status"] == 200 and e["at"] >= since)
        return [{"model": e["model"], "ttfb_ms": e["ttfb_ms"], "stream": e["stream"]} for e in newest]

    async def _newest(self, flt: Document, limit: int, wanted: Callable[[Document], bool]) -> list[Document]:
        """The ``limit`` newest wanted entries of the ledger documents matching ``flt``, newest first.

        A document's ``at`` is its newest entry's, so once ``limit`` entries are newer than the
        next document's ``at``, no later document holds a newer one. The newest so far are kept
        in a heap (documents of one entry each, as the outbox writes them, would otherwise cost a
        sort of the whole result per document)."""
        if limit <= 0:
            return []
        newest: list[tuple[dt.datetime, int, Document]] = []  # a min-heap: the oldest kept on top
        order = 0
        async for doc in self.ledger.find(flt).sort("at", -1):
            if len(newest) == limit and doc["at"] < newest[0][0]:
                break
            for entry in entries_of(doc):
                if not wanted(entry):
                    continue
                order -= 1  # of entries at the same time, the one read first counts as newer
                item = (entry["at"], order, entry)
                if len(newest) < limit:
                    heapq.heappush(newest, item)
                elif item > newest[0]:  # ``order`` is unique: tuples never compare their entries
                    heapq.heapreplace(newest, item)
        return [entry for _, _, entry in sorted(newest, reverse=True)]

    async def ledger_entries(self, key_hash: str | None = None) -> list[Document]:
        """Every ledger entry (of one key), pages unfolded; for audits and tests."""
        flt = {} if key_hash is None else {"key_hash": key_hash}
        return [e for doc in await self.ledger.find(flt).to_list(length=None) for e in entries_of(doc)]

    async def ledger_total(self, key_hash: str) -> int:
        """Σ cost of the key's ledger entries, flushed or still in its outbox (an entry a flush
        inserted but has not yet pulled is in both, and counts once)."""
        costs = {e["_id"]: e["cost"] for e in await self.ledger_entries(key_hash)}
        key = await self.keys.find_one({"_id": key_hash}, {"pending": 1}) or {}
        costs.update({e["_id"]: e["cost"] for e in key.get("pending", [])})
        return sum(costs.values())
