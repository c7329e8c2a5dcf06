"""Hostile upstreams: oversized bodies and events are refused, and no reply stalls the event loop.

The upstream writes raw HTTP on a detached Tornado stream: it announces, chunks and stalls at will.
"""
import asyncio
import json
import logging
import time

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.iostream import StreamClosedError

from relay.metering.tokens import count_text
from tests.conservation import assert_conserved, settled
from tests.helpers import PRICING, TEST_KEY, add_key, mock_store, serve

CHAT = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
MB = 1 << 20
QUOTA = 10 ** 12
WORDS = " the quick brown fox jumps over the lazy dog"
JSON_PIECE = WORDS * (256 * 1024 // len(WORDS))
DELTA = (WORDS * 23)[:1000]  # starts with a space, ends in a letter: deltas join at word boundaries
SMALL_REPLY = {"id": "chatcmpl-small", "object": "chat.completion", "created": 0, "model": "gpt-4",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}}


# --- a hostile upstream ----------------------------------------------------------------

def _head(status: int = 200, content_type: str = "application/json", length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _delta(content: str) -> bytes:
    return _event({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4",
                   "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})


class Script:
    """What the upstream does with a chat whose last message is "big"; other chats get SMALL_REPLY."""

    def __init__(self, mode: str, size: int = 50 * MB):
        self.mode, self.size = mode, size
        self.sent = 0                   # body bytes written for the big request
        self.interrupted = False        # relay closed that connection before the body was complete
        self.halfway = asyncio.Event()  # big_json: this much is out, and it waits for `resume`
        self.resume = asyncio.Event()
        self.closed = asyncio.Event()   # the connection of the big request is closed
        self.ended = asyncio.Event()    # ... and the script is over: `interrupted` is settled

    async def write(self, stream, data: bytes) -> None:
        self.sent += len(data)
        await stream.write(data)

    async def big_json(self, stream) -> None:
        """A 200 chat reply of `size` bytes of text, chunked, with no usage: relay would count it all."""
        await stream.write(_head())
        await self.write(stream, _chunk(b'{"id":"chatcmpl-big","object":"chat.completion","created":0,'
                                        b'"model":"gpt-4","choices":[{"index":0,"message":{"role":"assistant",'
                                        b'"content":"'))
        piece = _chunk(JSON_PIECE.encode())
        self.pieces = 0
        while self.sent < self.size:
            await self.write(stream, piece)
            self.pieces += 1
            if self.sent > 8 * MB and not self.halfway.is_set():
                self.halfway.set()
                await asyncio.wait_for(self.resume.wait(), 20)
        await self.write(stream, _chunk(b'"},"finish_reason":"stop"}]}') + b"0\r\n\r\n")

    async def announced_json(self, stream) -> None:
        """Content-Length says `size`; a few bytes come, then nothing."""
        await stream.write(_head(length=self.size) + b'{"id":"chatcmpl-big",')
        await asyncio.wait_for(self.closed.wait(), 30)

    async def big_error(self, stream) -> None:
        """A 400 whose error body is `size` bytes."""
        await stream.write(_head(400))
        await self.write(stream, _chunk(b'{"error":{"type":"invalid_request_error","code":null,"param":null,'
                                        b'"message":"'))
        piece = _chunk(b"x" * (64 * 1024))
        while self.sent < self.size:
            await self.write(stream, piece)
        await self.write(stream, _chunk(b'"}}') + b"0\r\n\r\n")

    async def long_stream(self, stream) -> None:
        """`size` bytes of text in 1000-character deltas, never a usage chunk."""
        await stream.write(_head(content_type="text/event-stream"))
        block = _chunk(_delta(DELTA) * 64)
        self.deltas = 0
        while self.deltas * len(DELTA) < self.size:
            await self.write(stream, block)
            self.deltas += 64
        await self.write(stream, _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    async def big_event(self, stream) -> None:
        """Two small deltas, then one event of `size` bytes in 64 KB writes, then more for as long as relay reads."""
        await stream.write(_head(content_type="text/event-stream"))
        for text in ("Hello", " world"):
            await self.write(stream, _chunk(_delta(text)))
            await asyncio.sleep(0.05)
        big = _delta("z" * self.size)
        for i in range(0, len(big), 64 * 1024):
            await self.write(stream, _chunk(big[i:i + 64 * 1024]))
        for _ in range(200):
            await self.write(stream, _chunk(_delta(" more")))
            await asyncio.sleep(0.05)
        await self.write(stream, _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


class HostileChat(tornado.web.RequestHandler):
    def initialize(self, script: Script) -> None:
        self.script = script

    async def post(self) -> None:
        body = json.loads(self.request.body)
        if body["messages"][-1]["content"] != "big":
            self.set_header("Content-Type", "application/json")
            return self.finish(json.dumps(SMALL_REPLY))
        stream = self.detach()
        stream.set_close_callback(self.script.closed.set)
        try:
            await getattr(self.script, self.script.mode)(stream)
        except (TimeoutError, StreamClosedError):
            self.script.interrupted = True
        finally:
            stream.close()
            self.script.ended.set()


class Models(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"object": "list", "data": []})


class Upstream:
    def __init__(self, script: Script):
        self.script = script
        sock, self.port = tornado.testing.bind_unused_port()
        app = tornado.web.Application([(r"/v1/chat/completions", HostileChat, {"script": script}),
                                       (r"/v1/models", Models)], log_function=lambda h: None)
        self.server = tornado.httpserver.HTTPServer(app)
        self.server.add_socket(sock)

    def config(self, leases: bool, extra: str = "") -> str:
        return (f"upstreams:\n  - {{name: hostile, base_url: 'http://127.0.0.1:{self.port}/v1', keys: [sk-h1]}}\n"
                f"quota: {{leases: {str(leases).lower()}}}\n{PRICING}\n{extra}")


# --- what the tests measure -------------------------------------------------------------

class LagProbe:
    """The event loop's longest lateness: a task sleeps 5 ms in a loop and records each overshoot."""

    def __init__(self):
        self.worst = 0.0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, loop.time() - started - 0.005)

    async def __aenter__(self):
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    def check(self, bound: float = 0.2) -> None:
        assert self.worst < bound, f"the event loop stalled for {self.worst * 1000:.0f} ms (bound {bound * 1000:.0f})"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux: clear_refs 5) and return the RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def client() -> AsyncHTTPClient:
    return AsyncHTTPClient(force_instance=True, max_clients=10, defaults={"request_timeout": 60})


async def chat(c, url: str, content: str, stream: bool = False, **kw):
    return await c.fetch(url + CHAT, method="POST", raise_error=False, headers=AUTH, **kw,
                         body=json.dumps({"model": "gpt-4", "stream": stream,
                                          "messages": [{"role": "user", "content": content}]}))


def openai_error(resp) -> dict:
    body = json.loads(resp.body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "sk-h1" not in resp.body.decode()
    return body["error"]


async def ledger(store, n: int, timeout: float = 30.0) -> list[dict]:
    """The ledger once it holds n entries (settlement follows the response; leases commit in groups)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(docs := await store.ledger_entries()) < n:
        assert loop.time() < deadline, f"{n} ledger entries expected"
        await asyncio.sleep(0.02)
    return docs


async def closed_and_conserved(server, services, store) -> dict:
    """Stop relay (a lease is committed and handed back), then check every unit is accounted for."""
    server.stop()
    await services.close()
    await settled(store)
    [doc] = await assert_conserved(store)
    return doc


@pytest.fixture(params=[False, True], ids=["holds", "leases"])
def leases(request):
    return request.param


async def start(script: Script, leases: bool, extra: str = ""):
    upstream = Upstream(script)
    store = mock_store()
    await add_key(store, quota=QUOTA)
    url, server, services = await serve(upstream.config(leases, extra), store)
    return upstream, store, url, server, services


# --- (a) a 50 MB JSON reply ---------------------------------------------------------------

async def test_a_50_mb_json_reply_is_refused_refunded_and_stalls_nothing(io_loop, leases, caplog):
    caplog.set_level(logging.INFO, logger="relay.access")
    upstream, store, url, server, services = await start(Script("big_json"), leases)
    c = client()
    assert (await chat(c, url, "hi")).code == 200  # warm: the token tables load on the first request
    rss_before = reset_peak_rss()
    async with LagProbe() as lag:
        big = asyncio.ensure_future(chat(c, url, "big"))
        await asyncio.wait_for(upstream.script.halfway.wait(), 20)
        small = await chat(c, url, "hi")  # while relay holds 8 MB of the big reply
        upstream.script.resume.set()
        resp = await big
    assert small.code == 200 and json.loads(small.body)["choices"][0]["message"]["content"] == "Hi!"
    err = openai_error(resp)
    assert resp.code == 502 and (err["type"], err["code"]) == ("upstream_error", "upstream_response_too_large")
    assert upstream.script.interrupted and upstream.script.sent < 48 * MB, "relay stopped reading at the cap"
    assert "status=502" in caplog.text and "flag=upstream_response_too_large" in caplog.text
    assert "sk-h1" not in caplog.text
    growth = peak_rss() - rss_before
    assert growth < 200 * MB, f"peak RSS grew by {growth / MB:.0f} MB"
    lag.check()
    doc = await closed_and_conserved(server, services, store)
    entries = await ledger(store, 2)
    assert small.headers["X-Request-Id"] in {e["_id"] for e in entries}
    assert resp.headers["X-Request-Id"] not in {e["_id"] for e in entries}, "the refused request is not charged"
    assert len(entries) == 2 and doc["balance"] == QUOTA - sum(e["cost"] for e in entries)
    upstream.server.stop()
    c.close()


async def test_a_20_mb_json_reply_under_the_cap_is_parsed_and_counted_off_the_loop(io_loop, leases):
    script = Script("big_json", size=20 * MB)
    script.resume.set()
    upstream, store, url, server, services = await start(script, leases)
    c = client()
    assert (await chat(c, url, "hi")).code == 200  # warm: the token tables load on the first request
    async with LagProbe() as lag:
        resp = await chat(c, url, "big")
    assert resp.code == 200 and len(resp.body) > 20 * MB
    lag.check()
    entries = {e["_id"]: e for e in await ledger(store, 2)}
    billed = entries[resp.headers["X-Request-Id"]]
    assert billed["completion_tokens"] == script.pieces * count_text(JSON_PIECE), "its text, counted"
    await closed_and_conserved(server, services, store)
    upstream.server.stop()
    c.close()


async def test_a_body_announced_over_the_cap_is_refused_before_it_is_read(io_loop, leases):
    upstream, store, url, server, services = await start(Script("announced_json"), leases,
                                                         "timeouts: {idle_s: 5}")
    c = client()
    started = time.monotonic()
    resp = await chat(c, url, "big")
    err = openai_error(resp)
    assert resp.code == 502 and err["code"] == "upstream_response_too_large", resp.body
    assert time.monotonic() - started < 4, "refused on the headers, not after waiting for the body"
    await asyncio.wait_for(upstream.script.closed.wait(), 5)  # the upstream connection is dropped
    doc = await closed_and_conserved(server, services, store)
    assert doc["balance"] == QUOTA and doc["used"] == 0
    upstream.server.stop()
    c.close()


async def test_an_upstream_error_body_is_bounded_too(io_loop, leases):
    upstream, store, url, server, services = await start(Script("big_error", size=50 * MB), leases,
                                                         "retries: {max_attempts: 1}")
    c = client()
    resp = await chat(c, url, "big")
    err = openai_error(resp)
    assert resp.code == 502 and err["code"] == "upstream_response_too_large", resp.body[:200]
    assert len(resp.body) < 1000
    await asyncio.wait_for(upstream.script.ended.wait(), 5)
    assert upstream.script.interrupted and upstream.script.sent < 20 * MB, "relay stopped reading at 1 MiB"
    doc = await closed_and_conserved(server, services, store)
    assert doc["balance"] == QUOTA
    upstream.server.stop()
    c.close()


# --- (b) a 50 MB stream without usage ------------------------------------------------------

@pytest.mark.timeout(seconds=120)
async def test_a_50_mb_stream_without_usage_is_counted_without_stalling_the_loop(io_loop, leases):
    upstream, store, url, server, services = await start(Script("long_stream"), leases)
    c = client()
    assert (await chat(c, url, "hi")).code == 200  # warm: the token tables load on the first request
    received, tail = [], [b""]

    def on_chunk(data: bytes) -> None:
        received.append(len(data))
        tail[0] = (tail[0] + data)[-14:]

    async with LagProbe() as lag:
        big = asyncio.ensure_future(chat(c, url, "big", stream=True, streaming_callback=on_chunk))
        while sum(received) < 5 * MB:
            await asyncio.sleep(0.01)
        asked = time.monotonic()
        small = await chat(c, url, "hi")
        small_took = time.monotonic() - asked
        resp = await big
    assert resp.code == 200 and small.code == 200
    assert tail[0] == b"data: [DONE]\n\n" and sum(received) > 50 * MB
    lag.check()
    assert small_took < 1.0, f"a short request took {small_took:.2f} s beside the stream"
    entries = {e["_id"]: e for e in await ledger(store, 3)}
    billed = entries[resp.headers["X-Request-Id"]]
    deltas = upstream.script.deltas
    assert billed["completion_tokens"] == deltas * count_text(DELTA), "billed exactly what it counted"
    await closed_and_conserved(server, services, store)
    upstream.server.stop()
    c.close()


# --- (c) one event over max_event_bytes ------------------------------------------------------

@pytest.mark.parametrize("size, extra", [(5 * MB, ""), (8000, "limits: {max_event_bytes: 4096}")],
                         ids=["default-limit-over-many-chunks", "small-limit-in-one-chunk"])
async def test_an_oversized_event_ends_the_stream_and_bills_what_came_before(io_loop, leases, size, extra, caplog):
    caplog.set_level(logging.INFO, logger="relay.access")
    upstream, store, url, server, services = await start(Script("big_event", size=size), leases, extra)
    c = client()
    resp = await chat(c, url, "big", stream=True)
    assert resp.code == 200
    assert len(resp.body) < 4096, f"{len(resp.body)} bytes: the oversized event reached the client"
    events = [e for e in resp.body.split(b"\n\n") if e]
    contents = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events]
    assert contents == ["Hello", " world"], "the stream ends before the oversized event"
    await asyncio.wait_for(upstream.script.ended.wait(), 5)
    assert upstream.script.interrupted, "the upstream connection is closed"
    assert "flag=upstream_event_too_large" in caplog.text and "sk-h1" not in caplog.text
    [entry] = await ledger(store, 1)
    assert entry["completion_tokens"] == count_text("Hello world") and entry["status"] == 200
    doc = await closed_and_conserved(server, services, store)
    assert doc["used"] == entry["cost"] > 0
    upstream.server.stop()
    c.close()
