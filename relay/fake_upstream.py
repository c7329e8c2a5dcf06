"""An OpenAI-compatible fake upstream: for trying relay offline and for tests.

It speaks OpenAI's wire format (chat completions as JSON and as SSE chunks, embeddings,
models, error bodies) with deterministic replies, so token counts are predictable. It can be
told to misbehave (``Behaviour``) in-process or through ``POST /_fake/behaviour``, and it
records what it was sent (``GET /_fake/requests``) so tests can check what relay forwarded.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import StreamClosedError

from relay.metering.tokens import count_chat_prompt, count_embedding_input, count_text

PIECES = ["Hello", " from", " the", " fake", " upstream", ",", " relay", " says", " hi", "!"]
MODELS = ["gpt-3.5-turbo-1106", "gpt-3.5-turbo", "gpt-3.5-turbo-16k", "gpt-4", "gpt-4-32k",
          "gpt-4-1106-preview", "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini",
          "gpt-5", "gpt-5-mini", "gpt-5-nano", "text-embedding-ada-002", "text-embedding-3-small",
          "text-embedding-3-large"]
EMBEDDING_DIM = 8


def reply_pieces(n: int) -> list[str]:
    return [PIECES[i % len(PIECES)] for i in range(n)]


@dataclass
class Behaviour:
    reply_tokens: int = 10           # pieces in a reply (each one token in cl100k)
    status: int | None = None        # answer every request with this error status
    error_code: str | None = None    # OpenAI error code in that body (invalid_api_key, ...)
    retry_after: int | None = None   # Retry-After header on errors
    first_byte_delay: float = 0.0    # seconds before the response starts
    chunk_delay: float = 0.0         # seconds between stream chunks
    stall_after_chunks: int | None = None     # stop sending (hang) after N content chunks
    truncate_after_chunks: int | None = None  # close the connection after N content chunks
    omit_usage: bool = False         # never report usage (relay must count itself)
    # Report exactly this as ``usage`` (JSON replies, the stream's usage chunk).
    usage_override: dict[str, Any] | None = None
    cached_tokens: int = 0           # this much of each prompt is reported as read from the cache
    reasoning_tokens: int = 0        # thinking before the reply: reported, billed, never shown
    key_status: dict[str, int] = field(default_factory=dict)  # per upstream key: answer with this status
    broken: str | None = None        # "invalid_json", "html" (a 200 error page), "sse_garbage"


def _error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class FakeState:
    def __init__(self, keys: set[str] | None = None, max_records: int = 10_000) -> None:
        self.keys = keys
        self.behaviour = Behaviour()
        self.requests: deque[dict[str, Any]] = deque(maxlen=max_records)
        self.counter = 0

    def reset(self) -> None:
        self.behaviour = Behaviour()
        self.requests.clear()


def chat_usage(prompt: int, text: int, b: Behaviour) -> dict[str, Any]:
    """Usage as OpenAI reports it for today's models: the cached part of the prompt and the
    reasoning part of the completion in their details."""
    completion = text + b.reasoning_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(b.cached_tokens, prompt), "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": b.reasoning_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


class _FakeHandler(tornado.web.RequestHandler):
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
            self.write_json(_error_body(f"Incorrect API key provided: {masked}. You can find your API key "
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
            self.write_json(_error_body(f"fake upstream failure {status} (key {key})",
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
            self.write_json(_error_body("We could not parse the JSON body of your request.",
                                        "invalid_request_error", None), 400)
            return None
        return body


class ChatHandler(_FakeHandler):
    async def post(self) -> None:
        body = self.parse()
        self.record(body)
        if body is None or not await self.check():
            return
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(messages, list):
            return self.write_json(_error_body("'messages' is a required property", "invalid_request_error",
                                               None), 400)
        if model not in MODELS:
            return self.write_json(_error_body(f"The model `{model}` does not exist", "invalid_request_error",
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
                    # Tornado's HTTPServer serves every request on an HTTP1Connection.
                    cast(HTTP1Connection, self.request.connection).stream.close()
                    return
                self.write(event)
                await self.flush()
                sent_at.append(time.monotonic())
            self.finish()
        except StreamClosedError:
            self.rec["aborted"] = True  # relay hung up: the upstream's work stops

    def on_connection_close(self) -> None:
        if hasattr(self, "rec"):
            self.rec["aborted"] = True


class EmbeddingsHandler(_FakeHandler):
    async def post(self) -> None:
        body = self.parse()
        self.record(body)
        if body is None or not await self.check():
            return
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) and not all(isinstance(x, int) for x in inputs) else [inputs]
        data = []
        for i, item in enumerate(items):
            seed = hashlib.sha256(json.dumps(item).encode()).digest()
            vector = [((seed[j] / 255.0) * 2 - 1) for j in range(EMBEDDING_DIM)]
            value: str | list[float]
            if body.get("encoding_format") == "base64":
                value = base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vector)).decode()
            else:
                value = vector
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = count_embedding_input(inputs)
        usage = self.state.behaviour.usage_override
        self.write_json({"object": "list", "data": data, "model": body.get("model"),
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens} if usage is None else usage})


class ModelsHandler(_FakeHandler):
    async def get(self) -> None:
        self.record(None)
        if not await self.check():
            return
        self.write_json({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1686935002, "owned_by": "openai"} for m in MODELS]})


class ControlHandler(tornado.web.RequestHandler):
    def initialize(self, state: FakeState) -> None:
        self.state = state

    def get(self, what: str) -> None:
        if what == "requests":
            self.finish({"requests": [{k: v for k, v in r.items() if k != "headers"}
                                      for r in self.state.requests]})
        else:
            self.finish({"behaviour": dataclasses.asdict(self.state.behaviour)})

    def post(self, what: str) -> None:
        if what == "reset":
            self.state.reset()
        else:
            fields = {f.name for f in dataclasses.fields(Behaviour)}
            changes = {k: v for k, v in json.loads(self.request.body or b"{}").items() if k in fields}
            self.state.behaviour = dataclasses.replace(self.state.behaviour, **changes)
        self.finish({"behaviour": dataclasses.asdict(self.state.behaviour)})


def make_fake_app(state: FakeState, quiet: bool = False) -> tornado.web.Application:
    kw = {"state": state}
    settings: dict[str, Any] = {"log_function": lambda handler: None} if quiet else {}
    return tornado.web.Application([
        (r"/v1/chat/completions", ChatHandler, kw),
        (r"/v1/embeddings", EmbeddingsHandler, kw),
        (r"/v1/models", ModelsHandler, kw),
        (r"/_fake/(behaviour|requests|reset)", ControlHandler, kw),
    ], **settings)
