"""What the handlers are handed: the router, the key cache, the quota, the store, and the
background work that keeps them (started, drained and closed here)."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from relay import background
from relay.auth import Authenticator, FailedAuthThrottle, checked_admin_token
from relay.balancer.pool import Pool
from relay.config import Config
from relay.limits import LimitBook
from relay.metering.ledger import LedgerEntry
from relay.observability import recorder
from relay.owners import ResponseOwners
from relay.proxy.health_checker import HealthChecker
from relay.proxy.http1 import Http1Transport
from relay.proxy.router import Router
from relay.proxy.sockets import UpstreamSockets
from relay.proxy.transport import Transport
from relay.quota import LeasedQuota, Quota, build_quota
from relay.reload import Reloader
from relay.store.changes import KeyWatcher
from relay.store.mongo import MongoStore

log = logging.getLogger("relay.app")

# The reverse proxies whose X-Forwarded-* headers are believed, as relay.net.parse_trusted makes them.
TrustedProxies: TypeAlias = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass
class Services:
    router: Router
    auth: Authenticator
    transport: Transport
    store: MongoStore
    quota: Quota
    reloader: Reloader
    checker: HealthChecker
    limits: LimitBook
    trusted_proxies: TrustedProxies = ()
    admin_token: str | None = None
    throttle: FailedAuthThrottle = field(default_factory=FailedAuthThrottle)
    admin_throttle: FailedAuthThrottle = field(default_factory=FailedAuthThrottle)  # wrong admin tokens
    code_throttle: FailedAuthThrottle = field(default_factory=FailedAuthThrottle)  # wrong top-up codes
    active: int = 0  # requests being handled, for a graceful drain
    # The usage page's response speed per model, every key's requests: (computed at, rows), monotonic.
    speed_cache: tuple[float, list[dict[str, Any]]] = field(default_factory=lambda: (float("-inf"), []))
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    key_watcher: KeyWatcher | None = None  # key changes from the store (None until started)
    owners: ResponseOwners = field(init=False)  # who made each stored response, and where
    sockets: UpstreamSockets = field(init=False)  # WebSockets to upstreams (the Responses API's)

    def __post_init__(self) -> None:
        self.owners = ResponseOwners(self.store)
        self.sockets = UpstreamSockets()

    @property
    def config(self) -> Config:
        return self.router.pool.config

    def start_maintenance(self) -> None:
        """Heartbeats and the sweeper, the ledger flusher, the quota's own work (group commits
        or journal retries), key changes made elsewhere, active health checks, the config file
        watcher, the gauges."""
        self.key_watcher = background.key_watcher(self.store, self.auth, self.quota)
        self._tasks += background.start([
            background.maintain_store(self.store), background.flush_ledger(self.store), self.quota.run(),
            self.key_watcher.run(),
            self.checker.run(), self.reloader.watch(), self.limits.run(),
            background.every(background.GAUGES_EVERY_S, self._refresh_gauges, "metrics refresh")])

    def _refresh_gauges(self) -> None:
        recorder.refresh_gauges(self.router.pool, self.router.clock())

    async def drain(self, timeout_s: float) -> bool:
        """Wait for requests in flight to finish (the server no longer accepts new ones)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.active > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.active == 0

    async def close(self) -> None:
        """Stop background work, then hand the store what is still owed (best effort)."""
        for task in await background.stop_tasks(self._tasks, 5.0):
            log.warning("background task %s did not stop within 5 s",
                        getattr(task.get_coro(), "__qualname__", task.get_name()))
        self._tasks.clear()
        try:
            await asyncio.wait_for(self._final_writes(), 10)
        except Exception:
            log.exception("final store writes failed; the journal and the sweeper cover them")
        await self.transport.close()
        await self.sockets.close()
        await self.store.close()

    async def _final_writes(self) -> None:
        await self.limits.close()
        await self.owners.close()
        await self.quota.close()
        self.store.dirty.clear()
        await self.store.flush_ledger()  # every outbox, also one a cancelled flush left half done


def build_services(config: Config, store: MongoStore, trusted_proxies: TrustedProxies = (),
                   rng: random.Random | None = None, admin_token: str | None = None,
                   config_path: str | None = None, journal_path: str | None = None) -> Services:
    transport = Http1Transport(config.limits)
    if admin_token is None:
        admin_token = os.environ.get("RELAY_ADMIN_TOKEN")
    admin_token = checked_admin_token(admin_token)
    router = Router(Pool.from_config(config), transport, rng)
    router.events = recorder.RouterEvents()
    store.observe = recorder.on_store_op
    store.on_unreachable = recorder.on_store_unreachable
    recorder.on_start()

    def settled(entry: LedgerEntry) -> None:
        recorder.on_settled(router.pool.config, entry)

    quota = build_quota(store, config.quota.leases, journal_path, settled)
    quota.on_store_wait = recorder.on_quota_store_wait
    if isinstance(quota, LeasedQuota):
        quota.book.on_unbillable = recorder.on_unbillable
    limits = LimitBook(store)
    limits.on_limited = recorder.on_rate_limited
    return Services(router=router, auth=Authenticator(store), transport=transport, store=store, quota=quota,
                    reloader=Reloader(config_path, router, on_result=recorder.on_reload),
                    checker=HealthChecker(router), limits=limits, trusted_proxies=trusted_proxies,
                    admin_token=admin_token)
