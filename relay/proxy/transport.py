"""Upstream HTTP: the transport's contract (one method, as httpx's transports have).

relay/proxy/http1.py implements it (tests/fake_transport.py too, without sockets). It was
aiohttp's client first, chosen by measurement over Tornado's curl and simple clients
(bench/http_clients.py); the lean client replaced it, measured in docs/benchmarks.md.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from relay.balancer.pool import Endpoint
from relay.config import Timeouts
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
