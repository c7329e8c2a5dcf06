"""The Responses API's WebSocket mode (GET /v1/responses with an upgrade): ``response.create``
frames in, the same typed events as JSON text frames out, one response at a time.

Responses made with ``store: false`` can be continued on the same socket only, as OpenAI's
connection-local cache allows."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import tornado.websocket

from relay.fake_upstream.base import FakeHandler
from relay.fake_upstream.responses import check_create, store_turn
from relay.fake_upstream.responses_model import Turn, input_items


class ResponsesSocketHandler(FakeHandler, tornado.websocket.WebSocketHandler):
    async def prepare(self) -> None:
        self.record(None)
        self.rec["method"] = "WS"
        self.local: dict[str, dict[str, Any]] = {}
        self.turns: list[dict[str, Any]] = []
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()
        await self.check()  # a refused key or an injected failure answers the upgrade itself

    def on_message(self, message: str | bytes) -> None:
        # A task per frame: the frame loop keeps reading, so a close is seen mid-response.
        task = asyncio.ensure_future(self._frame(message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _frame(self, message: str | bytes) -> None:
        try:
            obj = json.loads(message)
        except ValueError:
            return self._send_error(400, "Invalid JSON in the WebSocket frame.", None)
        if not isinstance(obj, dict) or obj.get("type") != "response.create":
            return self._send_error(400, f"Unsupported event type: {obj.get('type') if isinstance(obj, dict) else obj}",
                                    "unsupported_event")
        body = {k: v for k, v in obj.items() if k != "type"}
        rec: dict[str, Any] = {"path": "/v1/responses", "method": "WS", "model": body.get("model"), "stream": None,
               "authorization": self.request.headers.get("Authorization"), "received_at": time.monotonic(),
               "chunks_sent_at": [], "aborted": False, "previous_response_id": body.get("previous_response_id")}
        self.state.requests.append(rec)
        self.turns.append(rec)
        async with self.lock:
            await self._respond(body, rec)

    async def _respond(self, body: dict[str, Any], rec: dict[str, Any]) -> None:
        checked = check_create(self, body, self.local)
        if isinstance(checked, dict):
            err = checked["error"]
            rec["done"] = True
            return self._send_error(404 if err["code"] == "model_not_found" else 400, err["message"], err["code"],
                                    err["param"])
        model, history = checked
        b = self.state.behaviour
        turn = Turn(body, model, history, b)
        rec["response_id"] = turn.response["id"]
        store_turn(self, body, turn)
        self.local[turn.response["id"]] = {"key": self._key(), "response": turn.finished(),
                                           "input_items": input_items(body)}
        deltas = 0
        for i, event in enumerate(turn.events()):
            if i and b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
            if event["type"] == "response.output_text.delta":
                if b.stall_after_chunks is not None and deltas >= b.stall_after_chunks:
                    await asyncio.sleep(3600)
                if b.truncate_after_chunks is not None and deltas >= b.truncate_after_chunks:
                    self.close(1011, "fake upstream broke off")
                    return
                deltas += 1
            try:
                await self.write_message(json.dumps(event, separators=(",", ":")))
            except tornado.websocket.WebSocketClosedError:
                rec["aborted"] = True
                return
            rec["chunks_sent_at"].append(time.monotonic())
        rec["done"] = True

    def _send_error(self, status: int, message: str, code: str | None, param: str | None = None) -> None:
        event = {"type": "error", "status": status,
                 "error": {"type": "invalid_request_error", "code": code, "message": message, "param": param}}
        try:
            self.write_message(json.dumps(event))
        except tornado.websocket.WebSocketClosedError:
            pass

    def on_close(self) -> None:
        for rec in self.turns:
            if not rec.get("done"):
                rec["aborted"] = True  # the peer left before this response's last event
        for task in self.tasks:
            task.cancel()
