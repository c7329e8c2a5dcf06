"""Upstream HTTP: the transport's contract (one method, as httpx's transports have), and its
implementation on aiohttp: pooled keep-alive connections, timeouts, errors mapped to ours.

aiohttp was chosen by measurement (bench/http_clients.py): on loopback it costs about half
the CPU per request of Tornado's curl client and a third of Tornado's simple client.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from relay.balancer.pool import Endpoint
from relay.config import Limits, Timeouts
from relay.errors import UpstreamConnectError, UpstreamError, UpstreamResponseTooLarge, UpstreamTimeout
from relay.proxy.request import Body, UpstreamRequest

# Error bodies are a few hundred bytes; the router and the handler read them whole.
ERROR_BODY_BYTES = 1 << 20


class UpstreamResponse(Protocol):
    """An upstream's answer whose headers have arrived; the body is read on demand."""

    endpoint: Endpoint
    status: int
    headers: Mapping[str, str]

    async def read(self, limit: int = ERROR_BODY_BYTES) -> bytes:
        """The whole body, refused (``UpstreamResponseTooLarge``) once it passes ``limit``."""

    def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive."""

    def close(self) -> None:
        """Release the connection; an unfinished body closes it, which cancels the upstream's work."""


class Transport(Protocol):
    async def send(self, endpoint: Endpoint, request: UpstreamRequest, body: Body | None,
                   timeouts: Timeouts) -> UpstreamResponse:
        """Send with the endpoint's key; raises ``UpstreamError`` (connect error, timeout, bad reply)."""

    async def close(self) -> None: ...


class AiohttpResponse:
    def __init__(self, resp: aiohttp.ClientResponse, endpoint: Endpoint) -> None:
        self._resp = resp
        self.endpoint = endpoint
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers
        self._body: bytes | None = None

    @property
    def _name(self) -> str:
        return self.endpoint.upstream.name

    async def read(self, limit: int = ERROR_BODY_BYTES) -> bytes:
        """The whole body, refused once it passes ``limit`` bytes (or announces more): nothing more is read.

        Read once; later calls return the same bytes.
        """
        if self._body is None:
            length = self._resp.content_length
            if length is not None and length > limit:
                raise self._too_large(limit)
            try:
                self._body = await self._read_up_to(limit)
            except TimeoutError:
                raise UpstreamTimeout(f"upstream {self._name} stalled while sending its reply",
                                      upstream=self._name) from None
            except aiohttp.ClientError:
                raise UpstreamError(f"upstream {self._name} broke off its reply", upstream=self._name) from None
        return self._body

    async def _read_up_to(self, limit: int) -> bytes:
        content, parts, size = self._resp.content, [], 0
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                raise self._too_large(limit)
            parts.append(chunk)
        return b"".join(parts)

    def _too_large(self, limit: int) -> UpstreamResponseTooLarge:
        self._resp.close()  # the rest is never read: the connection goes, and the upstream's work with it
        return UpstreamResponseTooLarge(f"upstream {self._name} sent a reply larger than the limit of {limit} bytes",
                                        upstream=self._name)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; each wait is bounded by the idle timeout."""
        content = self._resp.content
        while True:
            try:
                chunk = await content.readany()
            except TimeoutError:
                raise UpstreamTimeout(f"upstream {self._name} went silent mid-stream", upstream=self._name) from None
            except aiohttp.ClientError:
                raise UpstreamError(f"upstream {self._name} broke off the stream", upstream=self._name) from None
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        """Release the connection; an unfinished body closes it, which cancels the upstream work."""
        self._resp.close()


class ChunksPayload(Payload):
    """An upload sent as the chunks it arrived in, with its Content-Length: never joined (it is
    held once), written a chunk at a time as the connection drains, and re-sendable on a retry."""

    def __init__(self, chunks: tuple[bytes, ...]) -> None:
        # The Content-Type is the request's (the client's multipart boundary), set by send().
        super().__init__(chunks, content_type=None)
        self._chunks = chunks
        self._length = sum(map(len, chunks))
        self._size = self._length

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        left = self._length if content_length is None else content_length
        for chunk in self._chunks:
            if left <= 0:
                return
            await writer.write(chunk[:left] if len(chunk) > left else chunk)  # drains past aiohttp's buffer limit
            left -= len(chunk)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._chunks).decode(encoding, errors)


class AiohttpTransport:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.limits.max_upstream_connections,
                                             limit_per_host=0, ttl_dns_cache=300,
                                             enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                                  skip_auto_headers=("User-Agent",),
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def send(self, endpoint: Endpoint, request: UpstreamRequest, body: Body | None,
                   timeouts: Timeouts) -> UpstreamResponse:
        headers = {"Authorization": f"Bearer {endpoint.key}", "Accept-Encoding": "identity"}
        if body is not None:
            headers["Content-Type"] = request.content_type
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect_s, sock_read=timeouts.idle_s)
        name = endpoint.upstream.name
        try:
            return await asyncio.wait_for(
                self._request(endpoint, request.method, request.path, body, headers, timeout), timeouts.first_byte_s)
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {name} did not answer in time", upstream=name) from None
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError, OSError):
            raise UpstreamConnectError(f"could not reach upstream {name}", upstream=name) from None
        except aiohttp.ClientError:
            raise UpstreamError(f"upstream {name} sent an invalid reply", upstream=name) from None

    async def _request(self, endpoint: Endpoint, method: str, path: str, body: Body | None,
                       headers: dict[str, str], timeout: aiohttp.ClientTimeout) -> AiohttpResponse:
        data = ChunksPayload(body) if isinstance(body, tuple) else body
        resp = await self._client().request(method, endpoint.upstream.base_url + path, data=data, headers=headers,
                                            timeout=timeout, allow_redirects=False)
        return AiohttpResponse(resp, endpoint)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
