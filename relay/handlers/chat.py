"""POST /chat/completions: JSON and streamed."""
from __future__ import annotations

from typing import Any

from relay.errors import InvalidRequest
from relay.handlers.proxy import ProxyHandler
from relay.metering.bounds import MAX_TOKENS
from relay.metering.quote import quote_chat
from relay.proxy.sse import StreamMeter


class ChatCompletionsHandler(ProxyHandler):
    upstream_path = "/chat/completions"
    route = "chat"

    def stream_meter(self, body: dict[str, Any]) -> StreamMeter:
        # The usage chunk relay asks for reaches the client only if the client asked too.
        return StreamMeter(forward_usage_chunk=_asked_for_usage(body))

    async def post(self) -> None:
        body = self.parsed_body()
        served = self.resolve_model(body)
        _validate_chat(body)
        config = self.services.config
        quote = quote_chat(config, served, body)
        stream = body.get("stream") is True
        extra: dict[str, Any] = {}
        if stream:  # ask for usage on streams; the handler drops that chunk unless the client asked too
            extra["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        if not quote.limited and config.quota.forward_max_tokens:
            extra["max_completion_tokens"] = quote.allowance  # the limit relay reserved for, if the operator wants
        await self.forward(self.upstream_request(body, served, extra or None), quote, stream, body)


def _asked_for_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _validate_chat(body: dict[str, Any]) -> None:
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
    for name, most in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS), ("n", 128)):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most):
            raise InvalidRequest(f"'{name}' must be a whole number >= 1 and <= {most}.", param=name)


def _typed(body: dict[str, Any], name: str, kind: type) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise InvalidRequest(f"'{name}' must be of type {kind.__name__}.", param=name)

