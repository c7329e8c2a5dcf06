"""GET /responses upgraded to a WebSocket: the Responses API's WebSocket mode.

The relay key authorizes the upgrade. Each ``response.create`` frame is a turn, taken in order:
reserved, sent to the socket's one upstream endpoint (chosen at the first turn, or the one
holding a previous response), its events relayed as they come, then settled or refunded, with
its own request id, ledger entry, metrics and access line. A bad frame gets an error event."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import tornado.web
import tornado.websocket
from tornado import httputil

from relay.balancer.pool import Endpoint
from relay.errors import InvalidRequest, PreviousResponseNotFound, RelayError
from relay.handlers.base import AuthenticatedHandler
from relay.handlers.proxy import count_ready, count_rest, resolve_model
from relay.handlers.responses import previous_owner, validate_responses
from relay.metering.encodings import encoding_for
from relay.metering.quote import Quote, price_served, quote_responses
from relay.observability import recorder
from relay.observability.access_log import Flag, flag_for
from relay.observability.metrics import IN_FLIGHT
from relay.proxy.responses_sse import ResponsesStreamMeter
from relay.proxy.sockets import DATA_FRAMES, UpstreamSocket
from relay.quota import Charge, Delivery
from relay.request_ids import new_request_id

log = logging.getLogger("relay.app")

MAX_QUEUED_FRAMES = 16  # response.create frames waiting for the turn before them


@dataclass(frozen=True)
class _TurnRequest:
    path: str
    remote_ip: str | None
    method: str = "WS"


class SocketTurn:
    """One turn, as the access line and the request metrics see a request."""

    route = "responses"

    def __init__(self, socket: ResponsesSocketHandler) -> None:
        self.services = socket.services
        self.request = _TurnRequest(socket.request.path, socket.request.remote_ip)
        self.request_id = new_request_id()
        self.client_ip = socket.client_ip
        self.key_prefix = socket.key_prefix
        self.model = "-"
        self.upstream_name = "-"
        self.flag: str = Flag.NONE
        self.status = 200
        self.started = time.perf_counter()
        self.upstream_wait: float | None = 0.0
        self.ttfb_ms = 0.0
        self.used_tokens = 0  # prompt and completion, for the key's tpm

    def get_status(self) -> int:
        return self.status


class ResponsesSocketHandler(AuthenticatedHandler, tornado.websocket.WebSocketHandler):
    route = "responses"

    def __init__(self, application: tornado.web.Application, request: httputil.HTTPServerRequest,
                 **kwargs: Any) -> None:
        # The WebSocket's own constructor (Tornado's whole one under it), not RelayHandler's lean one.
        tornado.websocket.WebSocketHandler.__init__(self, application, request, **kwargs)

    async def prepare(self) -> None:
        await super().prepare()  # a bad key is a 401 before the upgrade
        self._authorization = self.request.headers.get("Authorization")
        self._frames: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._endpoint: Endpoint | None = None
        self._ws: UpstreamSocket | None = None
        self._local: dict[str, int] = {}  # responses made on this socket -> the tokens they bring in
        self._closing: set[asyncio.Task[Any]] = set()

    @property
    def max_message_size(self) -> int:
        return self.services.config.limits.max_body_bytes

    def open(self, *args: str, **kwargs: str) -> None:
        self._worker = asyncio.ensure_future(self._serve())

    def on_message(self, message: str | bytes) -> None:
        if self._frames.qsize() >= MAX_QUEUED_FRAMES:
            self._send_error(InvalidRequest(f"More than {MAX_QUEUED_FRAMES} frames wait for the response in "
                                            f"progress; this one was dropped.", code="too_many_queued_frames"))
            return
        self._frames.put_nowait(message)

    def on_close(self) -> None:
        self._frames.put_nowait(None)
        self._close_upstream()  # cancels the upstream's work on a turn in progress

    def _close_upstream(self) -> None:
        if self._ws is not None and not self._ws.closed:
            task = asyncio.ensure_future(self._ws.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _serve(self) -> None:
        try:
            while (frame := await self._frames.get()) is not None:
                await self._turn(frame)
        finally:
            if self._ws is not None:
                await self._ws.close()

    async def _turn(self, frame: str | bytes) -> None:
        turn = SocketTurn(self)
        IN_FLIGHT.inc()
        self.services.active += 1  # a graceful drain waits for turns in progress
        try:
            await self._run(turn, frame)
        except RelayError as err:
            turn.status = err.status
            if turn.flag == Flag.NONE:
                turn.flag = flag_for(err)
            if turn.upstream_name == "-":
                turn.upstream_name = getattr(err, "upstream", "-")
            self._send_error(err)
        except Exception:
            log.exception("unhandled error in a WebSocket turn [%s]", turn.request_id)
            turn.status = 500
            self._send_error(RelayError("The server had an error while processing your request."))
        finally:
            IN_FLIGHT.dec()
            self.services.active -= 1
            recorder.on_request_end(turn)

    async def _run(self, turn: SocketTurn, frame: str | bytes) -> None:
        body = _create_body(frame)
        services = self.services
        key = await services.auth.authenticate(self._authorization)  # a key disabled since stops here
        turn.model, served = resolve_model(services.router.pool, body, "responses", key.policy)
        validate_responses(body, socket=True)
        history, pinned = await self._previous(body, key.key_hash)
        quote = quote_responses(services.config, served, body, history)
        if key.policy is None or not key.policy.limited:
            await self._charged(turn, body, key.key_hash, served, pinned, quote)
            return
        ticket = await services.limits.admit(key, quote.prompt_tokens + quote.allowance)  # the key's rate limits
        try:
            await self._charged(turn, body, key.key_hash, served, pinned, quote)
        finally:
            services.limits.finish(ticket, turn.used_tokens)

    async def _charged(self, turn: SocketTurn, body: dict[str, Any], key_hash: str, served: str,
                       pinned: tuple[str, str] | None, quote: Quote) -> None:
        services = self.services
        charge = await services.quota.reserve(key_hash, turn.request_id, quote, True)
        meter = ResponsesStreamMeter()
        meter.count_with(encoding_for(quote.model, services.config.quota.encodings))
        endpoint: Endpoint | None = None
        try:
            endpoint, ws = await self._upstream(served, pinned)
            turn.upstream_name = endpoint.upstream.name
            endpoint.health.in_flight += 1
            try:
                upstream_body = {**body, "type": "response.create", "model": endpoint.upstream_model(served)}
                if not quote.limited and services.config.quota.forward_max_tokens:
                    upstream_body["max_output_tokens"] = quote.allowance
                await ws.send_str(json.dumps(upstream_body, separators=(",", ":")))
                await self._relay(turn, ws, endpoint, meter, key_hash, body.get("store") is not False, quote)
            finally:
                endpoint.health.in_flight -= 1
        finally:
            await self._end(turn, charge, meter, quote, endpoint)

    async def _previous(self, body: dict[str, Any], key_hash: str) -> tuple[int, tuple[str, str] | None]:
        """The tokens a previous_response_id brings in, and the endpoint it needs (None: this socket's)."""
        previous = body.get("previous_response_id")
        if isinstance(previous, str) and previous in self._local:
            return self._local[previous], None  # made on this socket, stored or not
        owner = await previous_owner(self.services, body, key_hash)
        if owner is None:
            return 0, None
        here = self._endpoint
        if here is not None and owner.pinned != (here.upstream.name, here.fingerprint):
            raise PreviousResponseNotFound(f"Previous response with id '{previous}' was made through another "
                                           f"upstream account than this socket's; continue it over HTTP or on a "
                                           f"new socket.", param="previous_response_id")
        return owner.history, owner.pinned

    async def _upstream(self, served: str, pinned: tuple[str, str] | None) -> tuple[Endpoint, UpstreamSocket]:
        """The socket's one endpoint: connected at the first turn, again if the upstream closed between turns."""
        here = self._endpoint
        if here is not None:
            if not here.upstream.serves(served):
                raise InvalidRequest(f"This socket's upstream does not serve the model '{served}'; open another "
                                     f"socket for it.", param="model")
            pinned = (here.upstream.name, here.fingerprint)
            if self._ws is not None and not self._ws.closed:
                return here, self._ws
        services = self.services
        endpoint, ws = await services.sockets.open(services.router, served, pinned, services.config.timeouts)
        self._endpoint, self._ws = endpoint, ws
        return endpoint, ws

    async def _relay(self, turn: SocketTurn, ws: UpstreamSocket, endpoint: Endpoint, meter: ResponsesStreamMeter,
                     key_hash: str, store: bool, quote: Quote) -> None:
        """Upstream events to the client as they come, until the response ends."""
        timeouts = self.services.config.timeouts
        while not meter.done:
            waited = time.perf_counter()
            try:
                msg = await ws.receive(timeout=timeouts.idle_s if meter.events else timeouts.first_byte_s)
            except TimeoutError:
                turn.flag = Flag.UPSTREAM_TIMEOUT
                self._close_upstream()
                self._send_event({"type": "error", "status": 504, "error": {
                    "type": "upstream_error", "code": "upstream_timeout", "param": None,
                    "message": f"upstream {endpoint.upstream.name} went silent mid-response"}})
                return
            finally:
                turn.upstream_wait = (turn.upstream_wait or 0.0) + time.perf_counter() - waited
            if msg.type not in DATA_FRAMES:
                self._upstream_gone(turn, meter)
                return
            data: bytes = msg.data
            if not meter.observe(data):
                continue  # garbage would break the client's JSON parser
            if meter.response_id and meter.done:
                self._remember(meter, endpoint, key_hash, store, quote)
            if meter.text.ready:
                await count_ready(meter.text)
            try:
                await self.write_message(data)
            except tornado.websocket.WebSocketClosedError:
                turn.flag = Flag.CLIENT_DISCONNECTED
                self._close_upstream()
                return
            if not turn.ttfb_ms:
                turn.ttfb_ms = (time.perf_counter() - turn.started) * 1000

    def _upstream_gone(self, turn: SocketTurn, meter: ResponsesStreamMeter) -> None:
        if self.ws_connection is None or self.ws_connection.is_closing():
            turn.flag = Flag.CLIENT_DISCONNECTED  # we closed it, for the client
            return
        turn.flag = Flag.UPSTREAM_STREAM_TRUNCATED if meter.started else Flag.UPSTREAM_STREAM_BROKEN
        self.close(1011, "the upstream closed the connection")

    def _remember(self, meter: ResponsesStreamMeter, endpoint: Endpoint, key_hash: str, store: bool,
                        quote: Quote) -> None:
        assert meter.response_id is not None
        usage = meter.usage
        history = usage.prompt_tokens + usage.completion_tokens if usage else quote.prompt_tokens + quote.allowance
        self._local[meter.response_id] = history
        if store:
            self.services.owners.record(meter.response_id, key_hash, endpoint.upstream.name, endpoint.fingerprint,
                                        history)

    async def _end(self, turn: SocketTurn, charge: Charge, meter: ResponsesStreamMeter, quote: Quote,
                   endpoint: Endpoint | None) -> None:
        """Exactly one of settle or refund: refunded when the response never began."""
        quota = self.services.quota
        if endpoint is None or not meter.started:
            await quota.refund(charge)
            return
        usage = meter.usage or replace(quote.prompt, completion_tokens=await count_rest(meter.text))
        turn.used_tokens = usage.prompt_tokens + usage.completion_tokens  # for the key's tpm
        model = endpoint.upstream_model(quote.model)
        await quota.settle(charge, Delivery(
            usage=usage, status=turn.status, upstream=endpoint.upstream.name, model=model,
            price=price_served(self.services.config, quote, model),
            latency_ms=(time.perf_counter() - turn.started) * 1000, ttfb_ms=turn.ttfb_ms,
            requested_model=turn.model, api="responses"))

    def _send_error(self, err: RelayError) -> None:
        self._send_event({"type": "error", "status": err.status, **err.body()})

    def _send_event(self, event: dict[str, Any]) -> None:
        try:
            self.write_message(json.dumps(event, separators=(",", ":")))
        except tornado.websocket.WebSocketClosedError:
            pass


def _create_body(frame: str | bytes) -> dict[str, Any]:
    """A ``response.create`` frame's body (the frame without its type)."""
    try:
        obj = json.loads(frame)
    except ValueError:
        raise InvalidRequest("The frame is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("A frame must be a JSON object.")
    kind = obj.get("type")
    if kind != "response.create":
        raise InvalidRequest(f"Unsupported event type {str(kind)[:64]!r}: this relay takes response.create only.",
                             param="type", code="unsupported_event")
    return {k: v for k, v in obj.items() if k != "type"}
