"""The router: the one place where upstream attempts are made, and the one retry loop.

It picks the lowest tier with an available endpoint (by cache affinity or by load), sends,
classifies the outcome, feeds it to health, and retries a failed attempt (connect error,
timeout, 5xx, 429, a refused key) on another endpoint — another base URL after the upstream's
fault, another key of the same upstream after a key's — within ``retries.max_attempts`` and
the retry budget (balancer/failover.py). It never retries the client's own errors, and it
cannot retry after the first byte: it hands the response over before any of it reaches the
client.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection
from typing import Protocol

from relay.balancer import health as h
from relay.balancer.budget import RetryBudget
from relay.balancer.failover import Attempts
from relay.balancer.outcome import (
    CLIENT_ERROR,
    OK,
    RATE_LIMITED,
    RETRYABLE_OUTCOMES,
    SERVER_ERROR,
    Outcome,
    classify_failure,
    classify_status,
    error_code_of,
    retry_after_seconds,
)
from relay.balancer.pool import Endpoint, Pool
from relay.balancer.selection import Choice, choose
from relay.errors import (
    InvalidRequest,
    NoEndpoint,
    PinnedEndpointUnavailable,
    RelayError,
    UpstreamError,
    UpstreamRateLimited,
)
from relay.proxy.request import UpstreamRequest
from relay.proxy.transport import Transport, UpstreamResponse


class Events(Protocol):
    """What the router reports; the metrics recorder (``recorder.RouterEvents``) implements it."""

    def on_attempt(self, endpoint: Endpoint, outcome: str, attempt: int, seconds: float | None) -> None: ...

    def on_retry(self, reason: str, failed: Endpoint, following: Endpoint) -> None: ...

    def on_done(self, endpoint: Endpoint, seconds: float) -> None: ...

    def on_affinity(self, outcome: str) -> None: ...


class NoEvents:
    """Reports to nobody: the router's events until the recorder is plugged in."""

    def on_attempt(self, endpoint: Endpoint, outcome: str, attempt: int, seconds: float | None) -> None:
        pass

    def on_retry(self, reason: str, failed: Endpoint, following: Endpoint) -> None:
        pass

    def on_done(self, endpoint: Endpoint, seconds: float) -> None:
        pass

    def on_affinity(self, outcome: str) -> None:
        pass


class Exchange:
    """``Router.exchange``'s ``async with``: a class rather than ``@asynccontextmanager``, whose
    generator and wrapper cost more per request than the exchange's own bookkeeping."""

    __slots__ = ("_router", "_request", "_resp", "_started")

    def __init__(self, router: Router, request: UpstreamRequest) -> None:
        self._router, self._request = router, request

    async def __aenter__(self) -> UpstreamResponse:
        self._started = self._router.clock()
        self._resp = await self._router._send(self._request)
        return self._resp

    async def __aexit__(self, *exc_info: object) -> None:
        router, resp = self._router, self._resp
        router._release(resp)
        router.events.on_done(resp.endpoint, router.clock() - self._started)


class Router:
    def __init__(self, pool: Pool, transport: Transport, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.transport = transport
        self.rng = rng or random.Random()
        self.clock = clock
        self.wall_clock = wall_clock  # for Retry-After dates
        r = pool.config.retries
        self.budget = RetryBudget(r.budget_ratio, r.budget_floor, r.budget_window_s)
        self.events: Events = NoEvents()

    def swap(self, pool: Pool) -> None:
        """Requests in flight keep the endpoints they hold; new ones see the new pool."""
        r = pool.config.retries
        if (r.budget_ratio, r.budget_floor, r.budget_window_s) != (self.budget.ratio, self.budget.floor,
                                                                   self.budget.window_s):
            self.budget = RetryBudget(r.budget_ratio, r.budget_floor, r.budget_window_s)
        self.pool = pool

    def choose(self, model: str, exclude: Collection[Endpoint] = (), last_hope: bool = True,
               api: str | None = None) -> Endpoint:
        """The endpoint a new request for ``model`` on ``api`` would get, by load (no affinity key),
        ``exclude`` aside (balancer/selection.py ``choose``)."""
        return self._choose(UpstreamRequest("POST", "", model, api=api), Attempts(set(exclude)), last_hope).endpoint

    def _choose(self, request: UpstreamRequest, attempts: Attempts, last_hope: bool = True) -> Choice:
        pool = self.pool
        tiers = pool.tiers_for(request.model, request.api)
        if not tiers:
            raise NoEndpoint(f"no upstream can serve model {request.model} right now")
        affinity = request.affinity if pool.config.routing.affinity else None
        choice = choose(tiers, pool.config, self.clock(), self.rng, attempts, affinity, last_hope)
        if choice is None:
            raise NoEndpoint(f"no endpoint is available for model {request.model} right now "
                             f"(all ejected, cooling or disabled)")
        return choice

    def exchange(self, request: UpstreamRequest) -> Exchange:
        """A response the client may see (2xx, or its own 4xx), held for the ``async with``
        block: the endpoint counts it in flight until the block ends, and then its connection
        is released (an unfinished body closes it, which cancels the upstream's work)."""
        return Exchange(self, request)

    async def _send(self, request: UpstreamRequest) -> UpstreamResponse:
        max_attempts = self.pool.config.retries.max_attempts
        self.budget.record_request(self.clock())
        if request.pinned is not None:
            outcome, result = await self._attempt(self.pinned_endpoint(request.pinned, request.model), request, 0)
            if isinstance(result, RelayError):
                raise result
            return result
        attempts = Attempts()
        last_error: RelayError | None = None
        for attempt in range(max_attempts):
            try:
                choice = self._choose(request, attempts)
            except NoEndpoint as exc:
                last_error = last_error or exc
                break
            endpoint = choice.endpoint
            if attempts.last is not None:
                # Leaving a failure for where a new request would go costs nothing; any other retry
                # (onto an upstream that has failed, or in panic mode) is within the budget.
                if not attempts.free(endpoint, self.pool.config, self.clock()) \
                        and not self.budget.try_retry(self.clock()):
                    break
                self.events.on_retry(attempts.last[0], attempts.last[1], endpoint)
            elif choice.affinity is not None:
                self.events.on_affinity(choice.affinity)
            attempts.tried.add(endpoint)
            outcome, result = await self._attempt(endpoint, request, attempt)
            if not isinstance(result, RelayError):
                return result
            last_error = result
            if outcome not in RETRYABLE_OUTCOMES:
                break
            attempts.failed(outcome, endpoint)
        raise last_error or NoEndpoint(f"no endpoint is available for model {request.model} right now")

    def pinned_endpoint(self, pinned: tuple[str, str], model: str = "") -> Endpoint:
        """The one endpoint a stored response lets a request go to, if it can take it now: never
        another (that account does not have the response), so no failover and no panic mode."""
        endpoint = self.pool.pinned(*pinned)
        if endpoint is None:
            raise PinnedEndpointUnavailable(f"The upstream account that holds this response (on upstream "
                                            f"{pinned[0]}) is no longer configured on this relay.")
        if model and not endpoint.upstream.serves(model):
            raise InvalidRequest(f"The upstream that holds this response does not serve the model '{model}'.",
                                 param="model")
        now = self.clock()
        state = endpoint.state(self.pool.config, now)
        if not state.available:
            wait = {"Retry-After": str(max(math.ceil(state.until - now), 1))} if state.until > now else None
            raise PinnedEndpointUnavailable(f"The upstream account that holds this response ({endpoint.name}) is "
                                            f"{state.state} now; retry later.", headers=wait)
        return endpoint

    async def _attempt(self, endpoint: Endpoint, request: UpstreamRequest,
                       attempt: int) -> tuple[Outcome, UpstreamResponse | RelayError]:
        config = self.pool.config
        endpoint.health.in_flight += 1
        started = self.clock()
        try:
            resp = await self.transport.send(endpoint, request, request.render(endpoint.upstream_model(request.model)),
                                             config.timeouts)
        except UpstreamError as err:
            endpoint.health.in_flight -= 1
            outcome = classify_failure(err.outcome)
            self._record(endpoint, outcome, attempt, None)
            return outcome, err
        except BaseException:
            endpoint.health.in_flight -= 1
            raise
        ttfb = self.clock() - started
        endpoint.health.record_latency(ttfb * 1000)
        if resp.status < 400:
            self._record(endpoint, OK, attempt, ttfb)
            return OK, resp
        try:
            body = await resp.read()
        except UpstreamError as err:
            self._release(resp)
            self._record(endpoint, SERVER_ERROR, attempt, ttfb)
            return SERVER_ERROR, err
        outcome = classify_status(resp.status, error_code_of(body))
        retry_after = retry_after_seconds(resp.headers.get("Retry-After"), self.wall_clock())
        self._record(endpoint, outcome, attempt, ttfb, retry_after)
        if outcome == CLIENT_ERROR:
            return outcome, resp
        self._release(resp)
        return outcome, _failure(resp, outcome, retry_after)

    def report(self, endpoint: Endpoint, outcome: Outcome, attempt: int, ttfb: float | None) -> None:
        """An attempt made elsewhere (a WebSocket handshake), fed to health and the metrics like ours."""
        if ttfb is not None:
            endpoint.health.record_latency(ttfb * 1000)
        self._record(endpoint, outcome, attempt, ttfb)

    def _record(self, endpoint: Endpoint, outcome: Outcome, attempt: int, ttfb: float | None,
                retry_after: float | None = None) -> None:
        h.record_attempt(outcome, endpoint.health, endpoint.upstream_health, self.pool.config.health,
                         self.clock(), retry_after)
        self.events.on_attempt(endpoint, outcome, attempt, ttfb)

    @staticmethod
    def _release(resp: UpstreamResponse) -> None:
        resp.close()
        resp.endpoint.health.in_flight -= 1


def _failure(resp: UpstreamResponse, outcome: Outcome, retry_after: float | None) -> RelayError:
    name = resp.endpoint.upstream.name
    if outcome == RATE_LIMITED:
        headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after else None
        return UpstreamRateLimited(f"upstream {name} is rate limited; retry shortly", upstream=name,
                                   outcome=outcome, headers=headers)
    if outcome in (Outcome.AUTH, Outcome.NO_CREDIT):
        return UpstreamError(f"upstream {name} refused relay's credentials", upstream=name, outcome=outcome)
    return UpstreamError(f"upstream {name} failed with status {resp.status}", upstream=name, outcome=outcome)
