"""Authentication of relay keys, with a short-lived cache in front of the store.

The cache keeps a hot key from costing a store round trip on every request; its TTL bounds
how long a disable made elsewhere (CLI, another process) takes to reach this process.
"""
from __future__ import annotations

import time
from typing import Callable

from relay.errors import InvalidApiKey, KeyDisabled, StoreUnavailable
from relay.keys import bearer_token, hash_key, is_well_formed
from relay.store.base import KeyRecord, KeyStore


STALE_IF_ERROR_S = 60.0


class Authenticator:
    def __init__(self, store: KeyStore, ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 100_000):
        self.store = store
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}

    async def authenticate(self, authorization: str | None) -> KeyRecord:
        token = bearer_token(authorization)
        if token is None:
            raise InvalidApiKey("You didn't provide an API key. Send it as 'Authorization: Bearer ak-...'.")
        if not is_well_formed(token):
            raise InvalidApiKey("Incorrect API key provided: relay keys look like 'ak-' followed by 40 characters.")
        record = await self.lookup(hash_key(token))
        if record is None:
            raise InvalidApiKey("Incorrect API key provided: this key is not known to relay.")
        if not record.active:
            raise KeyDisabled("This relay key has been disabled.")
        return record

    async def lookup(self, key_hash: str) -> KeyRecord | None:
        now = self.clock()
        hit = self._cache.get(key_hash)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            record = await self.store.find_key(key_hash)
        except Exception:
            # Store outage: a key seen recently is still known (its requests then meet the
            # reservation, which needs the store); an unknown one cannot be checked.
            if hit is not None and hit[0] + STALE_IF_ERROR_S > now:
                return hit[1]
            raise StoreUnavailable("The key store is unavailable; retry shortly.") from None
        if len(self._cache) >= self.max_entries:
            self._cache.clear()  # bounded: a flood of random keys cannot grow memory
        self._cache[key_hash] = (now + self.ttl_s, record)
        return record

    def forget(self, key_hash: str) -> None:
        self._cache.pop(key_hash, None)
