"""Health of endpoints and upstreams, as a state machine fed with outcomes and the time. Pure.

Envoy's vocabulary: passive outlier detection ejects an *upstream* after consecutive
connect errors, timeouts or 5xx, for a time that grows with each ejection; a 429 cools down
only that *key*; an auth or account failure disables only that key until the checker sees
it work again. Active probes mark an endpoint unavailable after consecutive failures even
when no traffic flows, and a successful probe ends an ejection early.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from relay.config import HealthPolicy

# Outcomes of one attempt or probe.
OK = "ok"
CONNECT_ERROR = "connect_error"
TIMEOUT = "timeout"
SERVER_ERROR = "5xx"
RATE_LIMITED = "429"
AUTH = "auth"                 # 401/403, invalid_api_key, account_deactivated
NO_CREDIT = "quota"           # the upstream key's own insufficient_quota
CLIENT_ERROR = "client_error"  # the request's fault: says nothing about the upstream

OUTLIER_OUTCOMES = frozenset({CONNECT_ERROR, TIMEOUT, SERVER_ERROR})
RETRYABLE_OUTCOMES = frozenset({CONNECT_ERROR, TIMEOUT, SERVER_ERROR, RATE_LIMITED, AUTH, NO_CREDIT})

_KEY_DISABLING_CODES = {"invalid_api_key": AUTH, "account_deactivated": AUTH, "insufficient_quota": NO_CREDIT}


def classify_status(status: int, error_code: str | None = None) -> str:
    """An upstream HTTP status (and its OpenAI error code, if any) as an outcome."""
    if error_code in _KEY_DISABLING_CODES:
        return _KEY_DISABLING_CODES[error_code]
    if status < 400:
        return OK
    if status in (401, 403):
        return AUTH
    if status == 429:
        return RATE_LIMITED
    if status >= 500:
        return SERVER_ERROR
    return CLIENT_ERROR


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
    state: str            # healthy, ejected, cooling, unhealthy, disabled_by_checker, disabled_by_operator
    until: float = 0.0    # when the ejection or cooldown ends


def endpoint_state(ep_health: EndpointHealth, up_health: UpstreamHealth, operator_disabled: bool,
                   policy: HealthPolicy, now: float) -> HealthState:
    if operator_disabled:
        return HealthState(False, "disabled_by_operator")
    if ep_health.disabled_reason:
        return HealthState(False, "disabled_by_checker")
    if up_health.ejected(now):
        return HealthState(False, "ejected", up_health.ejected_until)
    if ep_health.cooling_until > now:
        return HealthState(False, "cooling", ep_health.cooling_until)
    if ep_health.probe_failures >= policy.unhealthy_after:
        return HealthState(False, "unhealthy")
    return HealthState(True, "healthy")


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
        rest = retry_after_s if retry_after_s is not None and retry_after_s >= 0 else policy.default_cooldown_s
        ep.cooling_until = max(ep.cooling_until, now + min(rest, policy.max_cooldown_s))
    elif outcome in (AUTH, NO_CREDIT):
        ep.disabled_reason = outcome
        ep.disabled_at = now


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
        rest = retry_after_s if retry_after_s is not None and retry_after_s >= 0 else policy.default_cooldown_s
        ep.cooling_until = max(ep.cooling_until, now + min(rest, policy.max_cooldown_s))
    elif outcome in (AUTH, NO_CREDIT):
        if not ep.disabled_reason:
            ep.disabled_at = now
        ep.disabled_reason = outcome


def probe_due(ep: EndpointHealth, policy: HealthPolicy, now: float) -> bool:
    """Auto-disabled keys are retested on the slower interval; others on every interval."""
    if ep.disabled_reason:
        return now - max(ep.last_probe_at, ep.disabled_at) >= policy.recheck_disabled_s - 1e-9
    return now - ep.last_probe_at >= policy.interval_s - 1e-9


@dataclass
class RetryBudget:
    """Retries allowed: at most ``ratio`` of the requests in the last window, but never fewer
    than ``floor`` (so a quiet relay still fails over). Counts in one-second buckets."""

    ratio: float
    floor: int
    window_s: float
    _requests: dict[int, int] = field(default_factory=dict)
    _retries: dict[int, int] = field(default_factory=dict)

    def _prune(self, now: float) -> None:
        oldest = int(now - self.window_s)
        for counts in (self._requests, self._retries):
            for second in [s for s in counts if s <= oldest]:
                del counts[second]

    def record_request(self, now: float) -> None:
        self._prune(now)
        self._requests[int(now)] = self._requests.get(int(now), 0) + 1

    def try_retry(self, now: float) -> bool:
        self._prune(now)
        retries = sum(self._retries.values())
        allowed = max(self.floor, int(self.ratio * sum(self._requests.values())))
        if retries >= allowed:
            return False
        self._retries[int(now)] = self._retries.get(int(now), 0) + 1
        return True
