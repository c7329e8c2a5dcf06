"""Who owns each stored response (relay key, upstream account), behind an in-process cache.

A record never changes once written, so a cached one stays right; only ids not found are
asked of the store again (another process may have recorded them since)."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from relay.metering.ledger import utc_now
from relay.store.mongo import MongoStore
from relay.store.responses import RESPONSE_TTL

log = logging.getLogger("relay.store")

CACHED_OWNERS = 20_000


@dataclass(frozen=True)
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
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def find(self, response_id: str, key_hash: str) -> Owner | None:
        """The owner of ``response_id`` if it is the key ``key_hash``; None for anyone else, as
        for an id relay never saw (another key cannot tell the two apart)."""
        owner = self._cache.get(response_id)
        if owner is not None:
            self._cache.move_to_end(response_id)
        else:
            doc = await self.store.find_response(response_id)
            if doc is None:
                return None
            owner = Owner(doc["key_hash"], doc["upstream"], doc["key_fp"], int(doc.get("history", 0)), doc["at"])
            self._remember(response_id, owner)
        if owner.key_hash != key_hash or owner.at < utc_now() - RESPONSE_TTL:
            return None
        return owner

    async def record(self, response_id: str, key_hash: str, upstream: str, fingerprint: str, history: int) -> None:
        """Remembered here at once; written to the store before the caller goes on. Records that
        come while a write is on its way go together in the next one (a group write: one round
        trip for many responses under load). A store that fails leaves the record known to this
        process only (logged): the response was served anyway."""
        self._remember(response_id, Owner(key_hash, upstream, fingerprint, history, utc_now()))
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(({"_id": response_id, "key_hash": key_hash, "upstream": upstream,
                               "key_fp": fingerprint, "history": history}, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
        await asyncio.shield(done)

    async def _write(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await self.store.record_responses([record for record, _ in batch])
            except Exception as exc:
                log.warning("could not record the owners of %d stored responses (%s); only this process knows them",
                            len(batch), type(exc).__name__)
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def forget(self, response_id: str) -> None:
        self._cache.pop(response_id, None)
        await self.store.forget_response(response_id)

    def _remember(self, response_id: str, owner: Owner) -> None:
        self._cache[response_id] = owner
        self._cache.move_to_end(response_id)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
