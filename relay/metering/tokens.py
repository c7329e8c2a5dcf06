"""Token counting with tiktoken, offline, for callers that count text or chat messages.

cl100k_base unless an encoding is named; tables and model families live in encodings.py, whole
requests (tools, images, audio) in prompt.py."""
from __future__ import annotations

from typing import Any, Iterable

import tiktoken

from relay.metering.encodings import DEFAULT_ENCODING, count_tokens, get_encoding
from relay.metering.prompt import REPLY_PRIMING, TOKENS_PER_MESSAGE, TOKENS_PER_NAME, count_messages

ENCODING = DEFAULT_ENCODING
__all__ = ["ENCODING", "REPLY_PRIMING", "TOKENS_PER_MESSAGE", "TOKENS_PER_NAME", "content_text",
           "count_chat_prompt", "count_embedding_input", "count_text", "encoder"]


def encoder(encoding: str = DEFAULT_ENCODING) -> tiktoken.Encoding:
    return get_encoding(encoding)


def count_text(text: str, encoding: str = DEFAULT_ENCODING) -> int:
    # Special-token strings in user text ("<|endoftext|>") count as plain text, as OpenAI bills them.
    return count_tokens(text, encoding)


def content_text(content: Any) -> str:
    """Text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def count_chat_prompt(messages: Iterable[dict], encoding: str = DEFAULT_ENCODING) -> int:
    """Text tokens of chat messages (tool calls included, images and audio not), with the priming."""
    return count_messages(messages, encoding=encoding).text


def count_embedding_input(value: Any, encoding: str = DEFAULT_ENCODING) -> int:
    """Embedding input: a string, a list of strings, or token arrays (counted as given)."""
    if isinstance(value, str):
        return count_text(value, encoding)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(count_embedding_input(v, encoding) for v in value)
    return 0
