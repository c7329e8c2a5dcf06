"""The router: the one place where upstream attempts are made, and the one retry loop.

It picks the lowest tier with an available endpoint, sends, classifies the outcome, feeds
it to health, and retries a failed attempt (connect error, timeout, 5xx, 429, a refused
key) on another endpoint — same tier first, then the next — within ``retries.max_attempts``
and the retry budget. It never retries the client's own errors, and it cannot retry after
the first byte: it returns the response before any of it reaches the client.
"""
from __future__ import annotations

import math
import random
import re
import time
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Callable

from relay import bounded_json
from relay.balancer import health as h
from relay.balancer.pool import Endpoint, Pool
from relay.balancer.selection import pick
from relay.errors import NoEndpoint, RelayError, TooManyRequests, UpstreamError
from relay.proxy.transport import Transport, UpstreamResponse

BodyBuilder = Callable[[Endpoint], bytes]


class NoEvents:
    """What the router reports; the metrics recorder implements the same methods."""

    def on_attempt(self, endpoint: Endpoint, outcome: str, attempt: int, seconds: float | None) -> None:
        pass

    def on_retry(self, reason: str, failed: Endpoint, following: Endpoint) -> None:
        pass


class Router:
    def __init__(self, pool: Pool, transport: Transport, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.pool = pool
        self.transport = transport
        self.rng = rng or random.Random()
        self.clock = clock
        r = pool.config.retries
        self.budget = h.RetryBudget(r.budget_ratio, r.budget_floor, r.budget_window_s)
        self.events = NoEvents()

    def swap(self, pool: Pool) -> None:
        """Requests in flight keep the endpoints they hold; new ones see the new pool."""
        r = pool.config.retries
        if (r.budget_ratio, r.budget_floor, r.budget_window_s) != (self.budget.ratio, self.budget.floor,
                                                                   self.budget.window_s):
            self.budget = h.RetryBudget(r.budget_ratio, r.budget_floor, r.budget_window_s)
        self.pool = pool

    def choose(self, model: str, exclude: frozenset | set = frozenset(), last_hope: bool = True) -> Endpoint:
        """The lowest tier with an available endpoint not yet tried; within it, P2C by weight.

        When nothing is available, the endpoint whose ejection or cooldown ends soonest (a
        panic mode, in Envoy's terms): a pool that is all ejected still gets a chance instead
        of a total outage, and a retry may take the next such endpoint.
        """
        pool, now = self.pool, self.clock()
        tiers = pool.tiers_for(model)
        if not tiers:
            raise NoEndpoint(f"no upstream can serve model {model} right now")
        for tier in tiers:
            ready = [ep for ep in tier if ep not in exclude and ep.state(pool.config, now).available]
            if ready:
                return pick(ready, self.rng)
        if last_hope:
            states = [(ep.state(pool.config, now), ep) for tier in tiers for ep in tier if ep not in exclude]
            waiting = [(st.until, ep) for st, ep in states if st.state in ("ejected", "cooling", "unhealthy")]
            if waiting:
                return min(waiting, key=lambda pair: pair[0])[1]
        raise NoEndpoint(f"no endpoint is available for model {model} right now (all ejected, cooling or disabled)")

    async def send(self, model: str, method: str, path: str, build_body: BodyBuilder | None) -> UpstreamResponse:
        """A response the client may see (2xx, or its own 4xx). Hand it back through ``finish``."""
        max_attempts = self.pool.config.retries.max_attempts
        self.budget.record_request(self.clock())
        tried: set[Endpoint] = set()
        last_error: RelayError | None = None
        failed: tuple[str, Endpoint] | None = None
        for attempt in range(max_attempts):
            if attempt and not self.budget.try_retry(self.clock()):
                break
            try:
                endpoint = self.choose(model, tried)
            except NoEndpoint as exc:
                last_error = last_error or exc
                break
            if failed:
                self.events.on_retry(failed[0], failed[1], endpoint)
            tried.add(endpoint)
            outcome, result = await self._attempt(endpoint, method, path, build_body, attempt)
            if isinstance(result, UpstreamResponse):
                return result
            last_error = result
            if outcome not in h.RETRYABLE_OUTCOMES:
                break
            failed = (outcome, endpoint)
        raise last_error or NoEndpoint(f"no endpoint is available for model {model} right now")

    async def _attempt(self, endpoint: Endpoint, method: str, path: str, build_body: BodyBuilder | None,
                       attempt: int) -> tuple[str, UpstreamResponse | RelayError]:
        config = self.pool.config
        endpoint.health.in_flight += 1
        started = self.clock()
        try:
            resp = await self.transport.send(endpoint, method, path, build_body(endpoint) if build_body else None,
                                             config.timeouts)
        except UpstreamError as err:
            endpoint.health.in_flight -= 1
            outcome = err.outcome if err.outcome in h.OUTLIER_OUTCOMES else h.SERVER_ERROR
            self._record(endpoint, outcome, attempt, None)
            return outcome, err
        except BaseException:
            endpoint.health.in_flight -= 1
            raise
        ttfb = self.clock() - started
        endpoint.health.record_latency(ttfb * 1000)
        if resp.status < 400:
            self._record(endpoint, h.OK, attempt, ttfb)
            return h.OK, resp
        try:
            body = await resp.read()
        except UpstreamError as err:
            self.finish(resp)
            self._record(endpoint, h.SERVER_ERROR, attempt, ttfb)
            return h.SERVER_ERROR, err
        outcome = h.classify_status(resp.status, error_code_of(body))
        retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        self._record(endpoint, outcome, attempt, ttfb, retry_after)
        if outcome == h.CLIENT_ERROR:
            return outcome, resp
        self.finish(resp)
        return outcome, _failure(resp, outcome, retry_after)

    def _record(self, endpoint: Endpoint, outcome: str, attempt: int, ttfb: float | None,
                retry_after: float | None = None) -> None:
        h.record_attempt(outcome, endpoint.health, endpoint.upstream_health, self.pool.config.health,
                         self.clock(), retry_after)
        self.events.on_attempt(endpoint, outcome, attempt, ttfb)

    def finish(self, resp: UpstreamResponse) -> None:
        if not resp.finished:
            resp.finished = True
            resp.close()
            resp.endpoint.health.in_flight -= 1


def error_code_of(body: bytes) -> str | None:
    try:
        err = bounded_json.loads(body).get("error")  # an upstream's body: as hostile as a client's
        return err.get("code") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        return None


# A day: longer than any cooldown relay applies (health caps it at max_cooldown_s), and
# small enough that every later sum with a clock stays an ordinary float.
MAX_RETRY_AFTER_S = 86_400.0
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?")  # RFC 9110 says digits; some send "1.5"


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """An upstream's ``Retry-After`` as seconds from ``now`` (wall clock), capped; None when
    absent or unusable ("inf", "nan", "-5", "1e309", garbage), so the default cooldown applies.

    Both forms of RFC 9110: delta-seconds, or an HTTP-date (one in the past means now)."""
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)  # digits only: never negative or nan; a huge one is inf, capped below
    else:
        seconds = _seconds_until_date(value, time.time() if now is None else now)
    return None if seconds is None else min(seconds, MAX_RETRY_AFTER_S)


def _seconds_until_date(value: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC without a claim about local time
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def _failure(resp: UpstreamResponse, outcome: str, retry_after: float | None) -> RelayError:
    name = resp.endpoint.upstream.name
    if outcome == h.RATE_LIMITED:
        headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after else None
        err: RelayError = TooManyRequests(f"upstream {name} is rate limited; retry shortly", headers=headers)
    elif outcome in (h.AUTH, h.NO_CREDIT):
        err = UpstreamError(f"upstream {name} refused relay's credentials")
    else:
        err = UpstreamError(f"upstream {name} failed with status {resp.status}")
    err.outcome = outcome
    err.upstream = name
    return err
