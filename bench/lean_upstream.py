"""A lean upstream fake for benchmarks: canned OpenAI replies over keep-alive HTTP/1.1.

A bare asyncio protocol (no framework) so that it is never the bottleneck; the benchmark
prints its own CPU per request. The reply is chosen by the path:

- ``.../stream/...``: a 20-chunk chat.completion.chunk stream with the usage chunk and [DONE];
- ``.../rstream/...``: a Responses API stream of 20 typed events (created ... completed);
- ``.../tools/...``: a chat.completion whose message is a tool call;
- ``.../models``: a model list; anything else: a chat.completion.

    python bench/lean_upstream.py PORT
"""
from __future__ import annotations

import asyncio
import json
import sys

CHUNKS = 20


def _http(body: bytes, ctype: str) -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: keep-alive\r\n\r\n").encode() + body


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def responses_stream_body() -> bytes:
    """20 events: created, in_progress, item and part added, 12 deltas, text/part/item done, completed."""
    response = {"id": "resp_bench", "object": "response", "created_at": 1700000000, "status": "in_progress",
                "background": False, "error": None, "incomplete_details": None, "instructions": None,
                "max_output_tokens": 64, "model": "bench-resp", "output": [], "parallel_tool_calls": True,
                "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": True,
                "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
                "top_p": 1.0, "truncation": "disabled", "usage": None, "user": None, "metadata": {}}
    at = {"item_id": "msg_bench", "output_index": 0, "content_index": 0}
    item = {"id": "msg_bench", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    text = "hi " * 12
    done_item = {**item, "status": "completed", "content": [{**part, "text": text}]}
    usage = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 12,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 21}
    events = [("response.created", {"response": response}), ("response.in_progress", {"response": response}),
              ("response.output_item.added", {"output_index": 0, "item": item}),
              ("response.content_part.added", {**at, "part": part})]
    events += [("response.output_text.delta", {**at, "delta": "hi ", "logprobs": []})] * 12
    events += [("response.output_text.done", {**at, "text": text, "logprobs": []}),
               ("response.content_part.done", {**at, "part": {**part, "text": text}}),
               ("response.output_item.done", {"output_index": 0, "item": done_item}),
               ("response.completed", {"response": {**response, "status": "completed", "output": [done_item],
                                                    "usage": usage}})]
    assert len(events) == 20
    return "".join(f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': i, **fields})}\n\n"
                   for i, (kind, fields) in enumerate(events)).encode()


def canned() -> dict[str, bytes]:
    usage = {"prompt_tokens": 9, "completion_tokens": CHUNKS, "total_tokens": 9 + CHUNKS}
    reply = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench-json",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi " * CHUNKS},
                          "logprobs": None, "finish_reason": "stop"}], "usage": usage}
    call = {"id": "call_bench", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    tools = {**reply, "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                                   "logprobs": None, "finish_reason": "tool_calls"}],
             "usage": {"prompt_tokens": 240, "completion_tokens": 18, "total_tokens": 258,
                       "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": 85}}}
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "bench-stream"}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}], "usage": None}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": "hi "}, "finish_reason": None}], "usage": None}
               for _ in range(CHUNKS)]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None})
    events.append({**base, "choices": [], "usage": usage})
    stream = b"".join(b"data: " + _json(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    models = _json({"object": "list", "data": [{"id": "bench-json", "object": "model"}]})
    return {"json": _http(_json(reply), "application/json"), "tools": _http(_json(tools), "application/json"),
            "stream": _http(stream, "text/event-stream"),
            "rstream": _http(responses_stream_body(), "text/event-stream"),
            "models": _http(models, "application/json")}


REPLIES = canned()


def reply_for(path: str) -> bytes:
    if path.endswith("/models"):
        return REPLIES["models"]
    for kind in ("rstream", "stream", "tools"):
        if f"/{kind}/" in path:
            return REPLIES[kind]
    return REPLIES["json"]


class Upstream(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            path = head.split(" ", 2)[1]
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(reply_for(path))


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
