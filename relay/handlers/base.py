"""The base handler: CORS, request ids, client address, and every error formatted once."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

import tornado
import tornado.web
from pymongo.errors import PyMongoError
from tornado import httputil

from relay import bounded_json
from relay.auth import FailedAuthThrottle
from relay.errors import (
    InvalidApiKey,
    InvalidRequest,
    IpNotAllowed,
    MethodNotAllowed,
    NotFound,
    RelayError,
    StoreUnavailable,
    TooManyFailedAttempts,
)
from relay.net import client_address
from relay.observability.access_log import Flag, flag_for
from relay.observability.metrics import IN_FLIGHT, exposition
from relay.redact import redact_path
from relay.request_ids import new_request_id
from relay.tornado_fastpath import Headers

if TYPE_CHECKING:
    from relay.services import Services
    from relay.store.base import KeyRecord

log = logging.getLogger("relay.app")

ALLOWED_HEADERS = "Authorization, Content-Type"


SERVER_HEADER = f"TornadoServer/{tornado.version}"
_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """Now, as HTTP's Date header says it (the same string for a whole second)."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, httputil.format_timestamp(second))
    return _date[1]


class RelayHandler(tornado.web.RequestHandler):
    route = "other"  # the route label in metrics

    def __init__(self, application: tornado.web.Application, request: httputil.HTTPServerRequest,
                 **kwargs: Any) -> None:
        """Tornado's constructor (tornado is pinned) without the template namespace (``self.ui``,
        two objects per request): relay renders no templates."""
        self.application = application
        self.request = request
        self._headers_written = False
        self._finished = False
        self._auto_finish = True
        self._prepared_future = None
        self.clear()
        assert request.connection is not None
        request.connection.set_close_callback(self.on_connection_close)  # type: ignore[attr-defined]
        self.initialize(**kwargs)

    def set_header(self, name: str, value: Any) -> None:
        # Tornado's check, in C for the common case: printable ASCII is a valid field value.
        if value.__class__ is str and value.isascii() and value.isprintable():
            self._headers[name] = value
        else:
            super().set_header(name, value)

    def initialize(self, services: Services) -> None:
        self.services = services
        self.started = time.perf_counter()
        self.upstream_wait: float | None = None  # seconds spent waiting on upstreams, for the overhead metric
        IN_FLIGHT.inc()
        services.active += 1
        self._counted = True
        self.key_prefix = "-"
        self.model = "-"
        self.upstream_name = "-"
        self.flag: str = Flag.NONE  # why a request failed, in Envoy's spirit (see observability.access_log)

    def clear(self) -> None:
        """Tornado's ``clear()`` (tornado is pinned), but with the Date header made once a second
        rather than per response: email.utils' formatdate was 3% of a proxied chat's CPU."""
        headers = self._headers = Headers()
        headers["Server"] = SERVER_HEADER
        headers["Content-Type"] = "text/html; charset=UTF-8"
        headers["Date"] = http_date()
        self.set_default_headers()
        self._write_buffer = []
        self._status_code = 200
        self._reason = "OK"

    def set_default_headers(self) -> None:
        # Runs before initialize() and again on every clear(): the id is made once.
        if not hasattr(self, "request_id"):
            self.request_id = new_request_id()
        headers = self._headers  # relay's own values, all printable ASCII: no check needed
        headers["X-Request-Id"] = self.request_id
        # Browser clients (ChatGPT-Next-Web, translators) call from other origins with a bearer
        # header; no cookies are involved, so "*" is safe for the origin.
        headers["Access-Control-Allow-Origin"] = "*"
        headers["Access-Control-Expose-Headers"] = "X-Request-Id"
        for name, value in getattr(self, "limit_headers", {}).items():  # a limited key's, on every answer
            headers[name] = value

    def on_finish(self) -> None:
        self._uncount()

    def on_connection_close(self) -> None:
        self._uncount()
        super().on_connection_close()

    def _uncount(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            IN_FLIGHT.dec()
            self.services.active -= 1

    def options(self, *args: Any) -> None:
        # "*" in Allow-Headers does not cover Authorization, so name what the browser asks for.
        asked = self.request.headers.get("Access-Control-Request-Headers")
        self.set_header("Access-Control-Allow-Headers", asked or ALLOWED_HEADERS)
        self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.set_header("Access-Control-Max-Age", "86400")
        self.set_status(204)
        self.finish()

    def compute_etag(self) -> None:
        return None

    @property
    def client_ip(self) -> str:
        known: str | None = getattr(self, "_client_ip", None)  # asked by the policy and the access line
        if known is None:
            h = self.request.headers
            known = self._client_ip = client_address(self.request.remote_ip or "", h.get("X-Forwarded-For"),
                                                     h.get("X-Forwarded-Proto"), self.request.protocol,
                                                     self.services.trusted_proxies)[0]
        return known

    async def refuse_guess(self, throttle: FailedAuthThrottle, message: str) -> None:
        """Count a wrong credential from this address; past the throttle's limit, a slow 429."""
        if throttle.record_failure(self.client_ip):
            await asyncio.sleep(throttle.delay_s)  # slows a guesser down; nobody else waits
            raise TooManyFailedAttempts(message) from None

    def json_body(self) -> dict[str, Any]:
        try:
            body = bounded_json.loads(self.request.body or b"")
        except bounded_json.TooDeep:
            raise InvalidRequest(f"The request body nests arrays and objects deeper than "
                                 f"{bounded_json.MAX_DEPTH} levels.") from None
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        return body

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        err = _as_relay_error(status_code, exc)
        if self.flag == Flag.NONE:
            self.flag = flag_for(err)
        if self.upstream_name == "-":
            self.upstream_name = getattr(err, "upstream", "-")
        self.set_status(err.status)
        for name, value in err.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json")
        self.clear_header("Content-Disposition")
        self.finish(json.dumps(err.body()))

    def send_relay_error(self, err: RelayError) -> None:
        self.send_error(err.status, exc_info=(type(err), err, None))

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        if isinstance(value, (RelayError, tornado.web.HTTPError)):
            return  # expected; the access line records it
        # Tornado passes sys.exc_info(): the exception carries its type and traceback (tb is
        # value.__traceback__), and logging takes it whole where the tuple's Optionals do not fit.
        log.error("unhandled error in %s %s [%s]", self.request.method, redact_path(self.request.path),
                  self.request_id, exc_info=value)


def _as_relay_error(status: int, exc: BaseException | None) -> RelayError:
    if isinstance(exc, RelayError):
        return exc
    if isinstance(exc, PyMongoError):  # a store call outside the store's own guard
        return StoreUnavailable("The store is unavailable; retry shortly.")
    if status == 405:
        return MethodNotAllowed("This method is not allowed on this URL.")
    if status == 404:
        return NotFound("Unknown URL.")
    if 400 <= status < 500:
        reason = getattr(exc, "log_message", None) or "Bad request."
        err: RelayError = InvalidRequest(reason)
        err.status = status
        return err
    err = RelayError("The server had an error while processing your request.")
    err.status = status if status >= 500 else 500
    return err


class AuthenticatedHandler(RelayHandler):
    """Requires a valid, active relay key before anything else happens."""

    key: KeyRecord  # set by prepare()

    async def prepare(self) -> None:
        if self.request.method == "OPTIONS":
            return
        try:
            self.key = await self.services.auth.authenticate(self.request.headers.get("Authorization"))
        except InvalidApiKey:
            await self.refuse_guess(self.services.throttle, "Too many requests with invalid API keys from your "
                                                            "address; slow down and check your key.")
            raise
        self.key_prefix = self.key.prefix
        policy = self.key.policy
        if policy is not None and policy.allow_cidrs and not policy.allows_address(self.client_ip):
            raise IpNotAllowed("This relay key may not be used from your address.")


class NotFoundHandler(RelayHandler):
    def prepare(self) -> None:
        if self.request.method != "OPTIONS":
            raise NotFound(f"Unknown request URL: {self.request.method} {self.request.path}.")


class HealthzHandler(RelayHandler):
    """The process is alive (it recovers from a lost store by itself: 200 all the same)."""

    route = "health"

    def get(self) -> None:
        store = self.services.store.breaker
        self.write_json({"status": "ok", "store": "up" if store.up else "down",
                         "store_down_s": round(store.down_for(), 1)})


class ReadyzHandler(RelayHandler):
    """Ready for traffic: the store answers and at least one endpoint is available."""

    route = "health"

    async def get(self) -> None:
        services = self.services
        try:
            await asyncio.wait_for(services.store.ping(), 2.0)
            store_ok = True
        except Exception:
            store_ok = False
        router = services.router
        endpoints_ok = router.pool.any_available(router.clock())
        ready = store_ok and endpoints_ok
        self.write_json({"status": "ready" if ready else "not ready", "store": store_ok,
                         "available_endpoint": endpoints_ok}, status=200 if ready else 503)


class MetricsHandler(RelayHandler):
    """Prometheus text format: every metric of observability.metrics."""

    route = "metrics"

    def get(self) -> None:
        body, content_type = exposition()
        self.set_header("Content-Type", content_type)
        self.finish(body)
