"""Active health checks: every endpoint probed on its interval, concurrently with traffic.

A probe is ``GET {base_url}/models`` with the endpoint's key, which costs no tokens. Keys the
checker disabled are retested on the slower ``recheck_disabled_s`` interval and come back
when they work; keys the operator disabled in the file are never probed.
"""
from __future__ import annotations

import asyncio
import logging

from relay.balancer import health as h
from relay.balancer.outcome import Outcome, classify_failure, classify_probe, retry_after_seconds
from relay.balancer.pool import Endpoint
from relay.config import Timeouts
from relay.errors import UpstreamError
from relay.proxy.request import UpstreamRequest
from relay.proxy.router import Router

MODELS = UpstreamRequest("GET", "/models")

log = logging.getLogger("relay.health")
MAX_CONCURRENT_PROBES = 32


class HealthChecker:
    def __init__(self, router: Router) -> None:
        self.router = router
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

    async def probe(self, ep: Endpoint) -> Outcome:
        policy = self.router.pool.config.health
        async with self._sem:
            retry_after = None
            try:
                status, body, retry_header = await self._models(ep, policy.probe_timeout_s)
                outcome = classify_probe(status, body)
                retry_after = retry_after_seconds(retry_header, self.router.wall_clock())
            except UpstreamError as err:
                outcome = classify_failure(err.outcome)
        config, clock = self.router.pool.config, self.router.clock
        was = ep.state(config, clock()).state
        h.record_probe(outcome, ep.health, ep.upstream_health, policy, clock(), retry_after)
        now_state = ep.state(config, clock()).state
        if now_state != was:
            log.warning("endpoint %s: %s -> %s (probe: %s)", ep.name, was, now_state, outcome)
        return outcome

    async def _models(self, ep: Endpoint, timeout_s: float) -> tuple[int, bytes, str | None]:
        """``GET {base_url}/models`` with the endpoint's key: costs no tokens."""
        t = Timeouts(connect_s=timeout_s, first_byte_s=timeout_s, idle_s=timeout_s)
        resp = await self.router.transport.send(ep, MODELS, None, t)
        try:
            return resp.status, await resp.read(self.router.pool.config.limits.max_response_bytes), \
                resp.headers.get("Retry-After")
        finally:
            resp.close()
