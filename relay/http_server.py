"""relay's HTTP/1.1 server: httptools parses, asyncio's transports carry the bytes, Tornado's
``Application`` routes and runs the handlers unchanged.

Why not Tornado's own ``HTTPServer``: on a proxied chat its HTTP/1.1 layer (``IOStream``
reads through futures, a regex search for the end of the headers, header parsing in Python,
``gen.with_timeout`` around every read, a write future per flush) was about a third of relay's
CPU per request (bench/proxy_compare.py, py-spy). Here each request is a handful of C
callbacks from llhttp and one ``transport.write`` per flush.

What it keeps from Tornado's ``HTTP1Connection``, because handlers and clients rely on it:
- keep-alive and pipelining (requests answered in order, one at a time), HTTP/1.0 included;
- request bodies streamed to ``data_received`` with flow control: reading pauses while a
  handler's future is pending;
- ``Expect: 100-continue`` answered once the handler has accepted the headers;
- responses chunked when they have no Content-Length; a Content-Length kept exactly;
- the client-gone signals: ``on_connection_close`` while the request is read, the
  connection's close callback after;
- the limits: header timeout (slow headers, idle keep-alive), body timeout, header size,
  body size (400, like Tornado's backstop; relay's handlers answer 413 far below it);
- a malformed request gets ``400 Bad Request`` and the connection closes;
- ``detach()`` for WebSocket upgrades: the socket is handed to a Tornado ``IOStream``, which
  Tornado's WebSocket code then owns.

TLS (``ssl_options``) stays on Tornado's server (``relay.app.make_server``): behind a TLS
terminator is how relay is deployed, and ``detach()`` needs the bare socket.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import httptools
import tornado.iostream
import tornado.netutil
from tornado import httputil
from tornado.http1connection import HTTP1Connection

from relay.observability.access_log import printable
from relay.tornado_fastpath import Headers

log = logging.getLogger("relay.http")
MALFORMED_CHARS = 120

_HEADERS, _BODY, _END = 1, 2, 3
_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_HEADERS_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 (Continue)\r\n\r\n"
_PAUSE_AT_EVENTS = 64  # queued parser events (a blocked connection) before reading pauses


def hang_up(connection: httputil.HTTPConnection | None) -> None:
    """Drop a request's connection now, whichever server serves it (relay's or Tornado's)."""
    if isinstance(connection, HTTP1Connection):
        connection.stream.close()
    elif isinstance(connection, Connection):
        connection.close()


class ConnectionContext:
    """What ``HTTPServerRequest`` reads from ``connection.context``."""
    __slots__ = ("address", "remote_ip", "protocol")

    def __init__(self, address: Any):
        self.address = address
        self.remote_ip = address[0] if isinstance(address, tuple) and address else "0.0.0.0"
        self.protocol = "http"

    def __str__(self) -> str:
        return self.remote_ip


class HTTPServer:
    """The subset of Tornado's ``HTTPServer`` relay uses: ``listen``, ``add_sockets``,
    ``stop`` and ``close_all_connections``."""

    def __init__(self, app: httputil.HTTPServerConnectionDelegate, *, idle_timeout: float = 60.0,
                 body_timeout: float = 120.0, max_body_size: int = 64 << 20, max_header_size: int = 65536):
        self.app = app
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.max_body_size = max_body_size
        self.max_header_size = max_header_size
        self._connections: set[Connection] = set()
        self._listeners: list[asyncio.Server] = []
        self._starting: list[asyncio.Task[asyncio.Server]] = []
        self._stopped = False
        self._emptied: asyncio.Future[None] | None = None

    def listen(self, port: int, address: str = "") -> None:
        self.add_sockets(tornado.netutil.bind_sockets(port, address or None))

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        # Synchronous like Tornado's: the sockets already listen, so a client that connects
        # before the loop's next turn waits in the backlog.
        loop = asyncio.get_event_loop()
        for sock in sockets:
            starting = asyncio.ensure_future(loop.create_server(self._connection, sock=sock, backlog=128))
            starting.add_done_callback(self._started)
            self._starting.append(starting)

    def _started(self, starting: asyncio.Task[asyncio.Server]) -> None:
        self._starting.remove(starting)
        if starting.cancelled() or starting.exception() is not None:
            return
        listener = starting.result()
        if self._stopped:
            listener.close()
        else:
            self._listeners.append(listener)

    def _connection(self) -> Connection:
        return Connection(self)

    def stop(self) -> None:
        """Stop accepting; connections open stay until ``close_all_connections``."""
        self._stopped = True
        for listener in self._listeners:
            listener.close()
        self._listeners = []

    async def close_all_connections(self) -> None:
        """Close every connection, and return when they are all gone."""
        if not self._connections:
            return
        self._emptied = asyncio.get_running_loop().create_future()
        for conn in list(self._connections):
            conn.close()
        await self._emptied

    def forget(self, conn: Connection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)


class Connection(asyncio.Protocol, httputil.HTTPConnection):
    """One client connection; also the ``HTTPConnection`` of the request it is answering."""

    def __init__(self, server: HTTPServer):
        self.server = server
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.context: ConnectionContext | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self._events: collections.deque[tuple[int, Any]] = collections.deque()
        self._ends_queued = 0  # the queue holds the end of the request being read
        self._in_drain = False
        self._waiting: Awaitable[Any] | None = None  # a handler's future the next event waits for
        self._paused = False
        self._upgraded: bytes | None = None  # the bytes after an upgrade request's head
        self._broken = False  # unparseable bytes came after whole requests: close once they are answered
        self._detached = False
        # The request being read and answered.
        self._delegate: httputil.HTTPMessageDelegate | None = None
        self._reading = False           # its message is not fully read
        self._responding = False        # its response is not finished
        self._write_finished = False
        self._head_written = False
        self._status = 0
        self._expect_continue = False
        self._disconnect_on_finish = False
        self._request_version = "HTTP/1.1"
        self._request_method = "GET"
        self._request_keep_alive_10 = False
        self._chunking_output = False
        self._expected_remaining: int | None = None
        self._body_size = 0
        self._max_body_size = server.max_body_size
        self._body_timeout = server.body_timeout
        self._close_callback: Callable[[], None] | None = None
        # The request head being parsed.
        self._url = b""
        self._headers: httputil.HTTPHeaders | None = None
        self._header_bytes = 0
        self._in_head = False
        # Writing.
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] = self.loop.create_future()
        self._done.set_result(None)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline: float | None = None  # loop time: when the connection closes unless it moves
        self._deadline_body = False          # the deadline is the body's (logged when it passes)

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.context = ConnectionContext(transport.get_extra_info("peername"))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        self.server._connections.add(self)
        self._arm(self.server.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self.closed or self._upgraded is not None or self._broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded = data[upgrade.args[0]:]
        except httptools.HttpParserError as exc:
            if self._disconnect_on_finish and not self._reading:
                return  # bytes after a request that closes the connection: ignored
            if self._reading or not (self._responding or self._ends_queued):
                self._malformed(str(exc) or type(exc).__name__)
                return
            # Garbage pipelined behind whole requests: they are answered, then the connection closes.
            log.info("Malformed HTTP request from %s: %s", self.context, printable(str(exc), MALFORMED_CHARS))
            self._broken = True
            while self._events and self._events[-1][0] != _END:
                self._events.pop()
        if self._in_head:  # headers still incomplete: bounded, like Tornado's max_header_size
            self._header_bytes += len(data)
            if self._header_bytes > self.server.max_header_size:
                self._refuse(_HEADERS_TOO_LARGE)
                return
        self._drain()

    def eof_received(self) -> bool | None:
        return None  # closes: a client that half-closes is treated as gone, like Tornado

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        self._events.clear()
        self._ends_queued = 0
        self.server.forget(self)
        if self._detached:
            return
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(tornado.iostream.StreamClosedError())
            self._drained.exception()
        delegate, self._delegate = self._delegate, None
        if delegate is not None and self._reading:
            self._reading = False
            self._guarded(delegate.on_connection_close)
        elif self._responding and self._close_callback is not None:
            callback, self._close_callback = self._close_callback, None
            self._guarded(callback)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # --- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = Headers()
        self._in_head = True
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools (llhttp) refuses what Tornado's ``add`` checks for (a name that is not a token, a
        # control character in a value), so its two regular expressions per header are skipped.
        headers = self._headers
        assert headers is not None
        text_name, text = name.decode("latin1"), value.decode("latin1").strip()
        if text_name in headers:
            headers.add(text_name, text)  # a repeated field: its values are kept as a list
        else:
            headers[text_name] = text

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._header_bytes = 0
        parser = self.parser
        version = _VERSIONS.get(parser.get_http_version())
        start = None if version is None else httputil.RequestStartLine(
            parser.get_method().decode("latin1"), self._url.decode("latin1"), version)
        self._events.append((_HEADERS, (start, self._headers, parser.should_keep_alive())))
        self._headers = None

    def on_body(self, body: bytes) -> None:
        self._events.append((_BODY, body))

    def on_message_complete(self) -> None:
        self._events.append((_END, None))
        self._ends_queued += 1

    # --- running the events in order ------------------------------------------------

    def _drain(self) -> None:
        if self._in_drain:
            return
        self._in_drain = True
        try:
            events = self._events
            while events and not self.closed and self._waiting is None:
                kind, value = events[0]
                if kind == _HEADERS and self._responding:
                    break  # a pipelined request waits for the answer before it
                events.popleft()
                if kind == _HEADERS:
                    self._on_headers(*value)
                elif kind == _BODY:
                    self._on_body(value)
                else:
                    self._ends_queued -= 1
                    self._on_end()
        finally:
            self._in_drain = False
        if self.closed or self.transport is None:
            return
        blocked = bool(self._events) and (self._waiting is not None or self._responding)
        if blocked and len(self._events) >= _PAUSE_AT_EVENTS and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        elif self._paused and not self._events:
            self._paused = False
            self.transport.resume_reading()

    def _wait_for(self, result: Awaitable[Any] | None) -> None:
        if result is None:
            return
        future = asyncio.ensure_future(result)
        if future.done():
            self._check_result(future)
            return
        self._waiting = future
        future.add_done_callback(self._resume)

    def _resume(self, future: asyncio.Future[Any]) -> None:
        self._waiting = None
        if self.closed:
            return
        self._check_result(future)
        self._continue_if_expected()
        self._drain()

    def _continue_if_expected(self) -> None:
        """``Expect: 100-continue`` is answered once the handler has taken the headers, unless it
        has answered the request already."""
        if self._expect_continue:
            self._expect_continue = False
            if not self._write_finished and self.transport is not None and not self.closed:
                self.transport.write(_CONTINUE)

    def _check_result(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._handler_failed(exc)

    def _on_headers(self, start: httputil.RequestStartLine | None, headers: httputil.HTTPHeaders,
                    keep_alive: bool) -> None:
        if start is None:
            self._malformed("unsupported HTTP version")
            return
        self._arm(None)
        self._request_version = start.version
        self._request_method = start.method
        self._request_keep_alive_10 = start.version == "HTTP/1.0" and keep_alive
        self._disconnect_on_finish = not keep_alive
        self._reading = self._responding = True
        self._write_finished = self._head_written = False
        self._status = 0
        self._chunking_output = False
        self._expected_remaining = None
        self._close_callback = None
        self._body_size = 0
        self._max_body_size = self.server.max_body_size
        self._body_timeout = self.server.body_timeout
        length = headers.get("Content-Length")
        if length is not None:
            if not length.isdigit() or int(length) > self._max_body_size:
                self._malformed(f"bad or too long Content-Length: {length!r}")
                return
        self._delegate = self.server.app.start_request(self, self)
        try:
            result = self._delegate.headers_received(start, headers)
        except httputil.HTTPInputError as exc:
            self._malformed(str(exc))
            return
        except Exception as exc:
            self._handler_failed(exc)
            return
        if self._detached or self.closed:
            return
        if self._reading and not self._ends_queued:  # its body is still on the way
            self._arm(self._body_timeout, body=True)
        self._expect_continue = headers.get("Expect") == "100-continue"
        self._wait_for(result)
        if self._waiting is None:
            self._continue_if_expected()

    def _on_body(self, chunk: bytes) -> None:
        if self._write_finished or self._delegate is None:
            return  # answered already: the rest of the body is dropped, then the connection
        self._body_size += len(chunk)
        if self._body_size > self._max_body_size:
            self._malformed("body too large")
            return
        try:
            result = self._delegate.data_received(chunk)
        except Exception as exc:
            self._handler_failed(exc)
            return
        self._wait_for(result)

    def _on_end(self) -> None:
        self._reading = False
        self._arm(None)
        delegate = self._delegate
        if self._write_finished or delegate is None:
            return  # answered already; the connection is closing
        try:
            delegate.finish()
        except Exception as exc:
            self._handler_failed(exc)

    def _next_request(self) -> None:
        self._delegate = None
        if self._disconnect_on_finish or self._upgraded is not None or self._broken and not self._events:
            self.close()
            return
        self._arm(self.server.idle_timeout)

    # --- httputil.HTTPConnection -------------------------------------------------------

    def write_headers(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                      headers: httputil.HTTPHeaders, chunk: bytes | None = None) -> asyncio.Future[None]:
        assert isinstance(start_line, httputil.ResponseStartLine)
        code = self._status = start_line.code
        self._head_written = True
        bodiless = self._request_method == "HEAD" or code in (204, 304) or 100 <= code < 200
        self._chunking_output = (self._request_version == "HTTP/1.1" and not bodiless
                                 and "Content-Length" not in headers)
        if self._request_version == "HTTP/1.0" and not bodiless and "Content-Length" not in headers:
            self._disconnect_on_finish = True  # the close is what ends this response
        if self._reading:
            self._disconnect_on_finish = True  # answered before the body is read: it never will be
        if self._request_version == "HTTP/1.1" and self._disconnect_on_finish:
            headers["Connection"] = "close"
        if self._request_keep_alive_10 and not self._disconnect_on_finish:
            headers["Connection"] = "Keep-Alive"
        if self._chunking_output:
            headers["Transfer-Encoding"] = "chunked"
        if self._request_method == "HEAD" or code == 304:
            self._expected_remaining = 0
        elif "Content-Length" in headers:
            self._expected_remaining = int(headers["Content-Length"])
        else:
            self._expected_remaining = None
        lines = [f"HTTP/1.1 {code} {start_line.reason}"]
        lines.extend(f"{n}: {v}" for n, v in headers.get_all())
        head = "\r\n".join(lines)
        if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
            raise ValueError("Illegal characters (CR or LF) in a response header")
        data = head.encode("latin1") + b"\r\n\r\n"
        if chunk:
            data += self._format_chunk(chunk)
        return self._write(data)

    def write(self, chunk: bytes) -> asyncio.Future[None]:
        return self._write(self._format_chunk(chunk))

    def _format_chunk(self, chunk: bytes) -> bytes:
        if self._expected_remaining is not None:
            self._expected_remaining -= len(chunk)
            if self._expected_remaining < 0:
                self.close()
                raise httputil.HTTPOutputError("Tried to write more data than Content-Length")
        if self._chunking_output and chunk:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        return chunk

    def _write(self, data: bytes) -> asyncio.Future[None]:
        if self.closed or self.transport is None or self.transport.is_closing():
            failed: asyncio.Future[None] = self.loop.create_future()
            failed.set_exception(tornado.iostream.StreamClosedError())
            failed.exception()  # retrieved: a caller that does not await it logs nothing
            return failed
        if data:
            self.transport.write(data)
        if not self._write_paused:
            return self._done
        if self._drained is None:
            self._drained = self.loop.create_future()
        return self._drained

    def finish(self) -> None:
        if self._expected_remaining and not self.closed:
            remaining, self._expected_remaining = self._expected_remaining, None
            self.close()
            raise httputil.HTTPOutputError(f"Tried to write {remaining} bytes less than Content-Length")
        if self._chunking_output and not self.closed and self.transport is not None:
            self.transport.write(b"0\r\n\r\n")
        self._write_finished = True
        self._responding = False
        self._close_callback = None
        if self._reading:
            # Answered before the body was read: the rest is dropped and the connection closes.
            self._disconnect_on_finish = True
        if self.closed or self._upgraded is not None and self._status == 101:
            return  # a WebSocket handshake: detach() comes next
        if self._disconnect_on_finish:
            self.close()
            return
        self._next_request()
        if self._events:
            self.loop.call_soon(self._drain)  # a pipelined request, after this handler returns

    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        self._close_callback = callback

    def set_body_timeout(self, timeout: float) -> None:
        self._body_timeout = timeout
        if self._reading and self._deadline is not None:
            self._arm(timeout, body=True)

    def set_max_body_size(self, max_body_size: int) -> None:
        self._max_body_size = max_body_size

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def detach(self) -> tornado.iostream.IOStream:
        """Hand the socket to a Tornado ``IOStream`` (a WebSocket after its handshake)."""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        unsent = self.transport.get_write_buffer_size()
        if unsent:
            log.warning("a connection detached with %d byte(s) of its answer unsent", unsent)
        duplicate = socket.socket(fileno=os.dup(sock.fileno()))
        self._detached = True
        self._delegate = None
        self._close_callback = None
        self._responding = self._reading = False
        self._cancel_timer()
        self.transport.pause_reading()
        self.transport.abort()  # closes this fd only; the duplicate keeps the connection
        stream = tornado.iostream.IOStream(duplicate)
        early = self._upgraded or b""
        if early:
            # Bytes the client sent after its upgrade request, before the answer: the
            # stream's reads begin with them (Tornado has no public way to put them back).
            stream._read_buffer += early  # noqa: SLF001
            stream._read_buffer_size += len(early)  # noqa: SLF001
        return stream

    # --- errors and timers ----------------------------------------------------------

    def _malformed(self, why: str) -> None:
        # ``why`` may quote what the client sent (a Content-Length, a Host): escaped and cut short.
        log.info("Malformed HTTP request from %s: %s", self.context, printable(why, MALFORMED_CHARS))
        self._refuse(_BAD_REQUEST)

    def _refuse(self, answer: bytes) -> None:
        """Answer a request relay cannot read (unless an answer has begun), and close."""
        if self.transport is None or self.closed:
            return
        if not (self._responding and self._head_written):
            self.transport.write(answer)
        self.close()

    def _handler_failed(self, exc: BaseException) -> None:
        log.error("Uncaught exception in a request's delegate", exc_info=exc)
        self.close()

    def _guarded(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:
            log.error("Uncaught exception in a close callback", exc_info=exc)

    def _arm(self, timeout: float | None, body: bool = False) -> None:
        """Close the connection ``timeout`` seconds from now (None: no deadline). The connection
        keeps one timer and moves its deadline: a timer made and cancelled for every request
        cost more than the deadline it checks. The timer fires no later than the deadline and,
        when the deadline has moved on since, waits again for the new one."""
        if timeout is None or timeout <= 0:
            self._deadline = None
            return
        deadline = self.loop.time() + timeout
        self._deadline, self._deadline_body = deadline, body
        if self._timer is None or self._timer_at > deadline:
            self._start_timer(deadline)

    def _start_timer(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self.loop.call_at(at, self._on_timer), at

    def _cancel_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.closed:
            return
        if self.loop.time() < deadline:
            self._start_timer(deadline)
            return
        self._deadline = None
        if self._deadline_body:
            log.info("Timeout reading body from %s", self.context)
        self.close()
