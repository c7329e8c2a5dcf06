"""The router: the one place where an upstream attempt is made.

It chooses the tier and the endpoint, sends, and turns an upstream's failure statuses into
relay errors; the health issue adds its retry loop and outcome feedback here.
"""
from __future__ import annotations

import random
from typing import Callable

from relay.balancer.pool import Endpoint, Pool
from relay.balancer.selection import pick
from relay.errors import NoEndpoint, TooManyRequests, UpstreamError
from relay.proxy.transport import Transport, UpstreamResponse

BodyBuilder = Callable[[Endpoint], bytes]


class Router:
    def __init__(self, pool: Pool, transport: Transport, rng: random.Random | None = None):
        self.pool = pool
        self.transport = transport
        self.rng = rng or random.Random()

    def swap(self, pool: Pool) -> None:
        """Requests in flight keep the endpoints they hold; new ones see the new pool."""
        self.pool = pool

    def choose(self, model: str) -> Endpoint:
        tiers = self.pool.tiers_for(model)
        if not tiers:
            raise NoEndpoint(f"no upstream can serve model {model} right now")
        return pick(tiers[0], self.rng)

    async def send(self, model: str, method: str, path: str, build_body: BodyBuilder | None) -> UpstreamResponse:
        """Send to one endpoint and return a response the client may see (2xx or the client's 4xx).

        The caller must hand the response back through ``finish``.
        """
        endpoint = self.choose(model)
        endpoint.in_flight += 1
        try:
            resp = await self.transport.send(endpoint, method, path,
                                             build_body(endpoint) if build_body else None)
        except BaseException:
            endpoint.in_flight -= 1
            raise
        if resp.status < 400 or resp.status in (400, 404, 409, 413, 415, 422):
            return resp
        self.finish(resp)
        raise _upstream_failure(resp)

    def finish(self, resp: UpstreamResponse) -> None:
        resp.close()
        resp.endpoint.in_flight -= 1


def _upstream_failure(resp: UpstreamResponse) -> UpstreamError | TooManyRequests:
    err = _failure_for_status(resp)
    err.upstream = resp.endpoint.upstream.name
    return err


def _failure_for_status(resp: UpstreamResponse) -> UpstreamError | TooManyRequests:
    name = resp.endpoint.upstream.name
    if resp.status == 429:
        headers = {"Retry-After": resp.headers["Retry-After"]} if "Retry-After" in resp.headers else None
        return TooManyRequests(f"upstream {name} is rate limited; retry shortly", headers=headers)
    if resp.status in (401, 403):
        err = UpstreamError(f"upstream {name} refused relay's credentials")
        err.outcome = "auth"
        return err
    err = UpstreamError(f"upstream {name} failed with status {resp.status}")
    err.outcome = "5xx" if resp.status >= 500 else "error"
    return err
