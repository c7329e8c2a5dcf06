"""One access line per request: ids, key prefix, model, upstream, status, latency, flag.

Never message content, never a full key. The flag says why a request failed, as Envoy's
response flags do: no_endpoint, upstream_timeout, upstream_5xx, quota_exhausted,
client_disconnected, ...
"""
from __future__ import annotations

import logging
import time

from relay.errors import RelayError
from relay.redact import redact_path

access_log = logging.getLogger("relay.access")

_FLAG_BY_CODE = {
    "no_available_endpoint": "no_endpoint",
    "upstream_timeout": "upstream_timeout",
    "insufficient_quota": "quota_exhausted",
    "invalid_api_key": "bad_key",
    "key_disabled": "key_disabled",
    "store_unavailable": "store_unavailable",
}


def flag_for(err: RelayError) -> str:
    outcome = getattr(err, "outcome", None)
    if outcome and outcome != "error":
        return f"upstream_{outcome}"
    return _FLAG_BY_CODE.get(err.code or "", err.code or err.type)


def log_request(handler) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    status = handler.get_status()
    latency_ms = (time.perf_counter() - getattr(handler, "started", time.perf_counter())) * 1000
    access_log.info(
        "%s %s %s %s key=%s model=%s upstream=%s status=%d latency_ms=%.1f flag=%s",
        getattr(handler, "request_id", "-"), handler.request.method, redact_path(handler.request.path),
        getattr(handler, "client_ip", handler.request.remote_ip), getattr(handler, "key_prefix", "-"),
        getattr(handler, "model", "-"), getattr(handler, "upstream_name", "-"), status, latency_ms,
        getattr(handler, "flag", "-"))
