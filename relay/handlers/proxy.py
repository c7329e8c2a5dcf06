"""The proxying every API route shares: the body read under its limit, the reservation, the
exchange with an upstream, the reply relayed (JSON or server-sent events), and the bill."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import tornado.web
from tornado.iostream import StreamClosedError

from relay import fast_json
from relay.balancer.affinity import affinity_key
from relay.balancer.pool import Endpoint, Pool
from relay.errors import BodyTooLarge, InvalidRequest, ModelNotAllowed, ModelNotFound, UpstreamError
from relay.handlers.base import AuthenticatedHandler
from relay.http_server import hang_up
from relay.metering.encodings import encoding_for
from relay.metering.quote import Quote, price_served
from relay.metering.tokens import MAX_SLICE_CHARS, TokenTally, count_long_text
from relay.metering.usage import Usage, parse_usage
from relay.observability.access_log import Flag
from relay.policy import Policy
from relay.proxy.request import UpstreamRequest
from relay.proxy.sse import SSEDecoder, StreamMeter
from relay.proxy.transport import ERROR_BODY_BYTES, UpstreamResponse
from relay.quota import Delivery
from relay.redact import scrub

PASSED_RESPONSE_HEADERS = ("Content-Type", "OpenAI-Processing-Ms", "OpenAI-Version")

# A JSON reply larger than this is parsed (and its text counted) in a thread: json.loads of a
# large string body takes ~1 ms per MB; a small one would pay more for the hop than it saves.
OFF_LOOP_REPLY_BYTES = 1 << 20


@tornado.web.stream_request_body
class ProxyHandler(AuthenticatedHandler):
    """Reads the body under the size limit while it arrives, then forwards it."""

    upstream_path = ""
    json_reply = True       # a whole reply is JSON (False: the upstream's Content-Type is passed on)
    streams_bytes = False   # the reply is relayed as bytes arrive (audio), not read whole

    async def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._rejected = False
        self._upstream: UpstreamResponse | None = None
        self._client_gone = False
        await super().prepare()
        if self.request.method == "OPTIONS":
            return
        limit = self.body_limit()
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            self._reject_too_large(limit)

    def data_received(self, chunk: bytes) -> None:
        if self._rejected:
            return
        self._size += len(chunk)
        limit = self.body_limit()
        if self._size > limit:
            self._reject_too_large(limit)
            return
        self._chunks.append(chunk)

    def body_limit(self) -> int:
        """The largest body this route reads (413 beyond it, while it arrives)."""
        return self.services.config.limits.max_body_bytes

    def _reject_too_large(self, limit: int) -> None:
        # Answer now and drop the connection: the rest of the body is never read.
        self._rejected = True
        self._chunks = []
        self.flag = Flag.BODY_TOO_LARGE
        self.send_relay_error(BodyTooLarge(f"The request body exceeds the limit of {limit} bytes."))
        hang_up(self.request.connection)

    def on_connection_close(self) -> None:
        self._client_gone = True
        upstream: UpstreamResponse | None = getattr(self, "_upstream", None)  # None before prepare()
        if upstream is not None:
            upstream.close()  # cancels the upstream's work
        super().on_connection_close()

    def parsed_body(self) -> dict[str, Any]:
        self.request.body = b"".join(self._chunks)
        self._chunks = []
        return self.json_body()

    def resolve_model(self, body: dict[str, Any]) -> str:
        self.model, served = resolve_model(self.services.router.pool, body, self.route, self.key.policy)
        return served

    def upstream_request(self, body: dict[str, Any], served: str,
                         extra: dict[str, Any] | None = None) -> UpstreamRequest:
        """What goes upstream: for this route's API, with the request's cache affinity key."""
        affinity = affinity_key(self.route, body, served, self.key.key_hash) \
            if self.services.config.routing.affinity else None
        return UpstreamRequest("POST", self.upstream_path, served, body, self.request.body, extra,
                               api=self.route, affinity=affinity)

    async def forward(self, request: UpstreamRequest, quote: Quote, stream: bool, body: dict[str, Any]) -> None:
        """Within the key's rate limits (relay/limits.py): reserve, send, relay the reply, then
        settle what was delivered or refund."""
        policy, limits = self.key.policy, self.services.limits
        if policy is None or not policy.limited:
            await self._forward(request, quote, stream, body)
            return
        ticket = await limits.admit(self.key, quote.prompt_tokens + quote.allowance)
        self.limit_headers = limits.headers(self.key.key_hash)
        headers = self._headers  # numbers and durations relay wrote: printable ASCII, no check needed
        for name, value in self.limit_headers.items():
            headers[name] = value
        self._used_tokens = 0
        try:
            await self._forward(request, quote, stream, body)
        finally:
            limits.finish(ticket, self._used_tokens)

    async def _forward(self, request: UpstreamRequest, quote: Quote, stream: bool, body: dict[str, Any]) -> None:
        services = self.services
        self.charge = await services.quota.reserve(self.key.key_hash, self.request_id, quote, stream)
        self._usage: Usage | None = None
        self._meter = self.stream_meter(body)  # reads the reply: the stream's events, a JSON reply's texts
        self._meter.count_with(encoding_for(quote.model, services.config.quota.encodings))
        self._tally: TokenTally | None = None  # a stream's delivered text, when no usage comes
        self._delivered = False
        self._ttfb_ms = 0.0
        self.upstream_wait = 0.0
        served_by: Endpoint | None = None
        sent_at = time.perf_counter()
        try:
            async with services.router.exchange(request) as resp:
                self.upstream_wait += time.perf_counter() - sent_at
                self._upstream, served_by = resp, resp.endpoint
                self.upstream_name = resp.endpoint.upstream.name
                if resp.status >= 400:
                    await self._pass_error(resp)
                elif stream and resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                    await self._relay_stream(resp)
                elif self.streams_bytes:
                    await self._relay_bytes(resp)
                else:
                    await self._relay_json(resp)
        finally:
            self._upstream = None
            if served_by is None and self.upstream_wait == 0.0:
                self.upstream_wait = time.perf_counter() - sent_at  # every attempt failed
            await self._end_charge(quote, served_by)

    async def _end_charge(self, quote: Quote, served_by: Endpoint | None) -> None:
        """Exactly one of settle or refund, whatever happened before."""
        if not self._delivered:
            await self.services.quota.refund(self.charge)
            return
        usage = self._usage
        if usage is None:  # no usage from the upstream: the prompt as estimated, the reply as counted
            counted = await count_rest(self._tally) if self._tally else 0
            usage = replace(quote.prompt, completion_tokens=self._meter.completion_tokens(counted))
        self._used_tokens = usage.prompt_tokens + usage.completion_tokens  # for the key's tpm
        model = served_by.upstream_model(quote.model) if served_by is not None else quote.model
        await self.services.quota.settle(self.charge, Delivery(
            usage=usage, status=self.get_status(), upstream=self.upstream_name,
            model=model, price=price_served(self.services.config, quote, model),
            latency_ms=(time.perf_counter() - self.started) * 1000, ttfb_ms=self._ttfb_ms,
            requested_model=self.model, api=self.route))

    def _add_upstream_wait(self, since: float) -> None:
        """The time since ``since`` (``perf_counter``) was spent waiting on the upstream."""
        self.upstream_wait = (self.upstream_wait or 0.0) + (time.perf_counter() - since)

    def _mark_first_byte(self) -> None:
        if not self._ttfb_ms:
            self._ttfb_ms = (time.perf_counter() - self.started) * 1000

    def _copy_headers(self, resp: UpstreamResponse) -> None:
        for name in PASSED_RESPONSE_HEADERS:
            value = resp.headers.get(name)
            if value is not None:
                self.set_header(name, value)

    async def _pass_error(self, resp: UpstreamResponse) -> None:
        """The client's own mistake as the upstream judged it: passed on, minus any key. Not charged."""
        data = scrub(await resp.read(ERROR_BODY_BYTES), (resp.endpoint.key,))
        self.set_status(resp.status)
        self._copy_headers(resp)
        self.flag = Flag.UPSTREAM_4XX
        self.finish(data)

    async def reply_usage(self, data: bytes, resp: UpstreamResponse) -> Usage:
        """What a whole (non-streamed) reply delivered: its ``usage``, or its text counted."""
        name, prompt = resp.endpoint.upstream.name, self.charge.quote.prompt
        if len(data) > OFF_LOOP_REPLY_BYTES:
            return await asyncio.to_thread(_usage_of_reply, data, prompt, name, self._meter)
        return await _usage_of_small_reply(data, prompt, name, self._meter)

    async def _relay_json(self, resp: UpstreamResponse) -> None:
        waited = time.perf_counter()
        data = await resp.read(self.services.config.limits.max_response_bytes)
        self._add_upstream_wait(waited)
        self._usage = await self.reply_usage(data, resp)
        self.set_status(resp.status)
        self._copy_headers(resp)
        if self.json_reply or "Content-Type" not in resp.headers:
            self.set_header("Content-Type", "application/json")
        self._mark_first_byte()
        self._delivered = True
        try:
            await self.finish(data)
        except StreamClosedError:
            self.flag = Flag.CLIENT_DISCONNECTED

    def stream_meter(self, body: dict[str, Any]) -> StreamMeter:
        """What reads this route's stream: its usage, its delivered text, its end."""
        return StreamMeter(forward_usage_chunk=False)

    def _write_events(self, events: list[bytes], meter: StreamMeter, limit: int,
                      short_digits: bool = False) -> tuple[bool, bool]:
        """Write the events the client should get, stopping at one over ``limit``: (wrote any, stopped).
        They go out as one write (a network read holds dozens of events)."""
        passed = []
        stopped = False
        for event in events:
            if len(event) > limit:
                stopped = True
                break
            if meter.accept(event, short_digits):
                passed.append(event)
        if passed:
            self.write(b"".join(passed))
        return bool(passed), stopped

    async def _relay_stream(self, resp: UpstreamResponse) -> None:
        self.set_status(resp.status)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        limit = self.services.config.limits.max_event_bytes
        decoder = SSEDecoder()
        meter = self._meter
        self._tally = meter.text
        chunks = resp.chunks().__aiter__()
        oversized = False
        try:
            while not oversized:
                waited = time.perf_counter()
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    self._add_upstream_wait(waited)
                wrote, oversized = self._write_events(decoder.decode(chunk), meter, limit, decoder.short_digits)
                if wrote:
                    self._mark_first_byte()
                    await self.flush()
                    self._delivered = True
                if meter.text.ready:
                    await count_ready(meter.text)
                oversized = oversized or decoder.pending > limit
            if oversized:
                # Headers are out: the stream just ends, and the upstream's connection with it.
                self.flag = Flag.UPSTREAM_EVENT_TOO_LARGE
                resp.close()
            elif (rest := decoder.flush()).strip():
                self.write(rest)
        except UpstreamError:
            self.flag = Flag.UPSTREAM_STREAM_BROKEN  # headers are out: the stream just ends
        except StreamClosedError:
            self.flag = Flag.CLIENT_DISCONNECTED
        finally:
            self._usage = meter.usage
        if self._client_gone:
            self.flag = Flag.CLIENT_DISCONNECTED
        if self.flag == Flag.CLIENT_DISCONNECTED:
            return
        if not meter.done and self.flag == Flag.NONE:
            self.flag = Flag.UPSTREAM_STREAM_TRUNCATED
        try:
            await self.finish()
        except StreamClosedError:
            self.flag = Flag.CLIENT_DISCONNECTED

    async def _relay_bytes(self, resp: UpstreamResponse) -> None:
        """A binary reply (speech) passed on as it arrives, each chunk flushed before the next is
        read: a slow client slows the upstream read, and relay holds about one chunk. Delivered
        once any byte reached the client; the usage is the quote's (the route's price unit)."""
        self.set_status(resp.status)
        self._copy_headers(resp)
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self._usage = self.charge.quote.prompt
        chunks = resp.chunks().__aiter__()
        try:
            while True:
                waited = time.perf_counter()
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    self._add_upstream_wait(waited)
                self.write(chunk)
                self._mark_first_byte()
                await self.flush()
                self._delivered = True
        except UpstreamError:
            self.flag = Flag.UPSTREAM_STREAM_BROKEN  # headers are out: the body just ends
        except StreamClosedError:
            self.flag = Flag.CLIENT_DISCONNECTED
        if self._client_gone:
            self.flag = Flag.CLIENT_DISCONNECTED
        if self.flag == Flag.CLIENT_DISCONNECTED:
            return
        try:
            await self.finish()
        except StreamClosedError:
            self.flag = Flag.CLIENT_DISCONNECTED


def resolve_model(pool: Pool, body: dict[str, Any], api: str | None = None,
                  policy: Policy | None = None) -> tuple[str, str]:
    """The model the client asked for, and the one served (after the global model_map) on ``api``;
    one the key's ``policy`` does not allow (by the name the client sent) is refused first."""
    model = body.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    if policy is not None and not policy.allows_model(model):
        raise ModelNotAllowed(f"This relay key may not use the model '{model}'.", param="model")
    served = pool.config.map_model(model)
    if not pool.serves(served, api):
        raise ModelNotFound(model_not_found_message(model, pool.config.client_model_names(api)), param="model")
    return model, served


MAX_NAMED_MODEL_CHARS = 100  # of the client's model name, echoed in a 404
MAX_MODEL_LIST_CHARS = 600   # of the models a 404 names


def model_not_found_message(model: str, available: list[str]) -> str:
    """OpenAI's 404 for an unknown model, with the models clients may ask for here (bounded)."""
    shown = model if len(model) <= MAX_NAMED_MODEL_CHARS else model[:MAX_NAMED_MODEL_CHARS] + "…"
    message = f"The model '{shown}' does not exist or you do not have access to it."
    if not available:
        return message + " This relay serves no model for this API."
    listed: list[str] = []
    length = 0
    for name in available:
        if listed and length + len(name) + 2 > MAX_MODEL_LIST_CHARS:
            break
        listed.append(name)
        length += len(name) + 2
    more = len(available) - len(listed)
    return f"{message} Models available: {', '.join(listed)}" + (f", … ({more} more)" if more else "") + "."


def _usage_of_reply(data: bytes, prompt: Usage, upstream: str, meter: StreamMeter) -> Usage:
    """A JSON reply's usage, or its text counted when the upstream reported none."""
    reply = _parse_reply(data, upstream)
    encoding = meter.text.encoding
    return parse_usage(reply) or replace(prompt, completion_tokens=meter.completion_tokens(
        sum(count_long_text(t, encoding) for t in meter.reply_texts(reply))))


async def _usage_of_small_reply(data: bytes, prompt: Usage, upstream: str, meter: StreamMeter) -> Usage:
    """``_usage_of_reply`` on the loop, but for text long enough to take more than a slice to count."""
    reply = _parse_reply(data, upstream)
    usage = parse_usage(reply)
    if usage is not None:
        return usage
    texts, encoding = meter.reply_texts(reply), meter.text.encoding
    if sum(map(len, texts)) <= MAX_SLICE_CHARS:
        counted = sum(count_long_text(t, encoding) for t in texts)
    else:
        counted = await asyncio.to_thread(lambda: sum(count_long_text(t, encoding) for t in texts))
    return replace(prompt, completion_tokens=meter.completion_tokens(counted))


def _parse_reply(data: bytes, upstream: str) -> Any:
    try:
        return fast_json.loads(data)
    except ValueError:
        raise UpstreamError(f"upstream {upstream} sent a reply that is not JSON") from None


async def count_ready(tally: TokenTally) -> None:
    """Count a stream's pending text a slice at a time, letting the loop run between slices."""
    tally.count_slice()
    while tally.ready:
        await asyncio.sleep(0)
        tally.count_slice()


async def count_rest(tally: TokenTally) -> int:
    """Every token of what a tally was given, the rest counted a slice at a time."""
    if tally.ready:
        await count_ready(tally)
    return tally.close()

