"""WebSockets to upstreams (the Responses API's WebSocket mode), on aiohttp: one endpoint per
client socket, chosen by the router (or pinned), with failover while the handshake fails.

aiohttp is imported when the first socket opens: a process that never serves one does not
carry it (10 MB of RSS)."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from relay.balancer.outcome import RETRYABLE_OUTCOMES, Outcome, classify_status
from relay.balancer.pool import Endpoint
from relay.config import Timeouts
from relay.errors import (
    NoEndpoint,
    RelayError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from relay.proxy.router import Router

if TYPE_CHECKING:
    import aiohttp

UpstreamSocket: TypeAlias = "aiohttp.ClientWebSocketResponse[Literal[False]]"  # text frames as bytes, never decoded
DATA_FRAMES = frozenset({1, 2})  # aiohttp.WSMsgType.TEXT and BINARY (an IntEnum of RFC 6455's opcodes)


def ws_url(base_url: str, path: str) -> str:
    """http(s)://host/v1 + /responses -> ws(s)://host/v1/responses."""
    scheme, sep, rest = base_url.partition("://")
    return {"http": "ws", "https": "wss"}.get(scheme, scheme) + sep + rest + path


class UpstreamSockets:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                                  skip_auto_headers=("User-Agent",),
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def open(self, router: Router, model: str, pinned: tuple[str, str] | None,
                   timeouts: Timeouts) -> tuple[Endpoint, UpstreamSocket]:
        """A socket to the pinned endpoint, or to the one the router picks (another while the
        handshake fails for the upstream's reasons, within ``retries.max_attempts``)."""
        if pinned is not None:
            endpoint = router.pinned_endpoint(pinned, model)
            return endpoint, await self._attempt(router, endpoint, timeouts, 0)
        tried: set[Endpoint] = set()
        last: RelayError | None = None
        for attempt in range(router.pool.config.retries.max_attempts):
            try:
                endpoint = router.choose(model, tried, api="responses")
            except NoEndpoint:
                if last is None:
                    raise
                break
            tried.add(endpoint)
            try:
                return endpoint, await self._attempt(router, endpoint, timeouts, attempt)
            except UpstreamError as err:
                last = err
                if err.outcome not in RETRYABLE_OUTCOMES:
                    break
        assert last is not None
        raise last

    async def _attempt(self, router: Router, endpoint: Endpoint, timeouts: Timeouts, attempt: int) -> UpstreamSocket:
        import aiohttp
        name = endpoint.upstream.name
        started = router.clock()
        try:
            ws = await asyncio.wait_for(self._client().ws_connect(
                ws_url(endpoint.upstream.base_url, "/responses"), headers={"Authorization": f"Bearer {endpoint.key}"},
                max_msg_size=router.pool.config.limits.max_event_bytes, decode_text=False), timeouts.connect_s)
        except aiohttp.WSServerHandshakeError as exc:
            outcome = classify_status(exc.status, None) if exc.status >= 400 else Outcome.SERVER_ERROR
            router.report(endpoint, outcome, attempt, router.clock() - started)
            cls: Any = UpstreamRateLimited if outcome == Outcome.RATE_LIMITED else UpstreamError
            raise cls(f"upstream {name} refused the WebSocket ({exc.status})", upstream=name, outcome=outcome) from None
        except TimeoutError:
            router.report(endpoint, Outcome.TIMEOUT, attempt, None)
            raise UpstreamTimeout(f"upstream {name} did not answer in time", upstream=name) from None
        except (aiohttp.ClientError, OSError):
            router.report(endpoint, Outcome.CONNECT_ERROR, attempt, None)
            raise UpstreamConnectError(f"could not reach upstream {name}", upstream=name) from None
        router.report(endpoint, Outcome.OK, attempt, router.clock() - started)
        return ws

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
