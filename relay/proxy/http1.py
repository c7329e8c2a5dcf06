"""Upstream HTTP/1.1 on asyncio protocols and httptools' parser: pooled keep-alive connections,
timeouts, errors mapped to relay's.

The transport relay forwards with (relay/proxy/transport.py has the contract). It replaced
aiohttp's client, measured (bench/http_clients.py, docs/benchmarks.md): the client's CPU per
request on this machine's loopback at concurrency 1 and 32 was 0.48 and 0.26 ms for aiohttp's
pooled session on asyncio (timers, a task per request body, header multidicts, tracing hooks),
0.21 and 0.12 ms for this one on asyncio, 0.11 and 0.06 ms on uvloop. It does what relay needs
and no more: a request's head is written once per (endpoint, method, path) and reused, the body
goes in the same write (an upload's chunks one by one, as the connection drains), and the reply
is parsed in C as it arrives.

Timeouts, as documented in upstreams.yaml: ``connect_s`` to open a connection,
``first_byte_s`` from sending to the response headers, ``idle_s`` of silence while the body is
read (a JSON reply or a stream's chunks). Connections to all upstreams together are capped at
``limits.max_upstream_connections``; an idle one is kept ``KEEPALIVE_S`` and never reused after
its upstream closed it.
"""
from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httptools

from relay.balancer.pool import Endpoint
from relay.config import Limits, Timeouts
from relay.errors import UpstreamConnectError, UpstreamError, UpstreamResponseTooLarge, UpstreamTimeout
from relay.proxy.request import Body, UpstreamRequest
from relay.proxy.transport import ERROR_BODY_BYTES

KEEPALIVE_S = 15.0          # an idle pooled connection is closed after this long (aiohttp's default too)
READ_HIGH_WATER = 1 << 16   # bytes received and not yet read that pause reading from the upstream
# The kernel's receive buffer per upstream connection. Left to autotuning it grew to 32 MiB here
# (tcp_rmem's max), so a client reading slowly let an upstream push a whole 10 MB stream into
# relay's host; 1 MiB still carries ~10 MB/s at a 100 ms round trip.
UPSTREAM_RCVBUF = 1 << 20
DNS_TTL_S = 300.0
_SAFE_PATH = "/:@!$&'()*+,;=-._~%?"  # what a path and query keep as they are; CR, LF and spaces are escaped


class Headers(Mapping[str, str]):
    """Response headers by case-insensitive name (the first of repeated ones)."""

    __slots__ = ("_d",)

    def __init__(self, d: dict[str, str]) -> None:
        self._d = d  # lower-cased names

    def __getitem__(self, name: str) -> str:
        return self._d[name.lower()]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._d.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._d

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


class _Expired(Exception):
    """A wait outlived its timeout (mapped to the caller's own error)."""


class _Conn(asyncio.Protocol):
    """One connection: a request written, its reply parsed as bytes arrive."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.counted = False  # counted among the transport's open connections
        self.idle_since = 0.0
        self._reset()
        self._drain: asyncio.Future[None] | None = None
        self._paused_writing = False

    def _reset(self) -> None:
        self.status = 0
        self.raw_headers: dict[str, str] = {}
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.framed = False  # Content-Length or chunked: the end of the body is known without a close
        self.parts: list[bytes] = []
        self.size = 0
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused_reading = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UPSTREAM_RCVBUF)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"upstream {self.pool.name} sent an invalid reply ({type(exc).__name__})",
                                     upstream=self.pool.name))
            self.abort()
            return
        if self.size > READ_HIGH_WATER and not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.pool.lost(self)
        if self.head_done and not self.complete and not self.framed and self.error is None:
            self.complete = True  # a body delimited by the connection's end
        elif not self.complete and self.error is None:
            self.error = _BrokenOff()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionError("connection lost"))
        self._wake()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key not in self.raw_headers:
            self.raw_headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        h = self.raw_headers
        self.framed = "content-length" in h or "chunked" in h.get("transfer-encoding", "").lower()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)
        self.size += len(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # -- the caller's side

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until more of the reply (or its end, or an error) arrives; ``_Expired`` after ``timeout``."""
        loop = asyncio.get_running_loop()
        w = self.waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, w)
        try:
            await w
        finally:
            timer.cancel()
            self.waiter = None

    def take(self) -> bytes:
        """What arrived of the body and was not read yet."""
        parts, self.parts, self.size = self.parts, [], 0
        if self.paused_reading and self.transport is not None and not self.closed:
            self.paused_reading = False
            self.transport.resume_reading()
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    async def write_body(self, chunks: tuple[bytes, ...]) -> None:
        """An upload, a chunk at a time as the connection drains (it is held once, in its chunks)."""
        assert self.transport is not None
        for chunk in chunks:
            if self.closed:
                raise ConnectionError("connection lost")
            self.transport.write(chunk)
            if self._paused_writing:
                self._drain = asyncio.get_running_loop().create_future()
                try:
                    await self._drain
                finally:
                    self._drain = None

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None and not self.parts

    def clean(self) -> bool:
        """Idle as it was left: nothing arrived since (an upstream may answer an idle connection
        with a 408 before it closes it)."""
        return not self.closed and not self.head_done and self.error is None and not self.parts

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class _BrokenOff(ConnectionError):
    """The connection ended before the reply did."""


def _expire(w: asyncio.Future[None]) -> None:
    if not w.done():
        w.set_exception(_Expired())


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int
    prefix: str      # the base URL's path, e.g. /v1
    host_header: str

    @property
    def key(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


def _origin(base_url: str) -> _Origin:
    u = urlsplit(base_url)
    scheme = (u.scheme or "http").lower()
    port = u.port or (443 if scheme == "https" else 80)
    host = u.hostname or ""
    default = (scheme, port) in (("http", 80), ("https", 443))
    shown = f"[{host}]" if ":" in host else host
    return _Origin(scheme, host, port, u.path.rstrip("/"), shown if default else f"{shown}:{port}")


class _Pool:
    """Idle connections to one origin (scheme, host, port)."""

    def __init__(self, owner: Http1Transport, origin: _Origin, name: str) -> None:
        self.owner, self.origin, self.name = owner, origin, name
        self.idle: deque[_Conn] = deque()

    def lost(self, conn: _Conn) -> None:
        self.owner.lost(self, conn)


class Http1Response:
    """An upstream's answer whose headers have arrived; the body is read on demand."""

    def __init__(self, transport: Http1Transport, pool: _Pool, conn: _Conn, endpoint: Endpoint,
                 idle_s: float) -> None:
        self._transport, self._pool, self._conn = transport, pool, conn
        self.endpoint = endpoint
        self.status = conn.status
        self.headers: Mapping[str, str] = Headers(conn.raw_headers)
        self._idle_s = idle_s
        self._body: bytes | None = None
        self._released = False

    @property
    def _name(self) -> str:
        return self.endpoint.upstream.name

    async def read(self, limit: int = ERROR_BODY_BYTES) -> bytes:
        """The whole body, refused once it passes ``limit`` bytes (or announces more): nothing more is read.

        Read once; later calls return the same bytes."""
        if self._body is not None:
            return self._body
        length = self.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise self._too_large(limit)
        parts: list[bytes] = []
        size = 0
        while (chunk := await self._arrived("broke off its reply", "stalled while sending its reply")) is not None:
            size += len(chunk)
            if size > limit:
                raise self._too_large(limit)
            parts.append(chunk)
        self._body = parts[0] if len(parts) == 1 else b"".join(parts)
        self.close()  # complete: the connection goes back to the pool
        return self._body

    def _too_large(self, limit: int) -> UpstreamResponseTooLarge:
        self.close()  # the rest is never read: the connection goes, and the upstream's work with it
        return UpstreamResponseTooLarge(f"upstream {self._name} sent a reply larger than the limit of {limit} bytes",
                                        upstream=self._name)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (all that arrived since the last); each wait is bounded by the idle timeout."""
        while (chunk := await self._arrived("broke off the stream", "went silent mid-stream")) is not None:
            yield chunk
        self.close()

    async def _arrived(self, broke_off: str, stalled: str) -> bytes | None:
        """All body bytes that arrived since the last call, waiting for some (each wait bounded by
        the idle timeout); None once the body is complete. The two phrases name the failures."""
        conn = self._conn
        while not conn.parts:
            if conn.complete:
                return None
            if conn.error is not None:
                raise UpstreamError(f"upstream {self._name} {broke_off}", upstream=self._name)
            try:
                await conn.wait(self._idle_s)
            except _Expired:
                raise UpstreamTimeout(f"upstream {self._name} {stalled}", upstream=self._name) from None
        return conn.take()

    def close(self) -> None:
        """Release the connection: back to the pool when the reply was read whole, else closed
        (which cancels the upstream's work)."""
        if not self._released:
            self._released = True
            self._transport.release(self._pool, self._conn)


class Http1Transport:
    """The ``Transport`` relay forwards with (see the module's docstring)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._pools: dict[str, _Pool] = {}            # by base URL
        self._heads: dict[tuple[str, str, str, str], bytes] = {}  # (base URL, key, method, path) -> head
        self._open = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._ssl: ssl.SSLContext | None = None
        self._dns: dict[tuple[str, int], tuple[float, list[tuple[int, str, int]]]] = {}
        self._closed = False

    def _pool(self, endpoint: Endpoint) -> _Pool:
        base = endpoint.upstream.base_url
        pool = self._pools.get(base)
        if pool is None:
            origin = _origin(base)
            same = next((p for p in self._pools.values() if p.origin.key == origin.key), None)
            pool = _Pool(self, origin, endpoint.upstream.name)
            if same is not None:
                pool.idle = same.idle  # one origin, one set of connections, whatever the base URL's path
            self._pools[base] = pool
        return pool

    def _head(self, endpoint: Endpoint, pool: _Pool, method: str, path: str) -> bytes:
        key = (endpoint.upstream.base_url, endpoint.key, method, path)
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) > 4096:
                self._heads.clear()
            target = quote(pool.origin.prefix + path, safe=_SAFE_PATH) or "/"
            head = self._heads[key] = (
                f"{method} {target} HTTP/1.1\r\nHost: {pool.origin.host_header}\r\n"
                f"Authorization: Bearer {endpoint.key}\r\nAccept-Encoding: identity\r\n").encode("latin-1")
        return head

    async def send(self, endpoint: Endpoint, request: UpstreamRequest, body: Body | None,
                   timeouts: Timeouts) -> Http1Response:
        """Send with the endpoint's key; raises ``UpstreamError`` (connect error, timeout, bad reply)."""
        pool = self._pool(endpoint)
        name = endpoint.upstream.name
        started = time.monotonic()
        try:
            conn = await self._acquire(pool, timeouts)
        except _Expired:
            raise UpstreamTimeout(f"upstream {name} did not answer in time", upstream=name) from None
        except (OSError, ssl.SSLError, UnicodeError):
            raise UpstreamConnectError(f"could not reach upstream {name}", upstream=name) from None
        try:
            head = self._head(endpoint, pool, request.method, request.path)
            assert conn.transport is not None
            if body is None:
                conn.transport.write(head + b"\r\n")
            elif isinstance(body, bytes):
                conn.transport.write(b"%sContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
                    head, request.content_type.encode("latin-1"), len(body), body))
            else:
                conn.transport.write(b"%sContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
                    head, request.content_type.encode("latin-1"), sum(map(len, body))))
                await conn.write_body(body)
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                left = timeouts.first_byte_s - (time.monotonic() - started)
                if left <= 0:
                    raise _Expired()
                await conn.wait(left)
        except _Expired:
            self.release(pool, conn)
            raise UpstreamTimeout(f"upstream {name} did not answer in time", upstream=name) from None
        except UpstreamError:
            self.release(pool, conn)
            raise
        except (OSError, ssl.SSLError):
            self.release(pool, conn)
            raise UpstreamConnectError(f"could not reach upstream {name}", upstream=name) from None
        except BaseException:
            self.release(pool, conn)  # cancelled (the client left): the connection goes
            raise
        return Http1Response(self, pool, conn, endpoint, timeouts.idle_s)

    def _idle(self, pool: _Pool) -> _Conn | None:
        """The most recently used idle connection of ``pool`` that can be used (others are closed)."""
        now = time.monotonic()
        idle = pool.idle
        while idle:
            conn = idle.pop()
            if conn.clean() and now - conn.idle_since < KEEPALIVE_S:
                return conn
            self._discard(conn)
        return None

    async def _acquire(self, pool: _Pool, timeouts: Timeouts) -> _Conn:
        while True:
            conn = self._idle(pool)
            if conn is not None:
                return conn
            if self._open < self.limits.max_upstream_connections:
                break
            if self._close_oldest_idle():  # another origin's: this one has none
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
        self._open += 1
        try:
            conn = await asyncio.wait_for(self._connect(pool), timeouts.connect_s)
        except TimeoutError:
            self._count_out_one()
            raise _Expired() from None
        except BaseException:
            self._count_out_one()
            raise
        conn.counted = True
        return conn

    async def _connect(self, pool: _Pool) -> _Conn:
        loop = asyncio.get_running_loop()
        o = pool.origin
        context = None
        if o.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        last: OSError | None = None
        for family, host, port in await self._resolve(o.host, o.port):
            try:
                _, conn = await loop.create_connection(
                    lambda: _Conn(pool), host, port, family=family, ssl=context,
                    server_hostname=o.host if context else None)
                return conn
            except OSError as exc:
                last = exc
        raise last or OSError(f"no address for {o.host}")

    async def _resolve(self, host: str, port: int) -> list[tuple[int, str, int]]:
        """Addresses of ``host``, kept ``DNS_TTL_S``."""
        now = time.monotonic()
        hit = self._dns.get((host, port))
        if hit is not None and hit[0] > now:
            return hit[1]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addrs: list[tuple[int, str, int]] = list(dict.fromkeys((int(fam), str(addr[0]), int(addr[1]))
                                                              for fam, _, _, _, addr in infos))
        if len(self._dns) > 1024:
            self._dns.clear()
        self._dns[(host, port)] = (now + DNS_TTL_S, addrs)
        return addrs

    def release(self, pool: _Pool, conn: _Conn) -> None:
        """A reply is done with: its connection back to the pool if it can carry another, else closed."""
        if conn.reusable() and not self._closed:
            conn._reset()  # the parser goes on to the next reply on this connection
            conn.idle_since = time.monotonic()
            pool.idle.append(conn)
            self._wake_one()
        else:
            self._discard(conn)

    def _discard(self, conn: _Conn) -> None:
        conn.abort()
        conn.closed = True
        self._count_out(conn)

    def lost(self, pool: _Pool, conn: _Conn) -> None:
        """The upstream (or relay) closed ``conn``."""
        if conn in pool.idle:
            pool.idle.remove(conn)
        self._count_out(conn)

    def _count_out(self, conn: _Conn) -> None:
        if conn.counted:
            conn.counted = False
            self._count_out_one()

    def _count_out_one(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_oldest_idle(self) -> bool:
        oldest: tuple[float, _Pool, _Conn] | None = None
        for pool in self._pools.values():
            if pool.idle and (oldest is None or pool.idle[0].idle_since < oldest[0]):
                oldest = (pool.idle[0].idle_since, pool, pool.idle[0])
        if oldest is None:
            return False
        oldest[1].idle.popleft()
        self._discard(oldest[2])
        return True

    async def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            while pool.idle:
                self._discard(pool.idle.popleft())
