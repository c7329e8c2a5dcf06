"""The Responses API as OpenAI serves it: POST /v1/responses (JSON or typed events), stored
responses by id (retrieve, delete, cancel, input_items), input_tokens and compact.

Each stored response belongs to the key that made it, as to an OpenAI account: another key
gets 404. The WebSocket mode is in responses_ws.py."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from tornado.iostream import StreamClosedError

from relay.fake_upstream.base import FakeHandler, HangUpRecorded
from relay.fake_upstream.responses_model import (
    Turn,
    compaction,
    history_tokens,
    input_items,
    not_found,
    previous_not_found,
    sse,
)
from relay.fake_upstream.state import MODELS, error_body
from relay.http_server import hang_up
from relay.metering.prompt import count_responses_request


def check_create(handler: FakeHandler, body: dict[str, Any],
                 local: dict[str, dict[str, Any]] | None = None) -> tuple[str, int] | dict[str, Any]:
    """(model, history tokens) of a create request, or the error OpenAI would answer."""
    model = body.get("model")
    if not isinstance(model, str) or model not in MODELS:
        return error_body(f"The model `{model}` does not exist", "invalid_request_error", "model_not_found")
    history = history_tokens(handler.state, handler._key(), body, local)
    if history is None:
        return previous_not_found(str(body.get("previous_response_id")))
    return model, history


def store_turn(handler: FakeHandler, body: dict[str, Any], turn: Turn) -> None:
    if body.get("store") is not False:
        handler.state.responses[turn.response["id"]] = {
            "key": handler._key(), "response": turn.finished(), "input_items": input_items(body)}


class ResponsesHandler(HangUpRecorded):
    async def post(self) -> None:
        body = self.parse()
        self.record(body)
        if body is None or not await self.check():
            return
        self.rec["previous_response_id"] = body.get("previous_response_id")
        checked = check_create(self, body)
        if isinstance(checked, dict):
            return self.write_json(checked, 404 if checked["error"]["code"] == "model_not_found" else 400)
        model, history = checked
        turn = Turn(body, model, history, self.state.behaviour)
        self.rec["response_id"] = turn.response["id"]
        store_turn(self, body, turn)
        if body.get("stream") is True:
            await self.stream(turn)
        else:
            self.write_json(turn.finished())

    async def stream(self, turn: Turn) -> None:
        b = self.state.behaviour
        sent_at = self.rec["chunks_sent_at"]
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        deltas = 0
        try:
            for i, event in enumerate(turn.events()):
                if i and b.chunk_delay:
                    await asyncio.sleep(b.chunk_delay)
                if event["type"] == "response.output_text.delta":
                    if b.stall_after_chunks is not None and deltas >= b.stall_after_chunks:
                        await asyncio.sleep(3600)
                    if b.truncate_after_chunks is not None and deltas >= b.truncate_after_chunks:
                        hang_up(self.request.connection)
                        return
                    deltas += 1
                self.write(sse(event))
                if b.broken == "sse_garbage":
                    self.write(b"data: {not json at all\n\n: a comment line\n\nrandom garbage\n\n")
                await self.flush()
                sent_at.append(time.monotonic())
            self.finish()
        except StreamClosedError:
            self.rec["aborted"] = True


class StoredResponseHandler(FakeHandler):
    """GET and DELETE /v1/responses/{id}, POST .../cancel, GET .../input_items."""

    def _stored(self, response_id: str) -> dict[str, Any] | None:
        stored = self.state.responses.get(response_id)
        if stored is None or stored["key"] != self._key():
            self.write_json(not_found(response_id), 404)
            return None
        return stored

    async def _begin(self) -> bool:
        self.record(None)
        self.rec["query"] = self.request.query
        return await self.check()

    async def get(self, response_id: str, what: str | None = None) -> None:
        if not await self._begin() or (stored := self._stored(response_id)) is None:
            return
        if what == "input_items":
            items = stored["input_items"]
            return self.write_json({"object": "list", "data": items, "has_more": False,
                                    "first_id": items[0]["id"] if items else None,
                                    "last_id": items[-1]["id"] if items else None})
        self.write_json(stored["response"])

    async def delete(self, response_id: str, what: str | None = None) -> None:
        if not await self._begin() or self._stored(response_id) is None:
            return
        del self.state.responses[response_id]
        self.write_json({"id": response_id, "object": "response", "deleted": True})

    async def post(self, response_id: str, what: str | None = None) -> None:
        if not await self._begin() or (stored := self._stored(response_id)) is None:
            return
        if what != "cancel":
            return self.write_json(error_body("Unknown request URL.", "invalid_request_error", "unknown_url"), 404)
        if stored["response"]["status"] in ("queued", "in_progress"):
            stored["response"] = {**stored["response"], "status": "cancelled"}
        self.write_json(stored["response"])


class InputTokensHandler(FakeHandler):
    """POST /v1/responses/input_tokens: the input a create would bill, free of charge."""

    async def post(self) -> None:
        body = self.parse()
        self.record(body)
        if body is None or not await self.check():
            return
        history = history_tokens(self.state, self._key(), body)
        if history is None:
            return self.write_json(previous_not_found(str(body.get("previous_response_id"))), 400)
        tokens = count_responses_request(body, str(body.get("model") or "")).total + history
        self.write_json({"object": "response.input_tokens", "input_tokens": tokens})


class CompactHandler(FakeHandler):
    """POST /v1/responses/compact: the conversation compacted, billed like a response."""

    async def post(self) -> None:
        body = self.parse()
        self.record(body)
        if body is None or not await self.check():
            return
        checked = check_create(self, body)
        if isinstance(checked, dict):
            return self.write_json(checked, 404 if checked["error"]["code"] == "model_not_found" else 400)
        model, history = checked
        self.write_json(compaction(body, model, history, self.state.behaviour))
