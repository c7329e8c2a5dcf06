"""Authentication of relay keys, with a short-lived cache in front of the store.

The cache keeps a hot key from costing a store round trip on every request. A change made
elsewhere (CLI, another process or host) reaches this process through the store's change
stream (``relay/store/changes.py`` calls ``forget``), and while that stream is open a lookup is
trusted longer (``set_ttl``); without it, the TTL (2 s) bounds how long such a change takes.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from relay.config import ConfigError
from relay.errors import InvalidApiKey, KeyDisabled, KeyExpired, StoreUnavailable
from relay.keys import bearer_token, hash_key, is_well_formed
from relay.store.base import KeyRecord, KeyStore

STALE_IF_ERROR_S = 60.0
MIN_ADMIN_TOKEN_CHARS = 16  # with the throttle on wrong tokens, far beyond guessing


def checked_admin_token(token: str | None) -> str | None:
    """The admin token relay may start with: unset or empty turns the admin API off; a short
    one (or one a header cannot carry) is refused with a message naming RELAY_ADMIN_TOKEN."""
    if not token:
        return None
    if token != token.strip():
        raise ConfigError("RELAY_ADMIN_TOKEN", "must not start or end with whitespace: a bearer header "
                                               "cannot carry it")
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ConfigError("RELAY_ADMIN_TOKEN", f"too short ({len(token)} characters): use at least "
                          f"{MIN_ADMIN_TOKEN_CHARS}, e.g. from `python -c 'import secrets; "
                          f"print(secrets.token_urlsafe(32))'`")
    return token


class Authenticator:
    def __init__(self, store: KeyStore, ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 100_000):
        self.store = store
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self._forgotten = 0  # counts forget() calls: a lookup that overlapped one is not trusted for long
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}  # one store lookup per key at a time

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
        if record.policy is not None and record.policy.expired(time.time()):
            raise KeyExpired("This relay key has expired.")
        return record

    async def lookup(self, key_hash: str) -> KeyRecord | None:
        now = self.clock()
        hit = self._cache.get(key_hash)
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._inflight.get(key_hash)
        if pending is not None:  # a burst on a cold key shares the lookup already under way
            return await asyncio.shield(pending)
        future = self._inflight[key_hash] = asyncio.get_running_loop().create_future()
        try:
            record = await self._fetch(key_hash, hit, now)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: waiters re-raise it, nobody logs it as lost
            raise
        else:
            future.set_result(record)
            return record
        finally:
            del self._inflight[key_hash]

    async def _fetch(self, key_hash: str, hit: tuple[float, KeyRecord | None] | None, now: float) -> KeyRecord | None:
        forgotten = self._forgotten
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
        # A change announced while this lookup was on its way may have been read before it:
        # kept (for an outage's sake) but asked again next time.
        self._cache[key_hash] = (now + self.ttl_s if forgotten == self._forgotten else now, record)
        return record

    def forget(self, key_hash: str) -> None:
        self._forgotten += 1
        self._cache.pop(key_hash, None)

    def set_ttl(self, ttl_s: float) -> None:
        """Trust lookups this long from now on; those cached already, no longer than that."""
        self.ttl_s = ttl_s
        self.expire_all(ttl_s)

    def expire_all(self, within_s: float = 0.0) -> None:
        """Every cached lookup is asked again (after ``within_s``); kept meanwhile, so that a
        store outage still finds the keys seen recently."""
        self._forgotten += 1
        limit = self.clock() + within_s
        for key_hash, (expires, record) in self._cache.items():
            if expires > limit:
                self._cache[key_hash] = (limit, record)


class FailedAuthThrottle:
    """Counts bad keys per client address; past ``max_failures`` in ``window_s`` the bad-key
    answers to that address are slowed and become 429s. Good keys are never held back, and
    other addresses are untouched. Memory is bounded."""

    def __init__(self, max_failures: int = 20, window_s: float = 60.0, delay_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, max_addresses: int = 100_000):
        self.max_failures = max_failures
        self.window_s = window_s
        self.delay_s = delay_s
        self.clock = clock
        self.max_addresses = max_addresses
        self._failures: dict[str, tuple[float, int]] = {}  # address -> (window start, count)

    def record_failure(self, address: str) -> bool:
        """Count one bad key; True when the address is over its limit."""
        now = self.clock()
        start, count = self._failures.get(address, (now, 0))
        if now - start > self.window_s:
            start, count = now, 0
        if len(self._failures) >= self.max_addresses and address not in self._failures:
            self._prune(now)
        self._failures[address] = (start, count + 1)
        return count + 1 > self.max_failures

    def _prune(self, now: float) -> None:
        for addr in [a for a, (start, _) in self._failures.items() if now - start > self.window_s]:
            del self._failures[addr]
        if len(self._failures) >= self.max_addresses:
            self._failures.clear()
