"""Settlements and refunds the store could not take, kept and retried until it can.

When the store is unreachable after a response went out, the charge must not be dropped.
Each failed operation is appended to a journal on local disk (one JSON line) and retried
with backoff; a line marking it done follows its success. A restarted relay replays what the
journal holds. Retrying is safe: the store applies a settlement or refund only while its
hold exists, so nothing is charged twice.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
from typing import Any

from relay.metering.ledger import ENTRY_FIELDS, LedgerEntry
from relay.store.mongo import MongoStore

log = logging.getLogger("relay.charging")
MAX_BACKOFF_S = 5.0


class SettlementQueue:
    def __init__(self, store: MongoStore, journal_path: str | None = None):
        self.store = store
        self.journal_path = journal_path
        self.pending: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        if journal_path:
            self.pending.update(self._read_journal(journal_path))

    def __len__(self) -> int:
        return len(self.pending)

    def put_settle(self, entry: LedgerEntry, held: int) -> None:
        doc = {name: getattr(entry, name) for name in ENTRY_FIELDS}
        doc["at"] = entry.at.isoformat()
        self._put({"op": "settle", "id": entry.request_id, "entry": doc, "held": held})

    def put_refund(self, key_hash: str, request_id: str, held: int) -> None:
        self._put({"op": "refund", "id": request_id, "key_hash": key_hash, "held": held})

    def _put(self, item: dict[str, Any]) -> None:
        self.pending[item["id"]] = item
        self._append(item)
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
            if await self.drain():
                backoff = 0.1
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def drain(self) -> bool:
        """Try every pending operation once; True when none is left."""
        for rid, item in list(self.pending.items()):
            try:
                applied = await self._apply(item)
            except Exception as exc:
                log.warning("store still unavailable for %s %s (%s); will retry", item["op"], rid, type(exc).__name__)
                return False
            if not applied:
                log.warning("%s of %s found no reservation (swept?)", item["op"], rid)
            self.pending.pop(rid, None)
            self._append({"done": rid})
        self._compact()
        return True

    async def _apply(self, item: dict[str, Any]) -> bool:
        if item["op"] == "settle":
            doc = dict(item["entry"])
            doc["at"] = dt.datetime.fromisoformat(doc["at"])
            return await self.store.settle(LedgerEntry(**doc), item["held"])
        return await self.store.refund(item["key_hash"], item["id"], item["held"])

    # --- the journal ----------------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        if not self.journal_path:
            return
        with open(self.journal_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _read_journal(self, path: str) -> dict[str, dict[str, Any]]:
        pending: dict[str, dict[str, Any]] = {}
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a crash mid-write
                    if "done" in record:
                        pending.pop(record["done"], None)
                    else:
                        pending[record["id"]] = record
        except FileNotFoundError:
            pass
        if pending:
            log.warning("replaying %d settlement(s) from %s", len(pending), path)
        return pending

    def _compact(self) -> None:
        if self.journal_path and not self.pending and os.path.exists(self.journal_path):
            os.truncate(self.journal_path, 0)
