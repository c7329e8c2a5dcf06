"""A lean upstream fake for benchmarks: canned OpenAI replies over keep-alive HTTP/1.1.

A bare asyncio protocol (no framework) so that it is never the bottleneck; the benchmark
prints its own CPU per request. Paths: .../json/... a chat.completion; .../stream/... a
20-chunk chat.completion.chunk stream with the usage chunk and [DONE]; .../models a list.

    python bench/lean_upstream.py PORT
"""
from __future__ import annotations

import asyncio
import json
import sys

CHUNKS = 20


def canned() -> dict[str, bytes]:
    usage = {"prompt_tokens": 9, "completion_tokens": CHUNKS, "total_tokens": 9 + CHUNKS}
    reply = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench-json",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi " * CHUNKS},
                          "logprobs": None, "finish_reason": "stop"}], "usage": usage}
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "bench-stream"}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}], "usage": None}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": "hi "}, "finish_reason": None}], "usage": None}
               for _ in range(CHUNKS)]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None})
    events.append({**base, "choices": [], "usage": usage})
    stream = "".join(f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events) + "data: [DONE]\n\n"
    models = json.dumps({"object": "list", "data": [{"id": "bench-json", "object": "model"}]})

    def response(body: str, ctype: str) -> bytes:
        data = body.encode()
        return (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                f"Connection: keep-alive\r\n\r\n").encode() + data

    return {"json": response(json.dumps(reply, separators=(",", ":")), "application/json"),
            "stream": response(stream, "text/event-stream"), "models": response(models, "application/json")}


REPLIES = canned()


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
            kind = "models" if path.endswith("/models") else "stream" if "/stream/" in path else "json"
            self.transport.write(REPLIES[kind])


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
