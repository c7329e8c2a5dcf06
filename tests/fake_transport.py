"""A transport without sockets: each endpoint answers from a script, for router tests."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from relay.balancer.pool import Endpoint
from relay.config import Timeouts
from relay.errors import UpstreamError
from relay.proxy.request import UpstreamRequest


@dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: Mapping[str, str] = field(default_factory=dict)


class FakeResponse:
    def __init__(self, endpoint: Endpoint, reply: Reply):
        self.endpoint, self.status, self.headers, self._body = endpoint, reply.status, reply.headers, reply.body
        self.closed = False

    async def read(self, limit: int = 1 << 20) -> bytes:
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    def close(self) -> None:
        self.closed = True


Answer = Reply | UpstreamError | Callable[[UpstreamRequest, bytes | tuple[bytes, ...] | None], "Reply | UpstreamError"]


class FakeTransport:
    """``answers[endpoint.name]`` (e.g. ``"primary/k0"``) says how that endpoint answers:
    a Reply, an UpstreamError to raise, or a function of the request; default 200."""

    def __init__(self, answers: dict[str, Answer] | None = None):
        self.answers = answers or {}
        self.sent: list[tuple[str, bytes | tuple[bytes, ...] | None]] = []
        self.responses: list[FakeResponse] = []

    async def send(self, endpoint: Endpoint, request: UpstreamRequest, body: bytes | tuple[bytes, ...] | None,
                   timeouts: Timeouts) -> FakeResponse:
        self.sent.append((endpoint.name, body))
        answer = self.answers.get(endpoint.name, Reply())
        if callable(answer) and not isinstance(answer, (Reply, UpstreamError)):
            answer = answer(request, body)
        if isinstance(answer, UpstreamError):
            raise answer
        resp = FakeResponse(endpoint, answer)
        self.responses.append(resp)
        return resp

    async def close(self) -> None:
        pass

    @property
    def tried(self) -> list[str]:
        return [name for name, _ in self.sent]
