"""Bounds on every number that enters relay's money arithmetic. Pure.

Amounts are stored as MongoDB 64-bit integers: a number from a client or an upstream that
grew past them would make a write unencodable. Every amount relay keeps stays far below.
"""
from __future__ import annotations

# A quadrillion units ($1.5 billion at official prices): no balance, grant, top-up or single
# request reaches it, and sums of many of them stay far from 2**63.
MAX_UNITS = 10**15

# Token counts a request may ask for (max_tokens and friends): OpenAI's own are 32-bit.
MAX_TOKENS = 2**31 - 1


def clamp_tokens(value: int) -> int:
    """An upstream's token count kept within [0, MAX_TOKENS]."""
    return min(max(value, 0), MAX_TOKENS)


def clamp_units(value: int) -> int:
    return min(max(value, 0), MAX_UNITS)
