"""Tornado's per-request objects, built with less work (tornado is pinned: see pyproject.toml).

At concurrency 1 Tornado's own code was about a seventh of relay's CPU per proxied chat
(py-spy, bench/proxy_compare.py): among it, an ``HTTPServerRequest`` parses and deep-copies
an empty query string on every request, checks the same Host with two regular expressions,
and ``HTTPHeaders.get`` takes three calls and an exception for a header that is absent.
``RelayApplication`` routes exactly as Tornado's ``Application`` does; only the request
object it builds for a URL without a query skips that work, with the same attributes and
the same Host checks (a Host once checked is remembered). And it starts each handler as a
task of its own without Tornado's detour (``gen.convert_yielded``'s single dispatch, an
``IOLoop.current()`` lookup and two settings read per request: 5 % of a chat's samples).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import tornado.web
from tornado import httputil
from tornado.httputil import _normalize_header
from tornado.routing import _RoutingDelegate


class Headers(httputil.HTTPHeaders):
    """Tornado's ``HTTPHeaders`` whose ``get`` is one call: the inherited ``Mapping.get`` goes
    through ``__getitem__`` and a ``KeyError`` for every header absent, about nine times a request."""

    def get(self, name: str, default: Any = None) -> Any:
        values = self._as_list.get(_normalize_header(name))
        if values is None:
            return default
        return values[0] if len(values) == 1 else ",".join(values)


class LeanRequest(httputil.HTTPServerRequest):
    """``HTTPServerRequest`` for a URL without a query string (Tornado's own constructor
    otherwise): the same attributes, the same 400s for a missing, malformed or repeated Host."""

    def __init__(self, start_line: httputil.RequestStartLine, headers: httputil.HTTPHeaders,
                 connection: httputil.HTTPConnection, server_connection: object) -> None:
        self.method, self.uri, self.version = start_line
        self.headers = headers
        self.body = b""
        context = getattr(connection, "context", None)
        self.remote_ip = getattr(context, "remote_ip", None)
        self.protocol = getattr(context, "protocol", "http")
        host = headers.get("Host")
        if host is None:
            if self.version != "HTTP/1.0":
                raise httputil.HTTPInputError("Missing Host header")
            host = "127.0.0.1"  # HTTP/1.0 does not require one
        self.host = host
        self.host_name = _host_name(host)
        self.files = {}
        self.connection = connection
        self.server_connection = server_connection
        self._start_time = time.time()
        self._finish_time = None
        self.path, self.query = self.uri, ""
        self.arguments = {}
        self.query_arguments = {}
        self.body_arguments = {}


# Hosts seen and their names: clients send the same one or two, and each costs two regular
# expressions to check. Bounded: a client inventing hosts empties it now and then.
_HOST_NAMES: dict[str, str] = {}
MAX_HOSTS_REMEMBERED = 256


def _host_name(host: str) -> str:
    """The Host header's name part, checked as Tornado checks it (400 when it is not a host)."""
    name = _HOST_NAMES.get(host)
    if name is not None:
        return name
    if not httputil._ABNF.host.fullmatch(host):  # noqa: SLF001 (Tornado's own check)
        raise httputil.HTTPInputError(f"Invalid Host header: {host!r}")
    if "," in host:
        raise httputil.HTTPInputError(f"Multiple host headers not allowed: {host!r}")
    name = httputil.split_host_and_port(host.lower())[0]
    if len(_HOST_NAMES) >= MAX_HOSTS_REMEMBERED:
        _HOST_NAMES.clear()
    _HOST_NAMES[host] = name
    return name


class _LeanRoutingDelegate(_RoutingDelegate):
    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        if "?" in start_line.path:
            return super().headers_received(start_line, headers)
        request = LeanRequest(start_line, headers, self.request_conn, self.server_conn)
        delegate = self.router.find_handler(request)
        assert delegate is not None  # an Application always finds one: its default handler
        self.delegate = delegate
        return delegate.headers_received(start_line, headers)


# Handlers' tasks, held until they end: the loop keeps only weak references to tasks, and
# Tornado holds its own for the same reason (``IOLoop._pending_tasks``).
_RUNNING: set[asyncio.Task[None]] = set()


def _ended(task: asyncio.Task[None]) -> None:
    _RUNNING.discard(task)
    if not task.cancelled():
        task.result()  # an exception that escaped the handler goes to the loop's handler, as in Tornado


class _LeanHandlerDelegate(tornado.web._HandlerDelegate):  # noqa: SLF001 (tornado is pinned)
    """Tornado's ``_HandlerDelegate.execute``, for an application without output transforms and
    with its template and static caches on (relay's): the handler's ``_execute`` started as a task."""

    def execute(self) -> Awaitable[None] | None:
        loop = asyncio.get_running_loop()
        handler = self.handler = self.handler_class(self.application, self.request, **self.handler_kwargs)
        if self.stream_request_body:
            handler._prepared_future = loop.create_future()  # type: ignore[assignment]  # as Tornado does it
        task = loop.create_task(handler._execute([], *self.path_args, **self.path_kwargs))
        _RUNNING.add(task)
        task.add_done_callback(_ended)
        return handler._prepared_future


class RelayApplication(tornado.web.Application):
    """Tornado's ``Application``, whose requests without a query are built by ``LeanRequest``
    and whose handlers start as tasks directly (``_LeanHandlerDelegate``)."""

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return _LeanRoutingDelegate(self, server_conn, request_conn)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Off in debug mode, where Tornado reloads templates and static files per request.
        self._caches_on = bool(self.settings.get("compiled_template_cache", True)
                               and self.settings.get("static_hash_cache", True))

    def get_handler_delegate(self, request: httputil.HTTPServerRequest, target_class: type[tornado.web.RequestHandler],
                             target_kwargs: dict[str, Any] | None = None, path_args: list[bytes] | None = None,
                             path_kwargs: dict[str, bytes] | None = None) -> tornado.web._HandlerDelegate:
        if self.transforms or not self._caches_on:
            return super().get_handler_delegate(request, target_class, target_kwargs, path_args, path_kwargs)
        return _LeanHandlerDelegate(self, request, target_class, target_kwargs, path_args, path_kwargs)
