"""Metering of a Responses API stream: typed events, as server-sent events or WebSocket
frames. Pure.

Usage comes with the final response (``response.completed``, ``.incomplete``, ``.failed``);
until then the delivered text (output text, refusals, tool-call arguments, reasoning
summaries) is counted as it passes, for an upstream that reports none."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay import fast_json
from relay.metering.quote import response_output_texts
from relay.metering.usage import parse_usage
from relay.proxy.sse import DONE, StreamMeter, event_data

FINAL_EVENTS = frozenset(("response.completed", "response.incomplete", "response.failed"))
# Billed as output: what the client sees, and the summaries of what it does not.
TEXT_DELTAS = frozenset((
    "response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta",
    "response.custom_tool_call_input.delta", "response.reasoning_summary_text.delta",
    "response.reasoning_text.delta", "response.code_interpreter_call_code.delta",
    "response.mcp_call_arguments.delta"))


class ResponsesStreamMeter(StreamMeter):
    """Usage, delivered text, the response's id and its end; every well-formed event passes."""

    def __init__(self) -> None:
        super().__init__(forward_usage_chunk=True)
        self.response_id: str | None = None
        self.on_response_id: Callable[[str], None] | None = None  # told once, when the upstream names it
        self.failed = False  # the upstream ended the response with an error
        self.started = False  # an event other than an error came: the response began

    def accept(self, event: bytes, short_digits: bool = False) -> bool:
        data = event_data(event)
        if not data:
            # Comments only (keep-alives), passed; an event with no data is of no use to a client.
            return all(line.startswith(b":") for line in event.split(b"\n") if line)
        if data == DONE:  # not OpenAI's, but some compatible upstreams end this way
            self.done = True
            return True
        return self.observe(data, short_digits)

    def reply_texts(self, reply: Any) -> list[str]:
        output = reply.get("output") if isinstance(reply, dict) else None
        return response_output_texts(output) if isinstance(output, list) else []

    def observe(self, data: bytes | str, short_digits: bool = False) -> bool:
        """Record one event's JSON; False when it is not a JSON object (garbage, dropped)."""
        try:
            obj = fast_json.loads(data, short_digits)
        except ValueError:
            self.malformed += 1
            return False
        if not isinstance(obj, dict):
            self.malformed += 1
            return False
        self.events += 1
        kind = obj.get("type")
        if kind != "error":
            self.started = True
        if kind in TEXT_DELTAS:
            delta = obj.get("delta")
            if isinstance(delta, str):
                self.text.add(delta)
        elif kind in FINAL_EVENTS:
            usage = parse_usage(obj.get("response"))
            if usage is not None:
                self.usage = usage
            self.failed = kind == "response.failed"
            self.done = True
        elif kind == "response.created" and self.response_id is None:
            response = obj.get("response")
            rid = response.get("id") if isinstance(response, dict) else None
            if isinstance(rid, str) and rid:
                self.response_id = rid
                if self.on_response_id is not None:
                    self.on_response_id(rid)
        elif kind == "error":
            self.failed = self.done = True
        return True
