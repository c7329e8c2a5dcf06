"""POST /v1/chat/completions, JSON and server-sent events, as OpenAI sends them."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from tornado.iostream import StreamClosedError

from relay.fake_upstream.base import HangUpRecorded
from relay.fake_upstream.state import MODELS, chat_usage, error_body, reply_pieces
from relay.http_server import hang_up
from relay.metering.tokens import count_chat_prompt, count_text


class ChatHandler(HangUpRecorded):
    async def post(self) -> None:
        body = self.parse()
        self.record(body)
        if body is None or not await self.check():
            return
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(messages, list):
            return self.write_json(error_body("'messages' is a required property", "invalid_request_error",
                                               None), 400)
        if model not in MODELS:
            return self.write_json(error_body(f"The model `{model}` does not exist", "invalid_request_error",
                                               "model_not_found"), 404)
        b = self.state.behaviour
        if b.broken == "invalid_json":
            self.set_header("Content-Type", "application/json")
            self.finish(b'{"id": "chatcmpl-broken", "choices": [')
            return
        if b.broken == "html":
            self.set_header("Content-Type", "text/html")
            self.finish(b"<html><body><h1>502 Bad Gateway</h1>cloudflare</body></html>")
            return
        n = b.reply_tokens
        if isinstance(body.get("max_tokens"), int):
            n = min(n, body["max_tokens"])
        pieces = reply_pieces(n)
        prompt = count_chat_prompt(messages)
        completion = count_text("".join(pieces))
        usage = chat_usage(prompt, completion, b)
        if b.usage_override is not None:
            usage = b.usage_override  # what a buggy or lying upstream reports, whatever it delivered
        cid = f"chatcmpl-fake{self.state.counter}"
        created = int(time.time())
        if body.get("stream") is True:
            opts = body.get("stream_options") or {}
            await self.stream(cid, created, model, pieces, usage, bool(opts.get("include_usage")))
            return
        self.write_json({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                         "logprobs": None, "finish_reason": "length" if n < b.reply_tokens else "stop"}],
            "usage": None if b.omit_usage else usage, "system_fingerprint": "fp_fake"})

    async def stream(self, cid: str, created: int, model: str, pieces: list[str], usage: dict[str, Any],
                     include_usage: bool) -> None:
        b = self.state.behaviour
        sent_at = self.rec["chunks_sent_at"]
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        with_usage = include_usage and not b.omit_usage

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, choices: bool = True,
                  usage_value: dict[str, Any] | None = None) -> bytes:
            obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": "fp_fake",
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                   if choices else []}
            if with_usage:
                obj["usage"] = usage_value
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        for p in pieces:
            events.append(chunk({"content": p}))
            if b.broken == "sse_garbage":
                events.append(b"data: {not json at all\n\n: a comment line\n\nrandom garbage\n\n")
        events.append(chunk({}, finish="stop"))
        if with_usage:
            events.append(chunk(None, choices=False, usage_value=usage))
        events.append(b"data: [DONE]\n\n")
        try:
            for i, event in enumerate(events):
                if i and b.chunk_delay:
                    await asyncio.sleep(b.chunk_delay)
                content_sent = i - 1  # events[0] is the role chunk, with no content
                if b.stall_after_chunks is not None and content_sent >= b.stall_after_chunks:
                    await asyncio.sleep(3600)
                if b.truncate_after_chunks is not None and content_sent >= b.truncate_after_chunks:
                    hang_up(self.request.connection)
                    return
                self.write(event)
                await self.flush()
                sent_at.append(time.monotonic())
            self.finish()
        except StreamClosedError:
            self.rec["aborted"] = True  # relay hung up: the upstream's work stops

