"""Per-key rate limit state in the store: one document per limited key in ``limits``.

``{_id: key hash, v: version, rpm: {level, at, cap}, tpm: {level, at, cap}, conc: {process: {n, until}}}``:
the requests and tokens buckets as of store time ``at`` (seconds since the epoch; ``cap``: the
limit they were written under), and the
concurrency slots each process holds until its lease on them lapses. Every change is a
compare-and-set on ``v`` of the whole document's state, computed by the process that sends it
(relay/limits.py decides what to write; this module only reads and writes).
"""
from __future__ import annotations

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from relay.store.core import Document, StoreCore, _op


class LimitsMixin(StoreCore):
    @_op("limits_read")
    async def limits_doc(self, key_hash: str) -> Document | None:
        self.round_trips += 1
        return await self.limits.find_one({"_id": key_hash})

    @_op("limits_write")
    async def limits_cas(self, key_hash: str, version: int, fields: Document) -> Document | None:
        """Set the top-level ``fields`` if the document is still at ``version`` (0: there is none
        yet); the document after, or None when another write came first."""
        self.round_trips += 1
        if version == 0:
            doc = {"_id": key_hash, "v": 1, **fields}
            try:
                await self.limits.insert_one(doc)
            except DuplicateKeyError:
                return None
            return doc
        return await self.limits.find_one_and_update({"_id": key_hash, "v": version},
                                                     {"$set": fields, "$inc": {"v": 1}},
                                                     return_document=ReturnDocument.AFTER)
