"""Turns what happens in relay into metric samples; the one place that writes metrics.

The router, the store, the charger and the reloader call these hooks; none of them imports
prometheus_client, so they stay testable without it.
"""
from __future__ import annotations

import time

from relay.observability import metrics as m
from relay.observability.access_log import log_request


def on_request_end(handler) -> None:
    """Called by Tornado once per request (the Application's log_function)."""
    log_request(handler)
    status = handler.get_status()
    config = handler.services.config
    model = m.model_label(config, handler.model) if handler.model != "-" else "none"
    route = getattr(handler, "route", "other")
    cls = m.status_class(status)
    total = time.perf_counter() - handler.started
    m.REQUESTS.labels(route, model, cls).inc()
    m.REQUEST_SECONDS.labels(route, model, cls).observe(total)
    wait = getattr(handler, "upstream_wait", None)
    if wait is not None:
        m.OVERHEAD_SECONDS.observe(max(total - wait, 0.0))
    if handler.flag == "quota_exhausted":
        m.QUOTA_REJECTIONS.inc()


class RouterEvents:
    def on_attempt(self, endpoint, outcome: str, attempt: int, seconds: float | None) -> None:
        m.ATTEMPTS.labels(endpoint.upstream.name, outcome).inc()
        if seconds is not None:
            m.UPSTREAM_TTFB.labels(endpoint.upstream.name).observe(seconds)

    def on_retry(self, reason: str, failed, following) -> None:
        m.RETRIES.labels(reason).inc()
        if failed.upstream.name != following.upstream.name:
            m.FAILOVERS.labels(reason).inc()


def on_upstream_done(upstream: str, seconds: float) -> None:
    m.UPSTREAM_SECONDS.labels(upstream).observe(seconds)


def on_settled(config, model: str, prompt_tokens: int, completion_tokens: int, cost: int) -> None:
    label = m.model_label(config, model)
    m.TOKENS.labels(label, "prompt").inc(prompt_tokens)
    m.TOKENS.labels(label, "completion").inc(completion_tokens)
    m.QUOTA_CHARGED.labels(label).inc(cost)


def on_store_op(op: str, seconds: float, ok: bool) -> None:
    m.STORE_SECONDS.labels(op).observe(seconds)
    if not ok:
        m.STORE_ERRORS.labels(op).inc()


def on_start() -> None:
    m.CONFIG_RELOAD_OK.set(1)  # the file relay started with was valid


def on_reload(result) -> None:
    m.CONFIG_RELOADS.labels("invalid" if not result.ok else "ok" if result.changed else "unchanged").inc()
    m.CONFIG_RELOAD_OK.set(1 if result.ok else 0)


def refresh_gauges(pool, now: float) -> None:
    """Endpoint states and available endpoints per model, from the pool as it is now."""
    config = pool.config
    available = {}
    for ep in pool.endpoints:
        current = ep.state(config, now).state
        for state in m.ENDPOINT_STATES:
            m.ENDPOINT_STATE.labels(ep.upstream.name, ep.key_id, state).set(1 if state == current else 0)
        if current == "healthy":
            available[ep] = True
    for model in config.client_model_names():
        served = config.map_model(model)
        count = sum(1 for ep in available if ep.upstream.serves(served))
        m.MODEL_ENDPOINTS.labels(m.model_label(config, model)).set(count)
