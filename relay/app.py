"""The Tornado Application: routes, and the services they are handed."""
from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass, field

import tornado.httpserver
import tornado.web

from relay.auth import Authenticator, FailedAuthThrottle, checked_admin_token
from relay.balancer.pool import Pool
from relay.charging import Charger
from relay.config import Config
from relay.errors import StoreUnavailable
from relay.handlers import admin, billing, openai_api, usage_page
from relay.handlers.base import HealthzHandler, MetricsHandler, NotFoundHandler, ReadyzHandler
from relay.observability import recorder
from relay.proxy.health_checker import HealthChecker
from relay.proxy.router import Router
from relay.proxy.transport import Transport
from relay.lease import COMMIT_EVERY_S, LeaseBook
from relay.reload import Reloader
from relay.settlement_queue import SettlementQueue
from relay.store.mongo import HEARTBEAT_EVERY_S, MongoStore

log = logging.getLogger("relay.app")
SWEEP_EVERY_S = 10.0
GAUGES_EVERY_S = 1.0
FLUSH_EVERY_S = 0.05  # ledger entries wait in their key's outbox at most about this long


@dataclass
class Services:
    router: Router
    auth: Authenticator
    transport: Transport
    store: MongoStore
    charger: Charger
    reloader: Reloader
    checker: HealthChecker
    trusted_proxies: tuple = field(default_factory=tuple)
    admin_token: str | None = None
    throttle: FailedAuthThrottle = field(default_factory=FailedAuthThrottle)
    admin_throttle: FailedAuthThrottle = field(default_factory=FailedAuthThrottle)  # wrong admin tokens
    active: int = 0  # requests being handled, for a graceful drain
    _tasks: list = field(default_factory=list)

    @property
    def config(self) -> Config:
        return self.router.pool.config

    def start_maintenance(self) -> None:
        """The ledger flusher; heartbeats that mark this process alive; the sweeper for crashed ones;
        active health checks; the config file watcher."""
        jobs = [self._flush_ledger(), self._maintain(), self.checker.run(), self.reloader.watch(),
                self._refresh_gauges(), self.charger.queue.run()]
        if self.charger.book is not None:
            jobs.append(self._commit_leases())
        for job in jobs:
            self._tasks.append(asyncio.ensure_future(job))

    async def _commit_leases(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_EVERY_S)
            if not self.store.breaker.up:
                continue  # batches wait in memory; the store's probe says when it is back
            try:
                await self.charger.book.commit_all()
            except Exception as exc:
                _background_failure("lease commit", exc)

    async def _refresh_gauges(self) -> None:
        while True:
            try:
                recorder.refresh_gauges(self.router.pool, self.router.clock())
            except Exception:
                log.exception("metrics refresh failed")
            await asyncio.sleep(GAUGES_EVERY_S)

    async def _flush_ledger(self) -> None:
        store = self.store
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            if not store.dirty or not store.breaker.up:
                continue
            keys, store.dirty = store.dirty, set()
            try:
                await store.flush_ledger(keys)
            except Exception as exc:
                store.dirty |= keys
                _background_failure("ledger flush", exc)

    async def _maintain(self) -> None:
        since_sweep = SWEEP_EVERY_S
        while True:
            try:
                await self.store.heartbeat()
                if since_sweep >= SWEEP_EVERY_S:
                    since_sweep = 0.0
                    await self.store.sweep()
            except Exception as exc:
                _background_failure("store maintenance", exc)
            await asyncio.sleep(HEARTBEAT_EVERY_S)
            since_sweep += HEARTBEAT_EVERY_S

    async def drain(self, timeout_s: float) -> bool:
        """Wait for requests in flight to finish (the server no longer accepts new ones)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.active > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.active == 0

    async def close(self) -> None:
        """Stop background work, then hand the store what is still owed (best effort)."""
        for task in await stop_tasks(self._tasks, 5.0):
            log.warning("background task %s did not stop within 5 s", task.get_coro().__qualname__)
        self._tasks.clear()
        try:
            await asyncio.wait_for(self._final_writes(), 10)
        except Exception:
            log.exception("final store writes failed; the journal and the sweeper cover them")
        await self.transport.close()
        await self.store.close()

    async def _final_writes(self) -> None:
        if self.charger.book is not None:
            await self.charger.book.release_all()
        if len(self.charger.queue):
            await self.charger.queue.drain()
        self.store.dirty.clear()
        await self.store.flush_ledger()  # every outbox, also one a cancelled flush left half done


def _background_failure(job: str, exc: Exception) -> None:
    """A background job failed; it runs again on its interval. An unreachable store was logged
    once, when it was found so: not again every 100 ms."""
    if not isinstance(exc, StoreUnavailable):
        log.error("%s failed; retrying", job, exc_info=exc)


async def stop_tasks(tasks: list[asyncio.Task], timeout_s: float) -> set[asyncio.Task]:
    """Cancel ``tasks`` until they end, for at most ``timeout_s``; returns those still running.

    Once is not always enough: a cancellation that lands inside a driver call can come out
    as the driver's own error, which a maintenance loop catches and logs like any store
    failure before it sleeps and goes round again (seen as relays that never exited after
    SIGTERM). Cancelled again, the loop is in its sleep and ends."""
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


def build_services(config: Config, store: MongoStore, trusted_proxies: tuple = (),
                   rng: random.Random | None = None, admin_token: str | None = None,
                   config_path: str | None = None, journal_path: str | None = None) -> Services:
    transport = Transport(config.limits, config.timeouts)
    if admin_token is None:
        admin_token = os.environ.get("RELAY_ADMIN_TOKEN")
    admin_token = checked_admin_token(admin_token)
    router = Router(Pool.from_config(config), transport, rng)
    router.events = recorder.RouterEvents()
    store.observe = recorder.on_store_op
    store.on_unreachable = recorder.on_store_unreachable
    recorder.on_start()

    def settled(entry) -> None:
        recorder.on_settled(router.pool.config, entry.model, entry.prompt_tokens, entry.completion_tokens, entry.cost)

    book = LeaseBook(store) if config.quota.leases else None
    charger = Charger(store, settled, SettlementQueue(store, journal_path), book)
    for waits in (charger, book):  # each reports the reservations it sends to the store
        if waits is not None:
            waits.on_store_wait = recorder.on_quota_store_wait
    if book is not None:
        book.on_unbillable = recorder.on_unbillable
    return Services(router=router, auth=Authenticator(store), transport=transport, store=store, charger=charger,
                    reloader=Reloader(config_path, router, on_result=recorder.on_reload),
                    checker=HealthChecker(router), trusted_proxies=trusted_proxies, admin_token=admin_token)


def _api(path: str) -> str:
    """Clients use both https://host/v1 and https://host/openai/v1 as their base URL."""
    return rf"/(?:openai/)?v1{path}"


def _billing(path: str) -> str:
    """ChatGPT-Next-Web calls {base}/dashboard/billing/... with no /v1; others add it."""
    return rf"/(?:openai/)?(?:v1/)?dashboard/billing{path}"


def make_app(services: Services, metrics: bool = True, **settings) -> tornado.web.Application:
    """The application; ``metrics=False`` when /metrics is served on its own port instead."""
    kw = {"services": services}
    routes = [(r"/metrics", MetricsHandler, kw)] if metrics else []
    routes += [
        (_api("/chat/completions"), openai_api.ChatCompletionsHandler, kw),
        (_api("/embeddings"), openai_api.EmbeddingsHandler, kw),
        (_api("/models"), openai_api.ModelsHandler, kw),
        (_billing("/subscription"), billing.SubscriptionHandler, kw),
        (_billing("/usage"), billing.UsageHandler, kw),
        (r"/admin/keys", admin.KeysHandler, kw),
        (r"/admin/keys/([^/]+)", admin.KeyHandler, kw),
        (r"/admin/keys/([^/]+)/(topup|disable|enable)", admin.KeyActionHandler, kw),
        (r"/admin/upstreams", admin.UpstreamsHandler, kw),
        (r"/admin/reload", admin.ReloadHandler, kw),
        (r"/usage", usage_page.UsagePageHandler, kw),
        (r"/usage/static/([a-z.]+)", usage_page.UsageStaticHandler, kw),
        (r"/usage/api/summary", usage_page.UsageSummaryHandler, kw),
        (r"/", usage_page.UsageRootHandler, kw),
        (r"/healthz", HealthzHandler, kw),
        (r"/readyz", ReadyzHandler, kw),
    ]
    return tornado.web.Application(
        routes, default_handler_class=NotFoundHandler, default_handler_args=kw,
        log_function=recorder.on_request_end, compress_response=False, **settings)


def make_metrics_app(services: Services) -> tornado.web.Application:
    """Only /metrics, for --metrics-port."""
    kw = {"services": services}
    return tornado.web.Application([(r"/metrics", MetricsHandler, kw)], default_handler_class=NotFoundHandler,
                                   default_handler_args=kw, log_function=lambda handler: None)


def make_server(app: tornado.web.Application, ssl_options=None, max_body: int = 0, client_timeout_s: float = 60.0,
                body_timeout_s: float = 120.0):
    """The HTTP server, with the limits that protect it from slow and idle clients.

    ``client_timeout_s`` bounds both reading a request's headers (slow-header clients) and an
    idle keep-alive connection; ``body_timeout_s`` bounds reading a body. The handlers enforce
    the configured body size limit themselves, with an OpenAI-shaped 413; Tornado's own cap is
    a backstop far above it.
    """
    return _NoDelayServer(app, ssl_options=ssl_options, idle_connection_timeout=client_timeout_s,
                          body_timeout=body_timeout_s, max_body_size=max(max_body * 4, 64 << 20))


class _NoDelayServer(tornado.httpserver.HTTPServer):
    """TCP_NODELAY on every client connection, for its whole life.

    Tornado turns Nagle's algorithm on again after every request (and off at the end of the
    next), so a stream's second and later events can wait for the client's delayed ACK (up
    to 40 ms on a real network) and every request pays two setsockopt calls. relay writes
    whole responses and whole events, never bytes it would want coalesced. (asyncio and
    aiohttp set it on the upstream side already.)"""

    def handle_stream(self, stream, address) -> None:
        stream.set_nodelay(True)
        stream.set_nodelay = _keep_nodelay
        super().handle_stream(stream, address)


def _keep_nodelay(value: bool) -> None:
    """Tornado's per-request toggling, ignored: the connection keeps TCP_NODELAY."""
