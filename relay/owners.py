"""Who owns each stored response (relay key, upstream account), behind an in-process cache.

A record never changes once written, so a cached one stays right; only ids not found are
asked of the store again (another process may have recorded them since). Records are
written in groups, in the background."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from relay.errors import StoreUnavailable
from relay.metering.ledger import utc_now
from relay.store.mongo import MongoStore
from relay.store.responses import RESPONSE_TTL

log = logging.getLogger("relay.store")

CACHED_OWNERS = 20_000
WRITE_EVERY_S = 0.05                   # records wait this long, to be written together
MISS_WAITS_S = (0.05, 0.1, 0.15, 0.2)  # an unknown id is looked up again after each of these
MAX_PENDING = 100_000                  # records kept while the store is unreachable


@dataclass(frozen=True, slots=True)  # CACHED_OWNERS of them: no __dict__ each
class Owner:
    key_hash: str     # the relay key that made the response
    upstream: str     # the upstream's name ...
    fingerprint: str  # ... and its key's fingerprint: the account that holds the response
    history: int      # tokens a continuation of it brings in (its input and output)
    at: dt.datetime

    @property
    def pinned(self) -> tuple[str, str]:
        return self.upstream, self.fingerprint


class ResponseOwners:
    def __init__(self, store: MongoStore, size: int = CACHED_OWNERS) -> None:
        self.store = store
        self.size = size
        self._cache: OrderedDict[str, Owner] = OrderedDict()
        self._pending: list[dict[str, Any]] = []  # records not written yet
        self._dropped = 0
        self._writer: asyncio.Task[None] | None = None

    async def find(self, response_id: str, key_hash: str) -> Owner | None:
        """The owner of ``response_id`` if it is the key ``key_hash``; None for anyone else, as
        for an id relay never saw (another key cannot tell the two apart, not even by the time
        the answer takes). An id not found is asked for again for half a second: another
        process may have made it a moment ago and not written it yet."""
        owner = await self._lookup(response_id)
        for wait in MISS_WAITS_S:
            if owner is not None:
                break
            await asyncio.sleep(wait)
            owner = await self._lookup(response_id)
        if owner is None:
            return None
        if owner.key_hash != key_hash or owner.at < utc_now() - RESPONSE_TTL:
            await asyncio.sleep(sum(MISS_WAITS_S))
            return None
        return owner

    async def _lookup(self, response_id: str) -> Owner | None:
        owner = self._cache.get(response_id)
        if owner is not None:
            self._cache.move_to_end(response_id)
            return owner
        doc = await self.store.find_response(response_id)
        if doc is None:
            return None
        owner = Owner(doc["key_hash"], doc["upstream"], doc["key_fp"], int(doc.get("history", 0)), doc["at"])
        self._remember(response_id, owner)
        return owner

    def record(self, response_id: str, key_hash: str, upstream: str, fingerprint: str, history: int) -> None:
        """Known to this process at once; written to the store within about 50 ms, with whatever
        else was recorded meanwhile (one write for them all: a store write costs a process far
        more than relaying a response). Kept and retried while the store is unreachable."""
        self._remember(response_id, Owner(key_hash, upstream, fingerprint, history, utc_now()))
        if len(self._pending) >= MAX_PENDING:
            self._pending.pop(0)
            self._dropped += 1
        self._pending.append({"_id": response_id, "key_hash": key_hash, "upstream": upstream,
                              "key_fp": fingerprint, "history": history})
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_soon())

    async def _write_soon(self) -> None:
        while self._pending:
            await asyncio.sleep(WRITE_EVERY_S)
            await self._write()

    async def _write(self) -> bool:
        batch, self._pending = self._pending, []
        if self._dropped:
            log.warning("%d owner records of stored responses were dropped while the store was unreachable; "
                        "only this process knows those responses", self._dropped)
            self._dropped = 0
        try:
            await self.store.record_responses(batch)
            return True
        except Exception as exc:
            if not isinstance(exc, StoreUnavailable):
                log.warning("could not record the owners of %d stored responses (%s); retrying", len(batch),
                            type(exc).__name__)
            self._pending = batch + self._pending
            return False

    async def close(self) -> None:
        """At shutdown: what is still to be written, written now (best effort)."""
        if self._writer is not None:
            self._writer.cancel()
        if self._pending:
            await self._write()

    async def forget(self, response_id: str) -> None:
        self._cache.pop(response_id, None)
        self._pending = [r for r in self._pending if r["_id"] != response_id]
        await self.store.forget_response(response_id)

    def _remember(self, response_id: str, owner: Owner) -> None:
        self._cache[response_id] = owner
        self._cache.move_to_end(response_id)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
