"""POST /completions (the legacy text completions API): JSON and streamed."""
from __future__ import annotations

from typing import Any

from relay.errors import InvalidRequest
from relay.handlers.proxy import ProxyHandler
from relay.metering.bounds import MAX_TOKENS
from relay.metering.completions import DEFAULT_MAX_TOKENS, echoed_tokens, quote_completion
from relay.proxy.sse import CompletionStreamMeter, StreamMeter

# OpenAI's bounds: n up to 128 choices per prompt, best_of up to 20 generated; max_tokens may be
# 0 (with echo, to read the prompt's logprobs).
BOUNDS = (("max_tokens", 0, MAX_TOKENS), ("n", 1, 128), ("best_of", 0, 20))


class CompletionsHandler(ProxyHandler):
    upstream_path = "/completions"
    route = "completions"
    _echoed = 0  # prompt tokens the reply repeats (echo), set once the body is read

    def stream_meter(self, body: dict[str, Any]) -> StreamMeter:
        opts = body.get("stream_options")
        asked = isinstance(opts, dict) and opts.get("include_usage") is True
        return CompletionStreamMeter(forward_usage_chunk=asked, echoed=self._echoed)

    async def post(self) -> None:
        body = self.parsed_body()
        served = self.resolve_model(body)
        _validate_completion(body)
        config = self.services.config
        quote, prompt = quote_completion(config, served, body)
        self._echoed = echoed_tokens(body, prompt)
        stream = body.get("stream") is True
        extra: dict[str, Any] = {}
        if stream:  # ask for usage on streams; the meter drops that chunk unless the client asked too
            extra["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        if not quote.limited and config.quota.forward_max_tokens:
            extra["max_tokens"] = DEFAULT_MAX_TOKENS  # the limit relay reserved for, said out loud
        await self.forward(self.upstream_request(body, served, extra or None), quote, stream, body)


def _validate_completion(body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("You must provide a prompt parameter.", param="prompt")
    if not isinstance(prompt, str) and not _prompt_list(prompt):
        raise InvalidRequest("'prompt' must be a string, an array of strings, an array of tokens or an array "
                             "of token arrays.", param="prompt")
    for name, kind in (("stream", bool), ("stream_options", dict), ("echo", bool), ("suffix", str)):
        value = body.get(name)
        if value is not None and not isinstance(value, kind):
            raise InvalidRequest(f"'{name}' must be of type {kind.__name__}.", param=name)
    for name, least, most in BOUNDS:
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most):
            raise InvalidRequest(f"'{name}' must be a whole number >= {least} and <= {most}.", param=name)


def _prompt_list(prompt: Any) -> bool:
    """A non-empty array of strings, of tokens, or of non-empty token arrays (one kind)."""
    if not isinstance(prompt, list) or not prompt:
        return False
    if all(isinstance(p, str) for p in prompt):
        return True
    return _tokens(prompt) or all(isinstance(p, list) and p and _tokens(p) for p in prompt)


def _tokens(values: list[Any]) -> bool:
    return all(type(t) is int and 0 <= t <= MAX_TOKENS for t in values)
