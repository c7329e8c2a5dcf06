"""Who owns each stored response: the relay key that made it and the upstream account that
holds it (``responses``, by response id), so that every later call about it goes there."""
from __future__ import annotations

import datetime as dt

from pymongo.errors import BulkWriteError

from relay.store.core import Collection, Document, StoreCore, _op

# OpenAI keeps a stored response for 30 days; a record is of no use after that. A TTL index
# removes it on MongoDB; lookups ignore an older one wherever the TTL monitor does not run.
RESPONSE_TTL = dt.timedelta(days=30)
DUPLICATE_KEY = 11000


class ResponsesMixin(StoreCore):
    @property
    def responses(self) -> Collection:
        return self.db["responses"]

    async def ensure_indexes(self) -> None:
        await super().ensure_indexes()
        await self.responses.create_index("at", expireAfterSeconds=int(RESPONSE_TTL.total_seconds()))

    @_op("record_responses")
    async def record_responses(self, records: list[Document]) -> None:
        """Records (``_id``, ``key_hash``, ``upstream``, ``key_fp``, ``history``) in one round trip. The
        first record of an id stands: an upstream cannot hand an id to a second key."""
        now = self.now()
        try:
            await self.responses.insert_many([{**r, "at": now} for r in records], ordered=False)
        except BulkWriteError as exc:
            if any(e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", ())):
                raise

    @_op("find_response")
    async def find_response(self, response_id: str) -> Document | None:
        doc = await self.responses.find_one({"_id": response_id})
        if doc is None or doc["at"] < self.now() - RESPONSE_TTL:
            return None
        return doc

    @_op("forget_response")
    async def forget_response(self, response_id: str) -> None:
        await self.responses.delete_one({"_id": response_id})
