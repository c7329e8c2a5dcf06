"""What every fake route does first: the key, injected failures, and a record of the request."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import tornado.web
from tornado.iostream import StreamClosedError

from relay.fake_upstream.state import FakeState, error_body
from relay.http_server import hang_up


class FakeHandler(tornado.web.RequestHandler):
    def initialize(self, state: FakeState) -> None:
        self.state = state

    def compute_etag(self) -> None:
        return None

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj))

    def _key(self) -> str:
        auth = self.request.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else ""

    async def check(self) -> bool:
        """Auth and injected failures, as OpenAI would answer them. False when answered."""
        b = self.state.behaviour
        key = self._key()
        self.state.counter += 1
        if self.state.keys is not None and key not in self.state.keys:
            # OpenAI echoes a partly masked key here; relay must not pass it on.
            masked = f"{key[:3]}{'*' * 8}{key[-4:]}" if len(key) > 8 else key
            self.write_json(error_body(f"Incorrect API key provided: {masked}. You can find your API key "
                                        f"at https://platform.openai.com/account/api-keys.",
                                        "invalid_request_error", "invalid_api_key"), 401)
            return False
        if b.first_byte_delay:
            await asyncio.sleep(b.first_byte_delay)
        status = b.key_status.get(key) or b.status
        if status:
            if b.retry_after is not None:
                self.set_header("Retry-After", str(b.retry_after))
            code = b.error_code or {429: "rate_limit_exceeded", 401: "invalid_api_key"}.get(status)
            self.write_json(error_body(f"fake upstream failure {status} (key {key})",
                                        "server_error" if status >= 500 else "invalid_request_error",
                                        code), status)
            return False
        return True

    def record(self, body: dict[str, Any] | None) -> None:
        body = body or {}
        self.rec: dict[str, Any] = {
            "path": self.request.path, "method": self.request.method, "model": body.get("model"),
            "authorization": self.request.headers.get("Authorization"), "stream": body.get("stream"),
            "stream_options": body.get("stream_options"), "max_tokens": body.get("max_tokens"),
            "received_at": time.monotonic(), "chunks_sent_at": [], "headers": dict(self.request.headers),
            "aborted": False,
        }
        self.state.requests.append(self.rec)

    def parse(self) -> dict[str, Any] | None:
        try:
            body = json.loads(self.request.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.write_json(error_body("We could not parse the JSON body of your request.",
                                        "invalid_request_error", None), 400)
            return None
        return body

    async def send_events(self, events: list[bytes], leading: int = 0) -> None:
        """A stream, event by event, misbehaving as told: delays, a stall or a cut after N content
        events (the first ``leading`` events carry no content)."""
        b = self.state.behaviour
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        try:
            for i, event in enumerate(events):
                if i and b.chunk_delay:
                    await asyncio.sleep(b.chunk_delay)
                content_sent = i - leading
                if b.stall_after_chunks is not None and content_sent >= b.stall_after_chunks:
                    await asyncio.sleep(3600)
                if b.truncate_after_chunks is not None and content_sent >= b.truncate_after_chunks:
                    hang_up(self.request.connection)
                    return
                self.write(event)
                await self.flush()
                self.rec["chunks_sent_at"].append(time.monotonic())
            self.finish()
        except StreamClosedError:
            self.rec["aborted"] = True  # relay hung up: the upstream's work stops


class HangUpRecorded(FakeHandler):
    """A streaming route: relay hanging up mid-answer is recorded (``aborted``). Not on
    FakeHandler itself: the WebSocket handler's own on_connection_close must stay."""

    def on_connection_close(self) -> None:
        if hasattr(self, "rec"):
            self.rec["aborted"] = True
