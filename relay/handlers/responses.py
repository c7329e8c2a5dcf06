"""POST /responses (JSON and typed events) and POST /responses/compact, charged like chat;
POST /responses/input_tokens, free. A previous_response_id sends the request to the upstream
account that holds that response, and only there."""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from relay.balancer.pool import Endpoint
from relay.errors import InvalidRequest, PreviousResponseNotFound
from relay.handlers.proxy import OFF_LOOP_REPLY_BYTES, ProxyHandler
from relay.handlers.stored_responses import MAX_ID_CHARS, UnbilledHandler
from relay.metering.bounds import MAX_TOKENS
from relay.metering.quote import Quote, quote_responses
from relay.metering.usage import Usage
from relay.owners import Owner
from relay.proxy.request import UpstreamRequest
from relay.proxy.responses_sse import ResponsesStreamMeter
from relay.proxy.sse import StreamMeter
from relay.proxy.transport import UpstreamResponse

if TYPE_CHECKING:
    from relay.services import Services

# {"id": "resp_...", "object": "response", ...: OpenAI's reply begins so; anything else is parsed.
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*"([A-Za-z0-9_-]{1,256})"\s*,\s*"object"\s*:\s*"response"\s*[,}]')


async def previous_owner(services: Services, body: dict[str, Any], key_hash: str) -> Owner | None:
    """The owner of the response a request continues, which must be the same relay key."""
    previous = body.get("previous_response_id")
    if previous is None:
        return None
    if not isinstance(previous, str) or not previous or len(previous) > MAX_ID_CHARS:
        raise InvalidRequest("'previous_response_id' must be a response id.", param="previous_response_id")
    owner = await services.owners.find(previous, key_hash)
    if owner is None:
        raise PreviousResponseNotFound(f"Previous response with id '{previous}' not found.",
                                       param="previous_response_id")
    return owner


def validate_responses(body: dict[str, Any], socket: bool = False) -> None:
    """The fields relay reads or cannot serve; the upstream judges the rest."""
    value = body.get("input")
    if value is not None and not isinstance(value, (str, list)):
        raise InvalidRequest("'input' must be a string or an array of input items.", param="input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("'instructions' must be a string.", param="instructions")
    limit = body.get("max_output_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_TOKENS):
        raise InvalidRequest(f"'max_output_tokens' must be a whole number >= 1 and <= {MAX_TOKENS}.",
                             param="max_output_tokens")
    for name in ("store",) if socket else ("stream", "store"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise InvalidRequest(f"'{name}' must be of type bool.", param=name)
    if body.get("background"):
        # It would be billed after the request ends, when nothing holds its reservation any more.
        raise InvalidRequest("Background responses are not served by this relay.", param="background")
    if body.get("conversation") is not None:
        # A conversation lives in an upstream account relay does not track; previous_response_id is.
        raise InvalidRequest("Conversations are not served by this relay; use previous_response_id.",
                             param="conversation")


async def quoted_response(handler: ProxyHandler, body: dict[str, Any]) -> tuple[str, Owner | None, Quote]:
    """A response request's served model, the response it continues (its owner) and its quote:
    what creating a response and compacting one both start with."""
    served = handler.resolve_model(body)
    validate_responses(body)
    owner = await previous_owner(handler.services, body, handler.key.key_hash)
    return served, owner, quote_responses(handler.services.config, served, body, owner.history if owner else 0)


class ResponsesHandler(ProxyHandler):
    upstream_path = "/responses"
    route = "responses"

    async def post(self) -> None:
        body = self.parsed_body()
        served, owner, quote = await quoted_response(self, body)
        config = self.services.config
        extra = {"max_output_tokens": quote.allowance} \
            if not quote.limited and config.quota.forward_max_tokens else None
        request = replace(self.upstream_request(body, served, extra), pinned=owner.pinned if owner else None)
        self._stored = body.get("store") is not False
        self._named: tuple[str, Endpoint] | None = None  # the response's id, and who made it
        self._recorded = False
        try:
            await self.forward(request, quote, body.get("stream") is True, body)
        finally:
            if self._named is not None:  # a stream, finished or left by its client: the response exists
                usage = self._meter.usage or Usage(prompt_tokens=quote.prompt_tokens,
                                                   completion_tokens=quote.allowance)
                self._record(self._named[1], self._named[0], usage)

    def stream_meter(self, body: dict[str, Any]) -> StreamMeter:
        meter = ResponsesStreamMeter()
        meter.on_response_id = self._on_response_id
        return meter

    def _on_response_id(self, response_id: str) -> None:
        if self._upstream is not None:
            self._named = (response_id, self._upstream.endpoint)

    async def reply_usage(self, data: bytes, resp: UpstreamResponse) -> Usage:
        usage = await super().reply_usage(data, resp)
        # It is JSON (super() parsed it); only its id is needed: read from the first bytes when it
        # leads, as in OpenAI's replies, else from the reply parsed again (off the loop when large).
        match = _LEADING_ID.match(data)
        reply = {"id": match.group(1).decode(), "object": "response"} if match else \
            await asyncio.to_thread(json.loads, data) if len(data) > OFF_LOOP_REPLY_BYTES else json.loads(data)
        if isinstance(reply, dict) and reply.get("object") == "response" and isinstance(reply.get("id"), str):
            self._record(resp.endpoint, reply["id"], usage)
        return usage

    def _record(self, endpoint: Endpoint, response_id: str, usage: Usage | None) -> None:
        if self._recorded or not self._stored or len(response_id) > MAX_ID_CHARS:
            return
        self._recorded = True
        history = usage.prompt_tokens + usage.completion_tokens if usage else self.charge.quote.prompt_tokens
        self.services.owners.record(response_id, self.key.key_hash, endpoint.upstream.name, endpoint.fingerprint,
                                    history)


class CompactHandler(ProxyHandler):
    """A compaction pass is billed as a response; its result is not a stored response."""

    upstream_path = "/responses/compact"
    route = "responses"

    async def post(self) -> None:
        body = self.parsed_body()
        served, owner, quote = await quoted_response(self, body)
        request = replace(self.upstream_request(body, served), pinned=owner.pinned if owner else None)
        await self.forward(request, quote, False, body)


class InputTokensHandler(UnbilledHandler):
    """What a request's input would count, as the upstream counts it: free, so not charged."""

    upstream_path = "/responses/input_tokens"
    route = "responses"

    async def post(self) -> None:
        body = self.parsed_body()
        owner = await previous_owner(self.services, body, self.key.key_hash)
        if owner is None or body.get("model") is not None:
            served = self.resolve_model(body)
        else:
            served = ""  # the upstream that holds the previous response counts with its own default
        request = UpstreamRequest("POST", self.upstream_path, served, body, self.request.body,
                                  pinned=owner.pinned if owner else None, api=self.route)
        await self.relay_unbilled(request)
