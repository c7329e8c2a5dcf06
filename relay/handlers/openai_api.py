"""The OpenAI API as clients see it: chat completions, embeddings, models."""
from __future__ import annotations

import json
from typing import Any

import tornado.web
from tornado.iostream import StreamClosedError

from relay.balancer.pool import Endpoint
from relay.errors import BodyTooLarge, InvalidRequest, ModelNotFound, RelayError, UpstreamError
from relay.handlers.base import RelayHandler
from relay.proxy.sse import SSEDecoder, StreamMeter
from relay.proxy.transport import UpstreamResponse
from relay.redact import scrub

PASSED_RESPONSE_HEADERS = ("Content-Type", "OpenAI-Processing-Ms", "OpenAI-Version")


class AuthenticatedHandler(RelayHandler):
    async def prepare(self) -> None:
        if self.request.method == "OPTIONS":
            return
        self.key = await self.services.auth.authenticate(self.request.headers.get("Authorization"))
        self.key_prefix = self.key.prefix


@tornado.web.stream_request_body
class ProxyHandler(AuthenticatedHandler):
    """Reads the body under the size limit while it arrives, then forwards it."""

    upstream_path = ""

    async def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._rejected = False
        self._upstream: UpstreamResponse | None = None
        self._client_gone = False
        await super().prepare()
        if self.request.method == "OPTIONS":
            return
        limit = self.services.config.limits.max_body_bytes
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            self._reject_too_large(limit)

    def data_received(self, chunk: bytes) -> None:
        if self._rejected:
            return
        self._size += len(chunk)
        limit = self.services.config.limits.max_body_bytes
        if self._size > limit:
            self._reject_too_large(limit)
            return
        self._chunks.append(chunk)

    def _reject_too_large(self, limit: int) -> None:
        # Answer now and drop the connection: the rest of the body is never read.
        self._rejected = True
        self._chunks = []
        self.flag = "body_too_large"
        self.send_relay_error(BodyTooLarge(f"The request body exceeds the limit of {limit} bytes."))
        self.request.connection.stream.close()

    def on_connection_close(self) -> None:
        self._client_gone = True
        if self._upstream is not None:
            self._upstream.close()  # cancels the upstream's work
        super().on_connection_close()

    def parsed_body(self) -> dict:
        self.request.body = b"".join(self._chunks)
        self._chunks = []
        return self.json_body()

    def resolve_model(self, body: dict) -> str:
        model = body.get("model")
        if model is None:
            raise InvalidRequest("You must provide a model parameter.", param="model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' must be a non-empty string.", param="model")
        self.model = model
        config = self.services.config
        served = config.map_model(model)
        if not self.services.router.pool.serves(served):
            raise ModelNotFound(f"The model '{model}' does not exist or is not served by this relay.",
                                param="model")
        return served

    def body_builder(self, body: dict, served: str, extra: dict | None = None):
        raw = self.request.body
        unchanged = served == body["model"] and not extra

        def build(endpoint: Endpoint) -> bytes:
            upstream_model = endpoint.upstream_model(served)
            if unchanged and upstream_model == served:
                return raw  # nothing to change: skip re-serialising
            return json.dumps({**body, "model": upstream_model, **(extra or {})},
                              separators=(",", ":")).encode()

        return build

    async def forward(self, body: dict, served: str, stream: bool, extra: dict | None = None) -> None:
        router = self.services.router
        resp = await router.send(served, "POST", self.upstream_path, self.body_builder(body, served, extra))
        self._upstream = resp
        self.upstream_name = resp.endpoint.upstream.name
        try:
            if resp.status >= 400:
                await self._pass_error(resp)
            elif stream and resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                await self._relay_stream(resp, body)
            else:
                await self._relay_json(resp)
        finally:
            self._upstream = None
            router.finish(resp)

    def _copy_headers(self, resp: UpstreamResponse) -> None:
        for name in PASSED_RESPONSE_HEADERS:
            value = resp.headers.get(name)
            if value is not None:
                self.set_header(name, value)

    async def _pass_error(self, resp: UpstreamResponse) -> None:
        """The client's own mistake as the upstream judged it: passed on, minus any key."""
        data = scrub(await resp.read(), (resp.endpoint.key,))
        self.set_status(resp.status)
        self._copy_headers(resp)
        self.flag = "upstream_4xx"
        self.finish(data)

    async def _relay_json(self, resp: UpstreamResponse) -> None:
        data = await resp.read()
        self.set_status(resp.status)
        self._copy_headers(resp)
        self.finish(data)

    async def _relay_stream(self, resp: UpstreamResponse, body: dict) -> None:
        self.set_status(resp.status)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        decoder = SSEDecoder()
        meter = StreamMeter(forward_usage_chunk=_asked_for_usage(body))
        try:
            async for chunk in resp.chunks():
                for event in decoder.decode(chunk):
                    if meter.accept(event):
                        self.write(event)
                await self.flush()
            rest = decoder.flush()
            if rest.strip():
                self.write(rest)
        except UpstreamError:
            self.flag = "upstream_stream_broken"  # headers are out: the stream just ends
        except StreamClosedError:
            self.flag = "client_disconnected"
            return
        if self._client_gone:
            self.flag = "client_disconnected"
            return
        if not meter.done and self.flag == "-":
            self.flag = "upstream_stream_truncated"
        try:
            await self.finish()
        except StreamClosedError:
            self.flag = "client_disconnected"


def _asked_for_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


class ChatCompletionsHandler(ProxyHandler):
    upstream_path = "/chat/completions"

    async def post(self) -> None:
        body = self.parsed_body()
        served = self.resolve_model(body)
        _validate_chat(body)
        stream = body.get("stream") is True
        # Ask the upstream for usage on streams; the handler drops that chunk unless the client asked.
        extra = {"stream_options": {**(body.get("stream_options") or {}), "include_usage": True}} if stream else None
        await self.forward(body, served, stream, extra)


class EmbeddingsHandler(ProxyHandler):
    upstream_path = "/embeddings"

    async def post(self) -> None:
        body = self.parsed_body()
        served = self.resolve_model(body)
        value = body.get("input")
        if value is None:
            raise InvalidRequest("You must provide an input parameter.", param="input")
        if not isinstance(value, (str, list)) or value == [] or value == "":
            raise InvalidRequest("'input' must be a non-empty string or array.", param="input")
        await self.forward(body, served, stream=False)


def _validate_chat(body: dict) -> None:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("You must provide a messages parameter.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'.",
                                 param=f"messages[{i}]")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequest(f"messages[{i}].content must be a string or an array of parts.",
                                 param=f"messages[{i}].content")
    _typed(body, "stream", bool)
    _typed(body, "stream_options", dict)
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        raise InvalidRequest("'max_tokens' must be a whole number >= 1.", param="max_tokens")


def _typed(body: dict, name: str, kind: type) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise InvalidRequest(f"'{name}' must be of type {kind.__name__}.", param=name)


class ModelsHandler(AuthenticatedHandler):
    def get(self) -> None:
        names = self.services.config.client_model_names()
        self.write_json({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "relay"} for n in names]})


