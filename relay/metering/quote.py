"""What a request must hold before it is forwarded, and what it costs after. Pure."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import ceil
from typing import Any

from relay.config import Config, Price
from relay.errors import InvalidRequest
from relay.metering.bounds import MAX_UNITS
from relay.metering.pricing import cost
from relay.metering.tokens import content_text, count_chat_prompt, count_embedding_input, count_long_text


@dataclass(frozen=True)
class Quote:
    model: str            # the model the price is for (after mapping)
    price: Price
    prompt_tokens: int    # estimated with tiktoken
    allowance: int        # completion tokens reserved for
    minimum: int          # units that must be there: the prompt alone
    full: int             # units held when the balance allows: prompt + allowance
    limited: bool = False  # the client set the allowance (max_tokens × n): no reply can be longer


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


def quote_chat(config: Config, model: str, body: dict) -> Quote:
    price = price_for(config, model)
    prompt = count_chat_prompt(body["messages"])
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    allowance = limit or config.quota.default_max_tokens
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        allowance *= n  # n choices each get up to max_tokens
    return _quote(model, price, prompt, allowance, limited=bool(limit))


def quote_embedding(config: Config, model: str, body: dict) -> Quote:
    return _quote(model, price_for(config, model), count_embedding_input(body["input"]), 0, limited=True)


def _quote(model: str, price: Price, prompt: int, allowance: int, limited: bool = False) -> Quote:
    """Units are capped at ``MAX_UNITS``: no balance holds more, so a larger reservation could
    only ever hold what is left, and the cap keeps every amount stored a 64-bit integer."""
    return Quote(model, price, prompt, allowance, minimum=min(ceil(Fraction(price.input) * prompt), MAX_UNITS),
                 full=min(cost(price, prompt, allowance), MAX_UNITS), limited=limited)


def completion_tokens_of_reply(reply: Any) -> int:
    """Count a JSON chat reply's text when the upstream reported no usage."""
    return sum(count_long_text(text) for text in reply_texts(reply))


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
