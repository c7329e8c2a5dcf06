"""Key changes by change stream: a change made to a key through any process, on any host,
reaches every other relay process within about a second.

Each relay process watches the ``keys`` collection. A change that is not money bookkeeping
(a disable or enable, a top-up or redeemed code, a note, a policy, a key created or deleted)
makes the process forget its cached lookup of that key and ask the store again for the key's
balance when it next needs it (``on_change``). The filter runs in the store (``PIPELINE``):
the group commits and sweeps that change a key's money many times a second never reach the
watchers, only the fields outside ``MONEY_FIELDS`` do.

While the stream is open, a cached lookup is trusted for ``WATCHED_TTL_S`` (a safety net:
changes arrive by the stream); when it breaks, the cache's own interval applies again until
the stream is resumed where it left off (its resume token), missed changes included. If the
store no longer has that point (its oplog moved on), the stream starts afresh and every
cached lookup is asked again (``on_reset``). A store that cannot stream changes at all (a
standalone MongoDB, without a replica set, refuses ``watch``) leaves the cache interval in
charge; one log line says so at start-up.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from pymongo.errors import OperationFailure, PyMongoError

from relay.store.core import Document, StoreCore

log = logging.getLogger("relay.store")

# Fields that move with traffic: holds and leases taken and returned, group commits, sweeps,
# the ledger outbox and the day's counters. A change to any other field is a change to the key.
MONEY_FIELDS = ("balance", "reserved", "used", "holds", "leases", "pending", "days", "swept")

# Inserts, replacements and deletions always; updates when a changed or removed field (its
# top-level name: "days.2026-01-01.cost" is "days") is not a money field.
PIPELINE: list[Document] = [{"$match": {"$or": [
    {"operationType": {"$ne": "update"}},
    {"$expr": {"$gt": [{"$size": {"$setDifference": [
        {"$map": {"input": {"$concatArrays": [
            {"$map": {"input": {"$objectToArray": {"$ifNull": ["$updateDescription.updatedFields", {}]}},
                      "in": "$$this.k"}},
            {"$ifNull": ["$updateDescription.removedFields", []]}]},
            "in": {"$arrayElemAt": [{"$split": ["$$this", "."]}, 0]}}},
        list(MONEY_FIELDS)]}}, 0]}},
]}}]

WATCHED_TTL_S = 30.0   # a cached key lookup, while the stream is open
MAX_AWAIT_MS = 500     # a quiet stream answers this often: a broken one is found within socket timeouts
# Some stores (SecantusDB) answer a waiting getMore at once, empty, for every write the filter
# dropped: with group commits and the limiter's writes that was 10-40 empty answers a second,
# each a driver round trip of ~0.2-0.5 ms on relay's loop, in the way of the requests it served
# (in a lab run at concurrency 1, a third of the requests whose own time passed 1 ms; see
# docs/benchmarks.md, "Relay's own periodic work"). After an empty answer
# the next getMore waits until this long after the last one was sent: a change still applies
# within a second, and a burst of changes is read without a pause.
EMPTY_EVERY_S = 0.25
RETRY_FIRST_S = 0.25   # after an error, doubling up to RETRY_MAX_S
RETRY_MAX_S = 5.0
REFUSED = (40573,      # IllegalOperation: "The $changeStream stage is only supported on replica sets"
           13,         # Unauthorized: the user may not read change streams
           115)        # CommandNotSupported
HISTORY_LOST = (286,   # ChangeStreamHistoryLost: the resume point left the oplog
                280,   # ChangeStreamFatalError
                260)   # InvalidResumeToken


def refused(exc: BaseException) -> bool:
    """The store cannot stream changes at all (no retry helps)."""
    if isinstance(exc, OperationFailure):
        return exc.code in REFUSED
    return not isinstance(exc, PyMongoError)  # a store without watch() (a test double)


def history_lost(exc: BaseException) -> bool:
    return isinstance(exc, OperationFailure) and exc.code in HISTORY_LOST


class KeyWatcher:
    """Follows the ``keys`` collection's change stream for as long as it runs.

    ``on_change(key_hash)``: that key changed. ``on_watching(bool)``: the stream opened (True;
    changes arrive by it) or broke (False; the cache interval applies). ``on_reset()``: changes
    may have been missed (a fresh stream): every cached lookup is stale.
    """

    def __init__(self, store: StoreCore, on_change: Callable[[str], None],
                 on_watching: Callable[[bool], None] = lambda up: None, on_reset: Callable[[], None] = lambda: None,
                 cache_s: float = 2.0):
        self.store = store
        self.cache_s = cache_s  # how long a change takes to apply without the stream (for the log)
        self.on_change = on_change
        self.on_watching = on_watching
        self.on_reset = on_reset
        self.watching = False
        self.supported: bool | None = None  # None until the first stream opens or is refused
        self.changes = 0                    # changes seen (for tests)
        self.opened = 0                     # streams opened: the first, then each resume
        self.empty = 0                      # empty answers (for tests)

    async def run(self) -> None:
        token: Mapping[str, Any] | None = None
        delay, broken_at = RETRY_FIRST_S, None
        while True:
            if not self.store.breaker.up:  # the store is known to be down: its probe says when it is back
                await asyncio.sleep(RETRY_FIRST_S)
                continue
            try:
                stream = await self.store.keys.watch(PIPELINE, resume_after=token, max_await_time_ms=MAX_AWAIT_MS)
            except Exception as exc:
                if refused(exc) and self.supported is None:
                    self.supported = False
                    # A warning for a real store; a test double without watch() says it quietly.
                    log.log(logging.WARNING if isinstance(exc, PyMongoError) else logging.INFO,
                            "key changes: the store does not stream changes (%s); a change made on another "
                            "host (disable, top-up, policy) applies here within the %g s key cache", _why(exc),
                            self.cache_s)
                    return
                if history_lost(exc):
                    token = None  # start afresh (on_reset below)
                    continue
                broken_at = self._broken(exc, broken_at)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            try:
                self.opened += 1
                if self.supported is None:
                    self.supported = True
                    log.info("key changes: following the store's change stream; a change made on any host "
                             "applies here within a second")
                elif broken_at is not None:
                    log.warning("key changes: the change stream %s after %.1f s",
                                "resumed" if token is not None else "restarted (changes meanwhile were lost: "
                                "every cached key is looked up again)", time.monotonic() - broken_at)
                if token is None:
                    self.on_reset()
                self._set_watching(True)
                delay, broken_at = RETRY_FIRST_S, None
                while True:
                    asked = time.monotonic()
                    change = await stream.try_next()
                    token = stream.resume_token or token
                    if change is None:
                        self.empty += 1
                        rest = EMPTY_EVERY_S - (time.monotonic() - asked)
                        if rest > 0:
                            await asyncio.sleep(rest)
                    else:
                        self._apply(change)
                        if change.get("operationType") == "invalidate":
                            token = None  # the collection was dropped or renamed: a new stream
                            break
            except Exception as exc:
                if history_lost(exc):
                    token = None
                broken_at = self._broken(exc, broken_at)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            finally:
                await _close(stream)

    def _apply(self, change: Document) -> None:
        key = change.get("documentKey", {}).get("_id")
        if isinstance(key, str):
            self.changes += 1
            self.on_change(key)
        elif change.get("operationType") in ("drop", "rename", "dropDatabase", "invalidate"):
            self.on_reset()

    def _set_watching(self, watching: bool) -> None:
        if watching != self.watching:
            self.watching = watching
            self.on_watching(watching)

    def _broken(self, exc: Exception, broken_at: float | None) -> float:
        """The stream broke (or could not be opened again): the cache interval applies. Logged
        once per break, not on every retry."""
        self._set_watching(False)
        if broken_at is None:
            if self.supported:
                log.warning("key changes: the change stream broke (%s); resuming, meanwhile the key cache "
                            "interval applies", _why(exc))
            return time.monotonic()
        return broken_at


def _why(exc: BaseException) -> str:
    """The gist of a driver's error: its code and first clause (no topology dump)."""
    code = getattr(exc, "code", None)
    text = re.split(r", full error|, Timeout: | \(configured timeouts", str(exc))[0][:200] or type(exc).__name__
    return f"code {code}: {text}" if code is not None else text


async def _close(stream: Any) -> None:
    try:
        await stream.close()
    except Exception:
        pass  # a connection already gone
