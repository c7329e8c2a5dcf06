"""relay's background work: heartbeats and the sweeper, the ledger flusher, key changes from
the store, the metric gauges."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from relay.auth import Authenticator
from relay.errors import StoreUnavailable
from relay.quota.charge import Quota
from relay.store.changes import WATCHED_TTL_S, KeyWatcher
from relay.store.mongo import MongoStore
from relay.store.recovery import HEARTBEAT_EVERY_S

log = logging.getLogger("relay.app")
SWEEP_EVERY_S = 10.0
GAUGES_EVERY_S = 1.0
FLUSH_EVERY_S = 0.05  # ledger entries wait in their key's outbox at most about this long


async def maintain_store(store: MongoStore) -> None:
    """This process's heartbeat, and the sweep that returns what crashed processes held."""
    since_sweep = SWEEP_EVERY_S
    while True:
        try:
            await store.heartbeat()
            if since_sweep >= SWEEP_EVERY_S:
                since_sweep = 0.0
                await store.sweep()
                await store.finish_redemptions()
        except Exception as exc:
            _failed("store maintenance", exc)
        await asyncio.sleep(HEARTBEAT_EVERY_S)
        since_sweep += HEARTBEAT_EVERY_S


async def flush_ledger(store: MongoStore) -> None:
    """Outboxes this process filled, moved to the ledger shortly after."""
    while True:
        await asyncio.sleep(FLUSH_EVERY_S)
        if not store.dirty or not store.breaker.up:
            continue
        keys, store.dirty = store.dirty, set()
        try:
            await store.flush_ledger(keys)
        except Exception as exc:
            store.dirty |= keys
            _failed("ledger flush", exc)


def key_watcher(store: MongoStore, auth: Authenticator, quota: Quota) -> KeyWatcher:
    """Changes to keys made anywhere (another process, another host), applied here as they
    happen: the key's cached lookup forgotten, its balance asked again. While the stream is
    open, cached lookups are trusted longer; otherwise the cache's own interval applies."""
    cache_s = auth.ttl_s

    def changed(key_hash: str) -> None:
        auth.forget(key_hash)
        quota.balance_changed(key_hash)

    def watching(up: bool) -> None:
        auth.set_ttl(WATCHED_TTL_S if up else cache_s)

    return KeyWatcher(store, changed, watching, auth.expire_all, cache_s)


async def every(seconds: float, job: Callable[[], None], name: str) -> None:
    while True:
        try:
            job()
        except Exception:
            log.exception("%s failed", name)
        await asyncio.sleep(seconds)


def _failed(job: str, exc: Exception) -> None:
    """A background job failed; it runs again on its interval. An unreachable store was logged
    once, when it was found so: not again on every pass."""
    if not isinstance(exc, StoreUnavailable):
        log.error("%s failed; retrying", job, exc_info=exc)


def start(jobs: list[Coroutine[Any, Any, None]]) -> list[asyncio.Task[None]]:
    return [asyncio.ensure_future(job) for job in jobs]


async def stop_tasks(tasks: list[asyncio.Task[None]], timeout_s: float) -> set[asyncio.Task[None]]:
    """Cancel ``tasks`` until they end, for at most ``timeout_s``; returns those still running.

    Once is not always enough: a cancellation that lands inside a driver call can come out
    as the driver's own error, which a maintenance loop catches and logs like any store
    failure before it sleeps and goes round again. Cancelled again, it ends in its sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = set(tasks)
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        await asyncio.sleep(0)  # a task that swallowed it runs on to its next await...
        for task in pending:
            if not task.done():
                task.cancel()  # ...and is cancelled there
        _, pending = await asyncio.wait(pending, timeout=min(0.05, max(deadline - loop.time(), 0.0)))
    return pending
