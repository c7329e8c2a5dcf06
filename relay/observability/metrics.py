"""Every metric relay exports, defined once, with its help text.

Labels carry no key and no content: upstreams by their configured name, keys by their
position (``k0``), models only by configured names (anything else is ``other``), so junk
input cannot create series. With several worker processes, set PROMETHEUS_MULTIPROC_DIR
before this module is imported (``relay serve --workers N`` does) and /metrics aggregates
across them.
"""
from __future__ import annotations

import bisect
import os
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    multiprocess,
)

from relay.balancer.health import EndpointState

if TYPE_CHECKING:
    from relay.config import Config

class Histogram(prometheus_client.Histogram):
    """prometheus_client's histogram, with the bucket found by bisection: its own ``observe``
    walks the bounds in Python, and a request makes four observations."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar is not None or (self._labelnames and not self._labelvalues):
            super().observe(amount, exemplar)  # exemplars, and the parent's error, as the library has them
            return
        self._sum.inc(amount)
        self._buckets[bisect.bisect_left(self._upper_bounds, amount)].inc(1)  # the first bound >= amount


# Sub-millisecond resolution where relay's own work lives; coarser where upstreams live.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
                    0.025, 0.05, 0.1, 0.25, 1.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

REQUESTS = Counter("relay_requests", "Client requests answered, by route, model and status class.",
                   ["route", "model", "status_class"])
REQUEST_SECONDS = Histogram("relay_request_duration_seconds",
                            "Client request duration, from the first byte read to the last written.",
                            ["route", "model", "status_class"], buckets=LATENCY_BUCKETS)
OVERHEAD_SECONDS = Histogram("relay_overhead_seconds",
                             "Time relay itself spent on a proxied request: its duration minus the time "
                             "spent waiting on upstreams.", buckets=OVERHEAD_BUCKETS)
IN_FLIGHT = Gauge("relay_requests_in_flight", "Client requests being served now.", multiprocess_mode="livesum")

UPSTREAM_TTFB = Histogram("relay_upstream_ttfb_seconds",
                          "Time from sending a request to an upstream to its response headers.",
                          ["upstream"], buckets=LATENCY_BUCKETS)
UPSTREAM_SECONDS = Histogram("relay_upstream_duration_seconds",
                             "Time from sending a request to an upstream to the end of its response.",
                             ["upstream"], buckets=LATENCY_BUCKETS)
ATTEMPTS = Counter("relay_upstream_attempts", "Attempts sent to upstreams, by outcome "
                   "(ok, 5xx, 429, auth, quota, timeout, connect_error, client_error).", ["upstream", "outcome"])
RETRIES = Counter("relay_retries", "Attempts retried on another endpoint, by the failed attempt's outcome.",
                  ["reason"])
FAILOVERS = Counter("relay_failovers", "Retries that moved to another upstream, by the failed attempt's outcome.",
                    ["reason"])
AFFINITY = Counter("relay_affinity", "Requests with a cache affinity key, by where the first attempt went: "
                   "first_choice (the key's first endpoint in its tier, where its prompt cache is warm) or "
                   "fell_back (that one was unavailable or overloaded).", ["outcome"])
ENDPOINT_STATE = Gauge("relay_endpoint_state", "1 for the state each endpoint (upstream × key) is in: healthy, "
                       "ejected, cooling, unhealthy, disabled_by_checker, disabled_by_operator.",
                       ["upstream", "key_id", "state"], multiprocess_mode="livemax")
MODEL_ENDPOINTS = Gauge("relay_model_available_endpoints", "Endpoints available now for each configured model.",
                        ["model"], multiprocess_mode="livemax")

TOKENS = Counter("relay_tokens", "Tokens metered, by model and kind: prompt and completion (every token), and the "
                 "parts priced apart: cached, reasoning, image, audio.", ["model", "kind"])
QUOTA_CHARGED = Counter("relay_quota_units_charged", "Quota units charged to relay keys.", ["model"])
QUOTA_REJECTIONS = Counter("relay_quota_rejections", "Requests refused with insufficient_quota.")
MEDIA = Counter("relay_media_metered", "Media metered at settlement, by model and kind: images generated, "
                "seconds of audio transcribed or translated, characters read aloud.", ["model", "kind"])

STORE_SECONDS = Histogram("relay_store_operation_seconds", "Store operation latency.", ["op"],
                          buckets=STORE_BUCKETS)
STORE_ERRORS = Counter("relay_store_errors", "Store operations that failed.", ["op"])
QUOTA_UNBILLABLE = Counter("relay_quota_unbillable_requests", "Requests served that could not be billed, by reason "
                           "(commit_refused: the store refused a group commit; lease_forgotten: a process came "
                           "back after its swept lease's tombstone was cleared). Should stay 0.", ["reason"])
STORE_UP = Gauge("relay_store_up", "1 while the store answers this process, 0 while it is unreachable.",
                 multiprocess_mode="livemin")
QUOTA_STORE_WAITS = Counter("relay_quota_store_waits", "Requests whose reservation waited for a store round trip "
                            "(without leases: every request; with leases: a slice that could not cover one).")
RATE_LIMITED = Counter("relay_rate_limited", "Requests refused by their key's own rate limit, by limit (rpm, tpm, "
                       "concurrency).", ["limit"])
CODES_REDEEMED = Counter("relay_codes_redeemed", "Top-up codes redeemed onto keys.")
CONFIG_RELOADS = Counter("relay_config_reloads", "Config reloads by result (ok, unchanged, invalid).",
                         ["result"])
CONFIG_RELOAD_OK = Gauge("relay_config_last_reload_ok", "1 when the last config reload succeeded, 0 when the "
                         "file on disk was rejected.", multiprocess_mode="livemin")

ENDPOINT_STATES = tuple(EndpointState)
ROUTES = ("chat", "embeddings", "models", "billing", "admin", "usage", "redeem", "health", "metrics", "other",
          "images", "audio", "responses")


def exposition() -> tuple[bytes, str]:
    """The text format for /metrics; aggregated over worker processes in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        # prometheus_client annotates its metrics but not this constructor.
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class ModelLabels:
    """Model label values limited to the configured names; everything else is ``other``."""

    def __init__(self) -> None:
        self._config: Config | None = None
        self._known: frozenset[str] = frozenset()

    def __call__(self, config: Config, model: str | None) -> str:
        if config is not self._config:
            names = set(config.client_model_names()) | set(config.pricing) | set(config.model_map.values())
            for u in config.upstreams:
                names.update(u.models or ())
                names.update(u.model_map.values())
            self._known, self._config = frozenset(names), config
        return model if model in self._known else "other"


model_label = ModelLabels()
