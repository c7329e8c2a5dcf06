"""Token counting with tiktoken, offline, for callers that count text or chat messages.

cl100k_base unless an encoding is named (a reply's delivered text: its model's); tables and
model families live in encodings.py, whole requests (tools, images, audio) in prompt.py."""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import regex  # type: ignore[import-untyped]  # (no stubs; two patterns compiled here)
import tiktoken

from relay.metering.encodings import CL100K, DEFAULT_ENCODING, O200K, count_tokens, get_encoding
from relay.metering.prompt import REPLY_PRIMING, TOKENS_PER_MESSAGE, TOKENS_PER_NAME, count_messages

ENCODING = DEFAULT_ENCODING
__all__ = ["ENCODING", "MAX_SLICE_CHARS", "REPLY_PRIMING", "TOKENS_PER_MESSAGE", "TOKENS_PER_NAME", "TokenTally",
           "content_text", "count_chat_prompt", "count_embedding_input", "count_long_text", "count_text", "encoder"]

# A tally counts once this many characters are pending, up to the last safe cut; a run of
# MAX_SLICE_CHARS with no safe cut is cut there anyway. tiktoken counts 3-10 M chars/s, so a
# slice takes a few ms at most.
SLICE_CHARS = 4096
MAX_SLICE_CHARS = 8192

# The last place where a table's pre-tokeniser splits whatever comes next, so that counting
# each side apart changes nothing. cl100k: before a space that follows a non-space, or before a
# symbol (not a letter, digit or space) that follows a letter or digit. o200k the same, except
# that its words carry their combining marks and their contractions ("it's" is one piece), so
# never before a mark or an apostrophe.
_LAST_SAFE_CUT: dict[str, Any] = {  # re and regex patterns
    CL100K: re.compile(r".*(?:(?<=\S)(?= )|(?<=[^\W_])(?=[^\w\s]|_))", re.S),  # Python's \w: no marks
    O200K: regex.compile(r".*(?:(?<=\S)(?= )|(?<=[\p{L}\p{N}\p{M}])(?=[^\p{L}\p{N}\p{M}\s']))", regex.S),
}


def encoder(encoding: str = DEFAULT_ENCODING) -> tiktoken.Encoding:
    return get_encoding(encoding)


def count_text(text: str, encoding: str = DEFAULT_ENCODING) -> int:
    # Special-token strings in user text ("<|endoftext|>") count as plain text, as OpenAI bills them.
    return count_tokens(text, encoding)


def count_long_text(text: str, encoding: str = DEFAULT_ENCODING) -> int:
    """``count_text`` a slice at a time: no single long call (in a thread, the GIL is free between slices)."""
    if len(text) <= MAX_SLICE_CHARS:
        return count_text(text, encoding)
    tally = TokenTally(encoding)
    tally.add(text)
    return tally.close()


class TokenTally:
    """Tokens of a text that arrives in pieces, counted a bounded slice at a time.

    Slices end at safe cuts, so the total is what counting the whole text at once gives (a
    token or so off per blind cut of a run without one). The caller counts a slice whenever
    ``ready``, so it can let other work run between two slices.
    """

    def __init__(self, encoding: str = DEFAULT_ENCODING) -> None:
        self.encoding = encoding
        self._safe_cut = _LAST_SAFE_CUT.get(encoding, _LAST_SAFE_CUT[CL100K])
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
        found = self._safe_cut.match(text, start, end)
        if found and found.end() > start:
            cut = found.end()
        elif end - start == MAX_SLICE_CHARS:
            cut = end
        else:  # no safe cut yet: look again once more text has come
            self._due = min(self.pending + SLICE_CHARS, MAX_SLICE_CHARS)
            return
        self.tokens += count_text(text[start:cut], self.encoding)
        self._start = cut
        self.pending -= cut - start
        self._due = SLICE_CHARS

    def close(self) -> int:
        """The total, counting what is still pending (short once ``ready`` is drained)."""
        while self.ready:
            self.count_slice()
        self.tokens += count_text(self.uncounted, self.encoding)
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


def count_chat_prompt(messages: Iterable[dict[str, Any]], encoding: str = DEFAULT_ENCODING) -> int:
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
