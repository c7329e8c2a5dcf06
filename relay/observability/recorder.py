"""Turns what happens in relay into metric samples; the one place that writes metrics.

The router, the store, the quota and the reloader call these hooks; none of them imports
prometheus_client, so they stay testable without it.
"""
from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

from prometheus_client.metrics import MetricWrapperBase

from relay.balancer.health import EndpointState
from relay.observability import metrics as m
from relay.observability.access_log import Flag, Logged, log_request

if TYPE_CHECKING:
    from relay.balancer.pool import Endpoint, Pool
    from relay.config import Config
    from relay.metering.ledger import LedgerEntry
    from relay.reload import ReloadResult
    from relay.services import Services


class Served(Logged, Protocol):
    """A request handler, or one turn of a WebSocket: what the request metrics read."""

    @property
    def services(self) -> Services: ...

    @property
    def model(self) -> str: ...

    @property
    def flag(self) -> str: ...

    @property
    def started(self) -> float: ...


_M = TypeVar("_M", bound=MetricWrapperBase)


class _Labels(Protocol):
    def __call__(self, metric: _M, *values: str) -> _M: ...


def _labels(metric: MetricWrapperBase, *values: str) -> MetricWrapperBase:
    """``metric.labels(*values)``, remembered: prometheus_client validates and locks on every
    call, and each request makes eight of them. The label sets are bounded (model labels are
    the configured names, upstreams the configured ones), and no child is ever removed."""
    return metric.labels(*values)


# labels() returns a child of the metric's own class (a Counter's child is a Counter), which
# lru_cache's stub cannot express: the cast says so, at no cost per call.
_child = cast(_Labels, functools.lru_cache(maxsize=8192)(_labels))


def on_request_end(handler: Served) -> None:
    """Called by Tornado once per request (the Application's log_function), and once per turn of
    a WebSocket."""
    log_request(handler)
    status = handler.get_status()
    config = handler.services.config
    model = m.model_label(config, handler.model) if handler.model != "-" else "none"
    route = getattr(handler, "route", "other")
    cls = m.status_class(status)
    total = time.perf_counter() - handler.started
    _child(m.REQUESTS, route, model, cls).inc()
    _child(m.REQUEST_SECONDS, route, model, cls).observe(total)
    wait = getattr(handler, "upstream_wait", None)
    if wait is not None:
        m.OVERHEAD_SECONDS.observe(max(total - wait, 0.0))
    if handler.flag == Flag.QUOTA_EXHAUSTED:
        m.QUOTA_REJECTIONS.inc()


class RouterEvents:
    def on_attempt(self, endpoint: Endpoint, outcome: str, attempt: int, seconds: float | None) -> None:
        _child(m.ATTEMPTS, endpoint.upstream.name, outcome).inc()
        if seconds is not None:
            _child(m.UPSTREAM_TTFB, endpoint.upstream.name).observe(seconds)

    def on_retry(self, reason: str, failed: Endpoint, following: Endpoint) -> None:
        _child(m.RETRIES, reason).inc()
        if failed.upstream.name != following.upstream.name:
            _child(m.FAILOVERS, reason).inc()

    def on_done(self, endpoint: Endpoint, seconds: float) -> None:
        _child(m.UPSTREAM_SECONDS, endpoint.upstream.name).observe(seconds)


def on_settled(config: Config, entry: LedgerEntry) -> None:
    """Tokens by kind (the parts are also counted in prompt or completion), the charge, and media."""
    label = m.model_label(config, entry.model)
    for kind, count in (("prompt", entry.prompt_tokens), ("completion", entry.completion_tokens),
                        ("cached", entry.cached_tokens), ("reasoning", entry.reasoning_tokens),
                        ("image", entry.image_tokens), ("audio", entry.audio_tokens)):
        if count or kind in ("prompt", "completion"):
            _child(m.TOKENS, label, kind).inc(count)
    _child(m.QUOTA_CHARGED, label).inc(entry.cost)
    for kind, count in (("images", entry.images), ("seconds", entry.seconds), ("characters", entry.characters)):
        if count:
            _child(m.MEDIA, label, kind).inc(count)


def on_store_op(op: str, seconds: float, ok: bool) -> None:
    _child(m.STORE_SECONDS, op).observe(seconds)
    if not ok:
        _child(m.STORE_ERRORS, op).inc()


def on_unbillable(reason: str, requests: int) -> None:
    _child(m.QUOTA_UNBILLABLE, reason).inc(requests)


def on_store_unreachable(down: bool) -> None:
    m.STORE_UP.set(0 if down else 1)


def on_quota_store_wait() -> None:
    m.QUOTA_STORE_WAITS.inc()


def on_start() -> None:
    m.CONFIG_RELOAD_OK.set(1)  # the file relay started with was valid
    m.STORE_UP.set(1)


def on_reload(result: ReloadResult) -> None:
    _child(m.CONFIG_RELOADS, "invalid" if not result.ok else "ok" if result.changed else "unchanged").inc()
    m.CONFIG_RELOAD_OK.set(1 if result.ok else 0)


def refresh_gauges(pool: Pool, now: float) -> None:
    """Endpoint states and available endpoints per model, from the pool as it is now."""
    config = pool.config
    available: dict[Endpoint, bool] = {}
    for ep in pool.endpoints:
        current = ep.state(config, now).state
        for state in m.ENDPOINT_STATES:
            _child(m.ENDPOINT_STATE, ep.upstream.name, ep.key_id, state).set(1 if state == current else 0)
        if current == EndpointState.HEALTHY:
            available[ep] = True
    for model in config.client_model_names():
        served = config.map_model(model)
        count = sum(1 for ep in available if ep.upstream.serves(served))
        _child(m.MODEL_ENDPOINTS, m.model_label(config, model)).set(count)
