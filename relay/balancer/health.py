"""Health of endpoints and upstreams, as a state machine fed with outcomes and the time. Pure.

Envoy's vocabulary: passive outlier detection ejects an *upstream* after consecutive
connect errors, timeouts or 5xx, for a time that grows with each ejection; a 429 cools down
only that *key*; an auth or account failure disables only that key until the checker sees
it work again. Active probes mark an endpoint unavailable after consecutive failures even
when no traffic flows, and a successful probe ends an ejection early.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from relay.balancer.outcome import AUTH, CLIENT_ERROR, NO_CREDIT, OK, OUTLIER_OUTCOMES, RATE_LIMITED
from relay.config import HealthPolicy


class EndpointState(enum.StrEnum):
    HEALTHY = "healthy"
    EJECTED = "ejected"
    COOLING = "cooling"
    UNHEALTHY = "unhealthy"
    DISABLED_BY_CHECKER = "disabled_by_checker"
    DISABLED_BY_OPERATOR = "disabled_by_operator"


WAITING_STATES = frozenset({EndpointState.EJECTED, EndpointState.COOLING, EndpointState.UNHEALTHY})  # time heals


@dataclass
class UpstreamHealth:
    consecutive_failures: int = 0
    times_ejected: int = 0
    ejected_until: float = 0.0

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now


@dataclass
class EndpointHealth:
    in_flight: int = 0
    probe_failures: int = 0
    cooling_until: float = 0.0
    disabled_reason: str | None = None  # set by the checker; only a working probe clears it
    disabled_at: float = 0.0
    last_probe_at: float = float("-inf")
    requests: int = 0
    errors: int = 0
    latency_ewma_ms: float | None = None

    def record_latency(self, ms: float) -> None:
        self.latency_ewma_ms = ms if self.latency_ewma_ms is None else 0.8 * self.latency_ewma_ms + 0.2 * ms


@dataclass
class HealthState:
    """Why an endpoint is or is not available now."""

    available: bool
    state: EndpointState
    until: float = 0.0    # when the ejection or cooldown ends


def endpoint_state(ep_health: EndpointHealth, up_health: UpstreamHealth, operator_disabled: bool,
                   policy: HealthPolicy, now: float) -> HealthState:
    if operator_disabled:
        return HealthState(False, EndpointState.DISABLED_BY_OPERATOR)
    if ep_health.disabled_reason:
        return HealthState(False, EndpointState.DISABLED_BY_CHECKER)
    if up_health.ejected(now):
        return HealthState(False, EndpointState.EJECTED, up_health.ejected_until)
    if ep_health.cooling_until > now:
        return HealthState(False, EndpointState.COOLING, ep_health.cooling_until)
    if ep_health.probe_failures >= policy.unhealthy_after:
        return HealthState(False, EndpointState.UNHEALTHY)
    return HealthState(True, EndpointState.HEALTHY)


def record_attempt(outcome: str, ep: EndpointHealth, up: UpstreamHealth, policy: HealthPolicy, now: float,
                   retry_after_s: float | None = None) -> None:
    """Feed one real request's outcome (passive checks)."""
    ep.requests += 1
    if outcome == OK or outcome == CLIENT_ERROR:
        up.consecutive_failures = 0
        return
    ep.errors += 1
    if outcome in OUTLIER_OUTCOMES:
        up.consecutive_failures += 1
        if up.consecutive_failures >= policy.eject_after and not up.ejected(now):
            _eject(up, policy, now)
    elif outcome == RATE_LIMITED:
        _cool_down(ep, policy, now, retry_after_s)
    elif outcome in (AUTH, NO_CREDIT):
        ep.disabled_reason = outcome
        ep.disabled_at = now


def _cool_down(ep: EndpointHealth, policy: HealthPolicy, now: float, retry_after_s: float | None) -> None:
    """A 429 rests only that key: for its Retry-After, or the default, never beyond the cap."""
    rest = retry_after_s if retry_after_s is not None and retry_after_s >= 0 else policy.default_cooldown_s
    ep.cooling_until = max(ep.cooling_until, now + min(rest, policy.max_cooldown_s))


def _eject(up: UpstreamHealth, policy: HealthPolicy, now: float) -> None:
    up.times_ejected += 1
    up.ejected_until = now + min(policy.base_ejection_s * up.times_ejected, policy.max_ejection_s)
    up.consecutive_failures = 0


def record_probe(outcome: str, ep: EndpointHealth, up: UpstreamHealth, policy: HealthPolicy, now: float,
                 retry_after_s: float | None = None) -> None:
    """Feed one active probe's outcome."""
    ep.last_probe_at = now
    if outcome == OK:
        ep.probe_failures = 0
        ep.disabled_reason = None  # the key works again
        if up.ejected(now):
            up.ejected_until = now  # a successful probe returns the upstream early
        up.consecutive_failures = 0
        return
    if outcome in OUTLIER_OUTCOMES:
        ep.probe_failures += 1
    elif outcome == RATE_LIMITED:
        _cool_down(ep, policy, now, retry_after_s)
    elif outcome in (AUTH, NO_CREDIT):
        if not ep.disabled_reason:
            ep.disabled_at = now
        ep.disabled_reason = outcome


def probe_due(ep: EndpointHealth, policy: HealthPolicy, now: float) -> bool:
    """Auto-disabled keys are retested on the slower interval; others on every interval."""
    if ep.disabled_reason:
        return now - max(ep.last_probe_at, ep.disabled_at) >= policy.recheck_disabled_s - 1e-9
    return now - ep.last_probe_at >= policy.interval_s - 1e-9
