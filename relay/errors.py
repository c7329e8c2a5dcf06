"""One error tree: each class knows its HTTP status and OpenAI error type and code.

Handlers raise these; ``handlers.base`` formats every one of them in one place.
"""
from __future__ import annotations

from typing import Any


class RelayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class InvalidRequest(RelayError):
    status, type, code = 400, "invalid_request_error", None


class InvalidApiKey(RelayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class KeyDisabled(RelayError):
    status, type, code = 401, "invalid_request_error", "key_disabled"


class AdminUnauthorized(RelayError):
    status, type, code = 401, "invalid_request_error", "invalid_admin_token"


class NotFound(RelayError):
    status, type, code = 404, "invalid_request_error", "unknown_url"


class ResponseNotFound(RelayError):
    """A stored response relay does not know for this key: what OpenAI answers for an unknown id."""

    status, type, code = 404, "invalid_request_error", None


class PreviousResponseNotFound(RelayError):
    status, type, code = 400, "invalid_request_error", "previous_response_not_found"


class ModelNotFound(RelayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class MethodNotAllowed(RelayError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class BodyTooLarge(RelayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class InsufficientQuota(RelayError):
    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class TooManyRequests(RelayError):
    status, type, code = 429, "requests", "rate_limit_exceeded"


class TooManyFailedAttempts(RelayError):
    status, type, code = 429, "requests", "too_many_failed_attempts"


class UpstreamError(RelayError):
    """The upstream failed (connect error, 5xx, bad reply): the client's request may be fine."""

    status, type, code = 502, "upstream_error", "bad_gateway"
    outcome = "error"  # how the attempt ended, for health and metrics
    upstream = "-"     # the upstream's name, for the access line

    def __init__(self, message: str, *, upstream: str = "-", outcome: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, headers=headers)
        self.upstream = upstream
        if outcome is not None:
            self.outcome = outcome


class UpstreamRateLimited(UpstreamError):
    """Every endpoint tried answered 429: the client may retry, after Retry-After."""

    status, type, code = 429, "requests", "rate_limit_exceeded"


class UpstreamConnectError(UpstreamError):
    outcome = "connect_error"


class UpstreamResponseTooLarge(UpstreamError):
    code = "upstream_response_too_large"


class UpstreamTimeout(UpstreamError):
    status, type, code = 504, "upstream_error", "upstream_timeout"
    outcome = "timeout"


class NoEndpoint(RelayError):
    status, type, code = 503, "service_unavailable", "no_available_endpoint"


class PinnedEndpointUnavailable(RelayError):
    """The one endpoint that may serve a request about a stored response cannot now."""

    status, type, code = 503, "service_unavailable", "pinned_endpoint_unavailable"


class StoreUnavailable(RelayError):
    status, type, code = 503, "service_unavailable", "store_unavailable"
