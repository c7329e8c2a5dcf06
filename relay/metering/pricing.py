"""Exact prices: cost = ceil(prompt × input + completion × output), in quota units."""
from __future__ import annotations

from fractions import Fraction
from math import ceil

from relay.config import Price


def cost(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    exact = price.input * prompt_tokens + price.output * completion_tokens
    return ceil(Fraction(exact))
