"""Active health checks: every endpoint probed on its interval, concurrently with traffic.

A probe is ``GET {base_url}/models`` with the endpoint's key, which costs no tokens. Keys the
checker disabled are retested on the slower ``recheck_disabled_s`` interval and come back
when they work; keys the operator disabled in the file are never probed.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from relay.balancer import health as h
from relay.balancer.pool import Endpoint
from relay.errors import UpstreamError
from relay.proxy.router import Router, error_code_of, retry_after_seconds

log = logging.getLogger("relay.health")
MAX_CONCURRENT_PROBES = 32


class HealthChecker:
    def __init__(self, router: Router, on_probe: Callable[[Endpoint, str], None] | None = None):
        self.router = router
        self.on_probe = on_probe
        self._sem = asyncio.Semaphore(MAX_CONCURRENT_PROBES)

    async def run(self) -> None:
        while True:
            policy = self.router.pool.config.health
            try:
                await self.check_due()
            except Exception:
                log.exception("health check round failed")
            await asyncio.sleep(min(1.0, policy.interval_s / 4))

    async def check_due(self) -> None:
        pool, now = self.router.pool, self.router.clock()
        due = [ep for ep in pool.endpoints
               if not ep.operator_disabled and h.probe_due(ep.health, pool.config.health, now)]
        for ep in due:
            ep.health.last_probe_at = now  # claimed: a slow probe is not started twice
        await asyncio.gather(*(self.probe(ep) for ep in due))

    async def probe(self, ep: Endpoint) -> str:
        policy = self.router.pool.config.health
        async with self._sem:
            retry_after = None
            try:
                status, body, retry_header = await self.router.transport.probe(ep, policy.probe_timeout_s)
                outcome = h.classify_status(status, error_code_of(body) if status >= 400 else None)
                retry_after = retry_after_seconds(retry_header)
            except UpstreamError as err:
                outcome = err.outcome if err.outcome in h.OUTLIER_OUTCOMES else h.SERVER_ERROR
        was = ep.state(self.router.pool.config, self.router.clock()).state
        if outcome == h.CLIENT_ERROR:
            outcome = h.SERVER_ERROR  # /models answered with nonsense: not a working endpoint
        h.record_probe(outcome, ep.health, ep.upstream_health, policy, self.router.clock(), retry_after)
        now_state = ep.state(self.router.pool.config, self.router.clock()).state
        if now_state != was:
            log.warning("endpoint %s: %s -> %s (probe: %s)", ep.name, was, now_state, outcome)
        if self.on_probe:
            self.on_probe(ep, outcome)
        return outcome
