"""What a request must hold before it is forwarded. Pure."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from relay.config import Config, Price
from relay.errors import InvalidRequest
from relay.metering.bounds import MAX_UNITS
from relay.metering.pricing import cost, reservation
from relay.metering.prompt import (
    PromptEstimate,
    count_chat_request,
    count_moderation_input,
    count_responses_request,
)
from relay.metering.tokens import content_text, count_embedding_input
from relay.metering.usage import Usage


@dataclass(frozen=True)
class Quote:
    model: str            # the model the price is for (after mapping)
    price: Price
    prompt: Usage         # the prompt as estimated (text, image and audio tokens)
    allowance: int        # completion tokens reserved for
    minimum: int          # units that must be there: the prompt alone
    full: int             # units held when the balance allows: prompt + allowance
    limited: bool = False  # the client set the allowance (max_tokens × n): no reply can be longer

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.prompt_tokens


def price_for(config: Config, model: str) -> Price:
    price = config.price_of(model)
    if price is None:
        raise InvalidRequest(f"The model '{model}' has no price configured on this relay.", param="model",
                             code="model_not_priced")
    return price


def price_served(config: Config, quote: Quote, model: str) -> Price:
    """The price of the model actually served (an upstream's own model_map may have changed it
    after the quote); the quote's own when that model has no price of its own."""
    return config.pricing.get(model, quote.price)


def client_limit(body: dict[str, Any], *names: str) -> int | None:
    """The completion limit the client set (validated by the handler), times ``n`` choices."""
    limit = next((body[name] for name in names if body.get(name)), None)
    n = body.get("n")
    return limit * n if limit and isinstance(n, int) and n > 1 else limit


def quote_chat(config: Config, model: str, body: dict[str, Any]) -> Quote:
    estimate = count_chat_request(body, model, config.quota.encodings)
    limit = client_limit(body, "max_completion_tokens", "max_tokens")
    choices = body.get("n")
    n = choices if isinstance(choices, int) else 1
    allowance = limit or config.quota.allowance_for(model) * max(n, 1)
    return quote_tokens(model, price_for(config, model), prompt_usage(estimate), allowance, limited=bool(limit))


def quote_responses(config: Config, model: str, body: dict[str, Any], history: int = 0) -> Quote:
    """A Responses request (or a compaction): input and instructions, plus ``history``, the tokens
    of the stored conversation a previous_response_id brings in (input and output of that
    response), all at the input price; the allowance is ``max_output_tokens`` (reasoning included)."""
    prompt = prompt_usage(count_responses_request(body, model, config.quota.encodings))
    if history:
        prompt = replace(prompt, prompt_tokens=prompt.prompt_tokens + history)
    limit = body.get("max_output_tokens")
    allowance = limit if isinstance(limit, int) and limit > 0 else config.quota.allowance_for(model)
    return quote_tokens(model, price_for(config, model), prompt, allowance, limited=allowance == limit)


def quote_embedding(config: Config, model: str, body: dict[str, Any]) -> Quote:
    prompt = Usage(prompt_tokens=count_embedding_input(body["input"]))
    return quote_tokens(model, price_for(config, model), prompt, 0, limited=True)


def quote_moderation(config: Config, model: str, body: dict[str, Any]) -> Quote:
    """The input at the model's price (OpenAI's moderation models are free: priced 0); no output."""
    prompt = prompt_usage(count_moderation_input(body["input"], model, config.quota.encodings))
    return quote_tokens(model, price_for(config, model), prompt, 0, limited=True)


def prompt_usage(estimate: PromptEstimate) -> Usage:
    return Usage(prompt_tokens=estimate.total, image_tokens=estimate.image, audio_input_tokens=estimate.audio)


def quote_tokens(model: str, price: Price, prompt: Usage, allowance: int, limited: bool = False) -> Quote:
    """The prompt at its prices (its tier's), the allowance at the dearest an output token can be.

    Units are capped at ``MAX_UNITS``: no balance holds more, so a larger reservation could
    only ever hold what is left, and the cap keeps every amount stored a 64-bit integer."""
    full = reservation(price, prompt, allowance)
    return Quote(model, price, prompt, allowance, minimum=min(cost(price, prompt), MAX_UNITS),
                 full=min(full, MAX_UNITS), limited=limited)


def reply_texts(reply: Any) -> list[str]:
    """The texts of a JSON chat reply that are billed as completion: contents, tool names and arguments."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    texts: list[str] = []
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        texts.append(content_text(message.get("content")))
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                texts += (str(fn.get("name", "")), str(fn.get("arguments", "")))
    return texts


def response_output_texts(output: list[Any]) -> list[str]:
    """A response's output items: message text and refusals, tool calls' names and arguments,
    reasoning summaries."""
    texts: list[str] = []
    for item in output:
        if not isinstance(item, dict):
            continue
        parts = [p for name in ("content", "summary") if isinstance(item.get(name), list) for p in item[name]]
        for part in parts:
            if isinstance(part, dict):
                texts += (v for k in ("text", "refusal") if isinstance(v := part.get(k), str))
        texts += (v for k in ("name", "arguments", "input") if isinstance(v := item.get(k), str))
    return texts
