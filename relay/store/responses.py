"""Who owns each stored response: the relay key that made it and the upstream account that
holds it (``responses``, by response id), so that every later call about it goes there."""
from __future__ import annotations

import datetime as dt

from relay.store.core import Collection, Document, StoreCore, _op

# OpenAI keeps a stored response for 30 days; a record is of no use after that. A TTL index
# removes it on MongoDB; lookups ignore an older one wherever the TTL monitor does not run.
RESPONSE_TTL = dt.timedelta(days=30)


class ResponsesMixin(StoreCore):
    @property
    def responses(self) -> Collection:
        return self.db["responses"]

    async def ensure_indexes(self) -> None:
        await super().ensure_indexes()
        await self.responses.create_index("at", expireAfterSeconds=int(RESPONSE_TTL.total_seconds()))

    @_op("record_response")
    async def record_response(self, response_id: str, key_hash: str, upstream: str, fingerprint: str,
                              history: int) -> None:
        """The first record of an id stands: an upstream cannot hand an id to a second key."""
        await self.responses.update_one(
            {"_id": response_id},
            {"$setOnInsert": {"key_hash": key_hash, "upstream": upstream, "key_fp": fingerprint,
                              "history": history, "at": self.now()}}, upsert=True)

    @_op("find_response")
    async def find_response(self, response_id: str) -> Document | None:
        doc = await self.responses.find_one({"_id": response_id})
        if doc is None or doc["at"] < self.now() - RESPONSE_TTL:
            return None
        return doc

    @_op("forget_response")
    async def forget_response(self, response_id: str) -> None:
        await self.responses.delete_one({"_id": response_id})
