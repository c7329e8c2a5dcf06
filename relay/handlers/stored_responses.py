"""Stored responses: GET and DELETE /responses/{id}, GET /responses/{id}/input_items and
POST /responses/{id}/cancel, each sent to the upstream account that made the response, for
its owner only, and not charged."""
from __future__ import annotations

import time
from urllib.parse import quote

from tornado.iostream import StreamClosedError

from relay.errors import MethodNotAllowed, ResponseNotFound, UpstreamError
from relay.handlers.proxy import ProxyHandler
from relay.observability.access_log import Flag
from relay.owners import Owner
from relay.proxy.request import UpstreamRequest
from relay.proxy.transport import UpstreamResponse

MAX_ID_CHARS = 256


class UnbilledHandler(ProxyHandler):
    """Forwards a request that costs nothing and relays the answer (JSON, or events as they come)."""

    async def relay_unbilled(self, request: UpstreamRequest) -> int:
        """The upstream's status, once its answer has been relayed."""
        sent_at = time.perf_counter()
        self.upstream_wait = 0.0
        try:
            async with self.services.router.exchange(request) as resp:
                self._add_upstream_wait(sent_at)
                self._upstream = resp
                self.upstream_name = resp.endpoint.upstream.name
                if resp.status >= 400:
                    await self._pass_error(resp)
                elif resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                    await self._pass_stream(resp)
                else:
                    waited = time.perf_counter()
                    data = await resp.read(self.services.config.limits.max_response_bytes)
                    self._add_upstream_wait(waited)
                    self.set_status(resp.status)
                    self._copy_headers(resp)
                    await self.finish(data)
                return resp.status
        except StreamClosedError:
            self.flag = Flag.CLIENT_DISCONNECTED
            return 499
        finally:
            self._upstream = None

    async def _pass_stream(self, resp: UpstreamResponse) -> None:
        self.set_status(resp.status)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        try:
            async for chunk in resp.chunks():
                self.write(chunk)
                await self.flush()
        except UpstreamError:
            self.flag = Flag.UPSTREAM_STREAM_BROKEN
        if not self._client_gone:
            await self.finish()


class StoredResponseHandler(UnbilledHandler):
    route = "responses"

    async def get(self, response_id: str, what: str | None = None) -> None:
        if what == "cancel":
            raise MethodNotAllowed("This method is not allowed on this URL.")
        await self._about(response_id, what)

    async def delete(self, response_id: str, what: str | None = None) -> None:
        if what is not None:
            raise MethodNotAllowed("This method is not allowed on this URL.")
        if await self._about(response_id, None) == 200:
            await self.services.owners.forget(response_id)

    async def post(self, response_id: str, what: str | None = None) -> None:
        if what != "cancel":
            raise MethodNotAllowed("This method is not allowed on this URL.")
        await self._about(response_id, what)

    async def _about(self, response_id: str, what: str | None) -> int:
        owner = await self._owner(response_id)
        path = f"/responses/{quote(response_id, safe='')}" + (f"/{what}" if what else "")
        if self.request.query:
            path += "?" + self.request.query
        assert self.request.method is not None
        return await self.relay_unbilled(UpstreamRequest(self.request.method, path, pinned=owner.pinned))

    async def _owner(self, response_id: str) -> Owner:
        owner = None
        if len(response_id) <= MAX_ID_CHARS:
            owner = await self.services.owners.find(response_id, self.key.key_hash)
        if owner is None:  # unknown, or another key's: the same answer, as OpenAI gives another account
            raise ResponseNotFound(f"Response with id '{response_id}' not found.")
        return owner
