"""Upstream HTTP: pooled keep-alive connections (aiohttp), timeouts, errors mapped to ours.

aiohttp was chosen by measurement (bench/http_clients.py): on loopback it costs about half
the CPU per request of Tornado's curl client and a third of Tornado's simple client, which
opens a new connection for every request and allows at most 10 at once.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import aiohttp

from relay.balancer.pool import Endpoint
from relay.config import Limits, Timeouts
from relay.errors import UpstreamConnectError, UpstreamError, UpstreamResponseTooLarge, UpstreamTimeout

# Error bodies are a few hundred bytes; the router and the handler read them whole.
ERROR_BODY_BYTES = 1 << 20


class UpstreamResponse:
    """An upstream's answer whose headers have arrived; the body is read on demand."""

    def __init__(self, resp: aiohttp.ClientResponse, endpoint: Endpoint):
        self._resp = resp
        self.endpoint = endpoint
        self.status = resp.status
        self.headers = resp.headers
        self.finished = False  # set once the router has taken it back
        self._body: bytes | None = None

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
            except asyncio.TimeoutError:
                raise UpstreamTimeout(f"upstream {self.endpoint.upstream.name} stalled while sending its reply") from None
            except aiohttp.ClientError:
                raise UpstreamError(f"upstream {self.endpoint.upstream.name} broke off its reply") from None
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
        err = UpstreamResponseTooLarge(f"upstream {self.endpoint.upstream.name} sent a reply larger than "
                                       f"the limit of {limit} bytes")
        err.upstream = self.endpoint.upstream.name
        return err

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; each wait is bounded by the idle timeout."""
        content = self._resp.content
        while True:
            try:
                chunk = await content.readany()
            except asyncio.TimeoutError:
                raise UpstreamTimeout(f"upstream {self.endpoint.upstream.name} went silent mid-stream") from None
            except aiohttp.ClientError:
                raise UpstreamError(f"upstream {self.endpoint.upstream.name} broke off the stream") from None
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        """Release the connection; an unfinished body closes it, which cancels the upstream work."""
        self._resp.close()


class Transport:
    def __init__(self, limits: Limits, timeouts: Timeouts):
        self.limits = limits
        self.timeouts = timeouts
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

    async def send(self, endpoint: Endpoint, method: str, path: str, body: bytes | None,
                   timeouts: Timeouts | None = None) -> UpstreamResponse:
        t = timeouts or self.timeouts
        headers = {"Authorization": f"Bearer {endpoint.key}", "Accept-Encoding": "identity"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=t.idle_s)
        name = endpoint.upstream.name
        try:
            return UpstreamResponse(await self._request(endpoint, method, path, body, headers, timeout,
                                                        t.first_byte_s), endpoint)
        except UpstreamError as err:
            err.upstream = name
            raise

    async def _request(self, endpoint, method, path, body, headers, timeout, first_byte_s) -> aiohttp.ClientResponse:
        name = endpoint.upstream.name
        try:
            return await asyncio.wait_for(
                self._client().request(method, endpoint.upstream.base_url + path, data=body,
                                       headers=headers, timeout=timeout, allow_redirects=False),
                first_byte_s)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"upstream {name} did not answer in time") from None
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError, OSError):
            raise UpstreamConnectError(f"could not reach upstream {name}") from None
        except aiohttp.ClientError:
            raise UpstreamError(f"upstream {name} sent an invalid reply") from None

    async def probe(self, endpoint: Endpoint, timeout_s: float) -> tuple[int, bytes, str | None]:
        """``GET {base_url}/models`` with the endpoint's key: costs no tokens.

        Returns (status, body, Retry-After); raises UpstreamError subclasses like ``send``.
        """
        t = Timeouts(connect_s=timeout_s, first_byte_s=timeout_s, idle_s=timeout_s)
        resp = await self.send(endpoint, "GET", "/models", None, t)
        try:
            return resp.status, await resp.read(self.limits.max_response_bytes), resp.headers.get("Retry-After")
        finally:
            resp.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
