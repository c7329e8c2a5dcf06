"""The fake's Responses API objects: a response, its typed stream events, its input items and
usage, as OpenAI builds them (deterministic text, so token counts are predictable)."""
from __future__ import annotations

import json
import secrets
import time
from typing import Any

from relay.fake_upstream.state import Behaviour, FakeState, error_body, reply_pieces
from relay.metering.prompt import count_responses_request
from relay.metering.tokens import count_text

COMPACTION_TOKENS = 5  # what a compaction pass reports as its output


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def not_found(response_id: str) -> dict[str, Any]:
    return error_body(f"Response with id '{response_id}' not found.", "invalid_request_error", None)


def previous_not_found(response_id: str) -> dict[str, Any]:
    body = error_body(f"Previous response with id '{response_id}' not found.", "invalid_request_error",
                      "previous_response_not_found")
    body["error"]["param"] = "previous_response_id"
    return body


def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's input as the items GET /responses/{id}/input_items lists."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"id": new_id("msg"), "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": value}]}]
    items = value if isinstance(value, list) else []
    return [{"id": new_id("msg"), **item} if isinstance(item, dict) and "id" not in item else item for item in items]


def history_tokens(state: FakeState, key: str, body: dict[str, Any],
                   local: dict[str, dict[str, Any]] | None = None) -> int | None:
    """Tokens of the conversation a previous_response_id continues (its input and output);
    None when that response is unknown to this account."""
    previous = body.get("previous_response_id")
    if previous is None:
        return 0
    stored = (local or {}).get(previous) or state.responses.get(previous)
    if stored is None or stored["key"] != key:
        return None
    usage = stored["response"].get("usage") or {}
    return int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))


def usage_of(prompt: int, text: int, b: Behaviour) -> dict[str, Any]:
    output = text + b.reasoning_tokens
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": min(b.cached_tokens, prompt)},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": b.reasoning_tokens},
            "total_tokens": prompt + output}


class Turn:
    """One response being made: its object, then its events one by one."""

    def __init__(self, body: dict[str, Any], model: str, history: int, b: Behaviour) -> None:
        limit = body.get("max_output_tokens")
        n = min(b.reply_tokens, limit) if isinstance(limit, int) else b.reply_tokens
        self.pieces = reply_pieces(n)
        self.capped = n < b.reply_tokens
        prompt = count_responses_request(body, model).total + history
        self.usage = b.usage_override if b.usage_override is not None else \
            usage_of(prompt, count_text("".join(self.pieces)), b)
        self.omit_usage = b.omit_usage
        self.item_id = new_id("msg")
        self.response: dict[str, Any] = {
            "id": new_id("resp"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "background": False, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": limit, "model": model, "output": [],
            "parallel_tool_calls": True, "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None}, "store": body.get("store") is not False,
            "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled", "usage": None, "user": None, "metadata": {}}
        self.seq = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def message(self, done: bool) -> dict[str, Any]:
        content = [{"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}] if done else []
        return {"id": self.item_id, "type": "message", "status": "completed" if done else "in_progress",
                "role": "assistant", "content": content}

    def finished(self) -> dict[str, Any]:
        """The response as it ends: completed, or incomplete when max_output_tokens cut it."""
        return {**self.response, "status": "incomplete" if self.capped else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if self.capped else None,
                "output": [self.message(True)], "usage": None if self.omit_usage else self.usage}

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        obj = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return obj

    def events(self) -> list[dict[str, Any]]:
        """Every event of the stream, in OpenAI's order."""
        at = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        out = [self.event("response.created", response=self.response),
               self.event("response.in_progress", response=self.response),
               self.event("response.output_item.added", output_index=0, item=self.message(False)),
               self.event("response.content_part.added", **at, part=part)]
        out += [self.event("response.output_text.delta", **at, delta=p, logprobs=[]) for p in self.pieces]
        out += [self.event("response.output_text.done", **at, text=self.text, logprobs=[]),
                self.event("response.content_part.done", **at, part={**part, "text": self.text}),
                self.event("response.output_item.done", output_index=0, item=self.message(True))]
        final = self.finished()
        out.append(self.event("response.incomplete" if self.capped else "response.completed", response=final))
        return out


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def compaction(body: dict[str, Any], model: str, history: int, b: Behaviour) -> dict[str, Any]:
    prompt = count_responses_request(body, model).total + history
    users = [item for item in input_items(body) if item.get("role") == "user"]
    return {"id": new_id("cmp"), "object": "response.compaction", "created_at": int(time.time()),
            "output": [*users, {"id": new_id("cmp"), "type": "compaction", "encrypted_content": "fake-compacted"}],
            "usage": usage_of(prompt, COMPACTION_TOKENS, b) if b.usage_override is None else b.usage_override}
