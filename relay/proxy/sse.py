"""Incremental Server-Sent Events framing and metering of an OpenAI chat stream. Pure.

``SSEDecoder`` turns network chunks into whole events (httpx's decode/flush shape);
``StreamMeter`` looks at each event once: it learns the upstream's usage, the text
delivered so far (for counting when no usage comes), and whether the event should reach
the client (the usage chunk relay asked for is dropped unless the client asked too).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

DONE = b"[DONE]"


class SSEDecoder:
    def __init__(self) -> None:
        self._buf = b""

    def decode(self, chunk: bytes) -> list[bytes]:
        """Complete events in arrival order, each ending with its blank line."""
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf
            return []
        self._buf = buf[end + 2:]
        return [e + b"\n\n" for e in buf[:end].split(b"\n\n") if e.strip()]

    def flush(self) -> bytes:
        """Bytes of an unfinished event at the end of the stream."""
        rest, self._buf = self._buf, b""
        return rest


def event_data(event: bytes) -> bytes:
    """The joined ``data:`` lines of one event."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


def parse_usage(obj: object) -> Usage | None:
    """The upstream's token counts, when they are counts: a boolean, a float or a negative
    number is no count, and then relay counts itself. Without ``completion_tokens`` (the
    embeddings API) the completion is what ``total_tokens`` holds beyond the prompt."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if c is None and _is_count(usage.get("total_tokens")) and _is_count(p):
        c = usage["total_tokens"] - p
    if _is_count(p) and _is_count(c):
        return Usage(p, c)
    return None


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


class StreamMeter:
    def __init__(self, forward_usage_chunk: bool) -> None:
        self.forward_usage_chunk = forward_usage_chunk
        self.usage: Usage | None = None
        self.done = False
        self.events = 0
        self.malformed = 0
        self._text: list[str] = []

    def accept(self, event: bytes) -> bool:
        """Record one event; True when it should be sent to the client."""
        data = event_data(event)
        if data == DONE:
            self.done = True
            return True
        if all(line.startswith(b":") for line in event.split(b"\n") if line):
            return True  # comments only: keep-alives some upstreams send, which SSE parsers skip
        try:
            obj = json.loads(data)
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
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict):
                    self._collect(delta)
            if usage is not None and not choices and not self.forward_usage_chunk:
                return False
        return True

    def _collect(self, delta: dict) -> None:
        content = delta.get("content")
        if isinstance(content, str):
            self._text.append(content)
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                for part in (fn.get("name"), fn.get("arguments")):
                    if isinstance(part, str):
                        self._text.append(part)

    @property
    def delivered_text(self) -> str:
        return "".join(self._text)
