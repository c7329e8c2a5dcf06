"""Exact costs: cost = ceil(Σ each part of the usage × its price), in quota units. Pure."""
from __future__ import annotations

from fractions import Fraction
from math import ceil

from relay.config import Price
from relay.metering.usage import Usage


def cost(price: Price, usage: Usage) -> int:
    """Computed once, exactly, under the price of the prompt's tier; parts a price does not
    name are charged as plain input (input parts) or output (output parts). ``ceil(exact(...))``,
    in integers over the prices' common denominator (``Price.scaled``)."""
    p = price.for_prompt(usage.prompt_tokens)
    d, r = p.scaled
    total = _scaled_total(r, usage)
    if usage.images:
        size, _, quality = usage.image_kind.partition("/")
        return ceil(Fraction(total, d) + p.image(size, quality) * usage.images)
    return -(-total // d)


def reservation(price: Price, prompt: Usage, allowance: int) -> int:
    """What a quote reserves: ``ceil(exact(price, prompt) + allowance × tier.dearest_output)``,
    the prompt at its prices and the allowance at the dearest an output token can be, in
    integers like ``cost`` (with Fractions it was 5 % of relay's CPU per chat)."""
    p = price.for_prompt(prompt.prompt_tokens)
    dearest = p.dearest_output
    if prompt.images:
        return ceil(exact(price, prompt) + allowance * dearest)
    d, r = p.scaled
    over = d * dearest.denominator
    return -(-(_scaled_total(r, prompt) * dearest.denominator + allowance * dearest.numerator * d) // over)


def _scaled_total(r: tuple[int, ...], usage: Usage) -> int:
    """The usage's parts but images at ``Price.scaled``'s prices: the cost times their denominator."""
    return (r[0] * usage.text_input + r[1] * usage.cached_tokens + r[2] * usage.image_tokens
            + r[3] * usage.audio_input_tokens + r[4] * usage.text_output + r[5] * usage.reasoning_tokens
            + r[6] * usage.audio_output_tokens + r[7] * usage.seconds + r[8] * usage.characters)


def exact(price: Price, usage: Usage) -> Fraction:
    p = price.for_prompt(usage.prompt_tokens)
    size, _, quality = usage.image_kind.partition("/")
    parts = ((p.input, usage.text_input), (_or(p.cached_input, p.input), usage.cached_tokens),
             (_or(p.image_input, p.input), usage.image_tokens), (_or(p.audio_input, p.input), usage.audio_input_tokens),
             (p.output, usage.text_output), (_or(p.reasoning, p.output), usage.reasoning_tokens),
             (_or(p.audio_output, p.output), usage.audio_output_tokens), (p.image(size, quality), usage.images),
             (p.per_second, usage.seconds), (p.per_character, usage.characters))
    return sum((rate * count for rate, count in parts if count), Fraction(0))


def _or(value: Fraction | None, default: Fraction) -> Fraction:
    return default if value is None else value
