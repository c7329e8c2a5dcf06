"""Incremental Server-Sent Events framing and metering of OpenAI's chat and legacy completion
streams. Pure. ``SSEDecoder`` cuts chunks into whole events; ``StreamMeter`` (chat) and
``CompletionStreamMeter`` read each event once."""
from __future__ import annotations

from typing import Any

from relay import fast_json
from relay.metering.quote import reply_texts
from relay.metering.tokens import TokenTally
from relay.metering.usage import Usage, parse_usage

DONE = b"[DONE]"


class SSEDecoder:
    """Network chunks in, whole events out; an unfinished event waits as a list of its chunks.

    Only the new chunk is searched for the blank line that ends an event, and the pending
    chunks are joined once, when their event is complete: an event that arrives in many
    chunks costs linear time, not a copy of everything pending per chunk.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._cr = False  # the last chunk ended in CR: whether it starts a CRLF is not known yet
        self.pending = 0  # bytes held for the unfinished event (the caller bounds it)
        # The events the last decode returned hold no 19 digits in a row (fast_json.loads's
        # short_digits): found with one search over them all instead of one per event.
        self.short_digits = True

    def decode(self, chunk: bytes) -> list[bytes]:
        """Complete events in arrival order, each ending with its blank line."""
        if self._cr or b"\r" in chunk:
            chunk = self._fold_crlf(chunk)
        if not chunk:
            return []
        end = chunk.rfind(b"\n\n")
        if end >= 0:
            done, rest = chunk[:end], chunk[end + 2:]
        elif chunk[0] == 10 and self._parts and self._parts[-1].endswith(b"\n"):
            # The blank line is split across two chunks: the event is all that was pending.
            self._parts[-1] = self._parts[-1][:-1]
            done, rest = b"", chunk[1:]
        else:
            self._parts.append(chunk)
            self.pending += len(chunk)
            return []
        if self._parts:
            self._parts.append(done)
            done = b"".join(self._parts)
            self._parts = []
        if rest:
            self._parts.append(rest)
        self.pending = len(rest) + self._cr
        self.short_digits = not fast_json.long_digits(done)
        return [e + b"\n\n" for e in done.split(b"\n\n") if e.strip()]

    def _fold_crlf(self, chunk: bytes) -> bytes:
        """CRLF to LF; a CR that ends a chunk is held back until the next byte is seen."""
        if self._cr and chunk:
            self._cr = False
            self.pending -= 1
            if not chunk.startswith(b"\n"):
                chunk = b"\r" + chunk
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
            if chunk.endswith(b"\r"):
                self._cr = True
                self.pending += 1
                chunk = chunk[:-1]
        return chunk

    def flush(self) -> bytes:
        """Bytes of an unfinished event at the end of the stream."""
        rest = b"".join(self._parts) + (b"\r" if self._cr else b"")
        self._parts, self._cr, self.pending = [], False, 0
        return rest


def event_data(event: bytes) -> bytes:
    """The joined ``data:`` lines of one event."""
    end = len(event) - 2
    if event.endswith(b"\n\n"):  # as SSEDecoder ends every event: one data line, after an event line or not,
        start = event.find(b"\n") + 1 if event.startswith(b"event:") else 0  # is nearly every event
        if event.startswith(b"data:", start) and event.find(b"\n", start) == end:
            return event[start + 5:end].lstrip(b" ")
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


class StreamMeter:
    """Usage, delivered text and [DONE] of one stream; the usage chunk relay asked for is
    dropped unless the client asked too."""

    def __init__(self, forward_usage_chunk: bool) -> None:
        self.forward_usage_chunk = forward_usage_chunk
        self.usage: Usage | None = None
        self.done = False
        self.events = 0
        self.malformed = 0
        # Counted as it passes (the caller runs its slices), in case no usage comes: the
        # text itself is not kept, so a long stream costs neither memory nor a long count.
        self.text = TokenTally()

    def count_with(self, encoding: str) -> None:
        """Count the delivered text with ``encoding``, the model's table (before any arrives)."""
        self.text = TokenTally(encoding)

    def accept(self, event: bytes, short_digits: bool = False) -> bool:
        """Record one event; True when it should be sent to the client. ``short_digits``: as
        ``SSEDecoder.short_digits`` says of the events it came with."""
        data = event_data(event)
        if data == DONE:
            self.done = True
            return True
        if not data and all(line.startswith(b":") for line in event.split(b"\n") if line):
            return True  # comments only: keep-alives some upstreams send, which SSE parsers skip
        try:
            obj = fast_json.loads(data, short_digits)
        except ValueError:
            # Garbage from a broken upstream would break the client's JSON parser: drop it.
            self.malformed += 1
            return False
        self.events += 1
        if not isinstance(obj, dict):
            self.malformed += 1
            return False
        usage = parse_usage(obj)
        if usage is not None:
            self.usage = usage
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._choice(choice)
            if usage is not None and not choices and not self.forward_usage_chunk:
                return False
        return True

    def _choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._collect(delta)

    def reply_texts(self, reply: Any) -> list[str]:
        """The texts of a JSON reply of this route billed as completion, when it reports no usage."""
        return reply_texts(reply)

    def completion_tokens(self, counted: int) -> int:
        """Completion tokens of the delivered text relay counted itself."""
        return counted

    def _collect(self, delta: dict[str, Any]) -> None:
        content = delta.get("content")
        if isinstance(content, str):
            self.text.add(content)
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                for part in (fn.get("name"), fn.get("arguments")):
                    if isinstance(part, str):
                        self.text.add(part)

    @property
    def delivered_text(self) -> str:
        """Delivered text not counted yet: all of it until a slice has been counted."""
        return self.text.uncounted


class CompletionStreamMeter(StreamMeter):
    """A legacy /completions stream (``choices[].text``); with ``echo`` each choice's text starts
    with its prompt, which is not completion: ``echoed`` tokens are taken off what relay counts."""

    def __init__(self, forward_usage_chunk: bool, echoed: int = 0) -> None:
        super().__init__(forward_usage_chunk)
        self.echoed = echoed

    def _choice(self, choice: dict[str, Any]) -> None:
        text = choice.get("text")
        if isinstance(text, str):
            self.text.add(text)

    def reply_texts(self, reply: Any) -> list[str]:
        choices = reply.get("choices") if isinstance(reply, dict) else None
        return [c["text"] for c in choices if isinstance(c, dict) and isinstance(c.get("text"), str)] \
            if isinstance(choices, list) else []

    def completion_tokens(self, counted: int) -> int:
        return max(counted - self.echoed, 0)
