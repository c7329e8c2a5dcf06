"""relay's HTTP/1.1 server (relay/http_server.py) over real sockets: what Tornado's server did and
the handlers rely on (keep-alive, pipelining, streamed request bodies, 100-continue, HTTP/1.0,
the limits, the client-gone signals, the WebSocket hand-off)."""
import asyncio
import json

import tornado.web
import tornado.websocket

from relay.http_server import HTTPServer
from tests.helpers import eventually, unused_port

EVENTS: list[str] = []


class Echo(tornado.web.RequestHandler):
    def get(self):
        self.write({"path": self.request.path, "query": self.get_query_argument("q", ""),
                    "ip": self.request.remote_ip, "host": self.request.host})

    def post(self):
        self.write({"got": len(self.request.body), "type": self.request.headers.get("Content-Type", "")})

    def head(self):
        self.set_header("Content-Length", "12")


class Streamed(tornado.web.RequestHandler):
    """Chunks of the answer flushed one by one: chunked on the wire."""

    async def get(self):
        for i in range(3):
            self.write(f"part{i};")
            await self.flush()


@tornado.web.stream_request_body
class Upload(tornado.web.RequestHandler):
    def prepare(self):
        self.size = 0
        self.pieces = 0
        if self.request.headers.get("Authorization") != "yes":
            self.set_status(401)
            self.finish("no")

    async def data_received(self, chunk):
        await asyncio.sleep(0.001)  # a handler that waits: reading pauses meanwhile
        self.size += len(chunk)
        self.pieces += 1

    def put(self):
        self.write({"size": self.size})

    def on_connection_close(self):
        EVENTS.append("upload gone")


class Slow(tornado.web.RequestHandler):
    async def get(self):
        self.request.connection.set_close_callback(lambda: EVENTS.append("slow gone"))
        await asyncio.sleep(10)

    def on_connection_close(self):
        EVENTS.append("slow handler told")


class EchoSocket(tornado.websocket.WebSocketHandler):
    def on_message(self, message):
        self.write_message("echo:" + message)


def serve(**limits) -> tuple[HTTPServer, int]:
    app = tornado.web.Application([(r"/echo", Echo), (r"/streamed", Streamed), (r"/upload", Upload),
                                   (r"/slow", Slow), (r"/ws", EchoSocket)])
    server = HTTPServer(app, **limits)
    port = unused_port()
    server.listen(port, "127.0.0.1")
    return server, port


async def exchange(port: int, raw: bytes, until_close: bool = True, wait: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    got = b""
    try:
        while True:
            piece = await asyncio.wait_for(reader.read(65536), wait)
            if not piece:
                break
            got += piece
    except TimeoutError:
        assert not until_close, f"the connection stayed open; got {got!r}"
    writer.close()
    await writer.wait_closed()
    return got


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(io_loop):
    server, port = serve()
    two = (b"GET /echo?q=1 HTTP/1.1\r\nHost: a\r\n\r\n"
           b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Type: text/x\r\nContent-Length: 5\r\n\r\nhello"
           b"GET /echo?q=3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    got = await exchange(port, two)
    answers = got.split(b"HTTP/1.1 200 OK")
    assert len(answers) == 4, got
    assert b'"query": "1"' in answers[1] and b'"ip": "127.0.0.1"' in answers[1]
    assert b'"got": 5' in answers[2] and b'"type": "text/x"' in answers[2]
    assert b'"query": "3"' in answers[3] and b"Connection: close" in answers[3]
    await eventually(lambda: not server._connections, message="closed connections are forgotten")
    server.stop()


async def test_an_answer_without_length_is_chunked_and_a_head_answer_has_no_body(io_loop):
    server, port = serve()
    got = await exchange(port, b"GET /streamed HTTP/1.1\r\nHost: a\r\n\r\nHEAD /echo HTTP/1.1\r\nHost: a\r\n\r\n",
                         until_close=False, wait=0.5)
    head, _, rest = got.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert rest.startswith(b"6\r\npart0;\r\n6\r\npart1;\r\n6\r\npart2;\r\n0\r\n\r\nHTTP/1.1 200 OK"), rest
    second_head, _, after = rest.split(b"0\r\n\r\n", 1)[1].partition(b"\r\n\r\n")
    assert b"Content-Length: 12" in second_head and after == b"", "HEAD: headers only, and the connection stays"
    server.stop()


async def test_a_chunked_body_streams_to_the_handler_with_flow_control(io_loop):
    server, port = serve()
    pieces = b"".join(b"%x\r\n%s\r\n" % (1000, b"x" * 1000) for _ in range(300))
    got = await exchange(port, b"PUT /upload HTTP/1.1\r\nHost: a\r\nAuthorization: yes\r\n"
                               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + pieces + b"0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b'{"size": 300000}'), got[-200:]
    server.stop()


async def test_expect_continue_is_answered_after_the_handler_accepts_the_headers(io_loop):
    server, port = serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PUT /upload HTTP/1.1\r\nHost: a\r\nAuthorization: yes\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 4\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2) == b"HTTP/1.1 100 (Continue)\r\n\r\n"
    writer.write(b"abcd")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 200 OK")
    writer.close()
    await writer.wait_closed()
    # Refused in prepare(): no 100, the refusal, and the connection closes (the body is never read).
    got = await exchange(port, b"PUT /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 401 Unauthorized") and b"100 (Continue)" not in got
    assert b"Connection: close" in got
    server.stop()


async def test_http_1_0_closes_unless_asked_to_keep_alive(io_loop):
    server, port = serve()
    got = await exchange(port, b"GET /echo HTTP/1.0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"}")
    got = await exchange(port, b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", until_close=False, wait=0.3)
    assert b"Connection: Keep-Alive" in got
    got = await exchange(port, b"GET /streamed HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert b"Transfer-Encoding" not in got and got.endswith(b"part0;part1;part2;"), "no length: the close ends it"
    server.stop()


async def test_malformed_requests_get_400_and_oversized_heads_431(io_loop, caplog):
    caplog.set_level("INFO", logger="relay.http")
    server, port = serve(max_header_size=4096, max_body_size=1000)
    got = await exchange(port, b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 9" + b"9" * 3000 + b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400 Bad Request")
    [line] = [r.getMessage() for r in caplog.records if r.name == "relay.http"]
    assert len(line) < 250, "what the client sent is cut short in the log line"
    for raw in (b"GARBAGE\r\n\r\n", b"GET /echo HTTP/2.0\r\nHost: a\r\n\r\n",
                b"GET /echo HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
                b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n"):
        got = await exchange(port, raw)
        assert got.startswith(b"HTTP/1.1 400 Bad Request"), (raw, got)
    # Garbage behind a whole request: the request is answered, then the connection closes.
    got = await exchange(port, b"GET /echo?q=ok HTTP/1.1\r\nHost: a\r\n\r\nGARBAGE\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"}") and b'"query": "ok"' in got, got
    got = await exchange(port, b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 5000)
    assert got.startswith(b"HTTP/1.1 431"), got
    got = await exchange(port, b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Fine: " + b"y" * 3000 + b"\r\n\r\n",
                         until_close=False, wait=0.3)
    assert got.startswith(b"HTTP/1.1 200 OK")
    server.stop()


async def test_slow_heads_and_slow_bodies_are_cut(io_loop):
    server, port = serve(idle_timeout=0.3, body_timeout=0.3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await exchange(port, b"GET /echo HTTP/1.1\r\nHost: a\r\n") == b""
    cut_body = b"PUT /upload HTTP/1.1\r\nHost: a\r\nAuthorization: yes\r\nContent-Length: 9\r\n\r\nab"
    assert await exchange(port, cut_body) == b""
    assert loop.time() - t0 < 1.5
    await eventually(lambda: "upload gone" in EVENTS, message="the handler reading the body hears of the cut")
    server.stop()


async def test_an_idle_deadline_moves_with_each_request_and_still_closes_on_time(io_loop):
    server, port = serve(idle_timeout=0.4)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n"
    for _ in range(3):  # each request inside the idle time: the first deadline has long passed by the last
        await asyncio.sleep(0.25)
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
    answered = loop.time()
    assert await asyncio.wait_for(reader.read(1), 2) == b"", "closed once idle"
    assert 0.35 < loop.time() - answered < 1.0, loop.time() - answered
    writer.close()
    server.stop()


async def test_a_client_that_leaves_is_reported_to_the_handler(io_loop):
    server, port = serve()
    EVENTS.clear()

    async def send_and_leave(raw: bytes) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await writer.wait_closed()

    await send_and_leave(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    await eventually(lambda: EVENTS == ["slow gone"], message="the close callback runs once")
    await send_and_leave(b"PUT /upload HTTP/1.1\r\nHost: a\r\nAuthorization: yes\r\nContent-Length: 100\r\n\r\nabc")
    await eventually(lambda: "upload gone" in EVENTS, message="a body cut short: on_connection_close")
    await eventually(lambda: not server._connections, message="closed connections are forgotten")
    server.stop()


async def test_a_websocket_is_handed_to_tornado_after_its_handshake(io_loop):
    server, port = serve()
    ws = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{port}/ws")
    for word in ("one", "two"):
        await ws.write_message(word)
        assert await asyncio.wait_for(ws.read_message(), 2) == "echo:" + word
    ws.close()
    await eventually(lambda: not server._connections, message="the detached connection is not the server's")
    server.stop()


async def test_stop_refuses_new_connections_and_close_all_ends_the_open_ones(io_loop):
    server, port = serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"}"), 2)).startswith(b"HTTP/1.1 200 OK")
    server.stop()
    await asyncio.sleep(0.05)
    try:
        await asyncio.open_connection("127.0.0.1", port)
        refused = False
    except OSError:
        refused = True
    assert refused
    await asyncio.wait_for(server.close_all_connections(), 2)
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    await writer.wait_closed()


class Attributes(tornado.web.RequestHandler):
    def get(self):
        r = self.request
        self.write({"host": r.host, "host_name": r.host_name, "path": r.path, "query": r.query,
                    "arguments": {k: [v.decode() for v in vs] for k, vs in r.arguments.items()},
                    "remote_ip": r.remote_ip, "lean": type(r).__name__})


async def test_relays_application_builds_the_same_request_and_refuses_the_same_hosts(io_loop):
    from relay import tornado_fastpath
    app = tornado_fastpath.RelayApplication([(r"/attrs", Attributes)])
    server = HTTPServer(app)
    port = unused_port()
    server.listen(port, "127.0.0.1")

    async def attrs(raw: bytes) -> tuple[int, dict]:
        got = await exchange(port, raw)
        head, _, body = got.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), (json.loads(body) if body.startswith(b"{") else {})

    status, seen = await attrs(b"GET /attrs HTTP/1.1\r\nHost: Example.COM:8080\r\nConnection: close\r\n\r\n")
    assert status == 200 and seen == {"host": "Example.COM:8080", "host_name": "example.com", "path": "/attrs",
                                      "query": "", "arguments": {}, "remote_ip": "127.0.0.1", "lean": "LeanRequest"}
    status, seen = await attrs(b"GET /attrs?a=1&a=2&b= HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert status == 200 and seen["arguments"] == {"a": ["1", "2"], "b": [""]} and seen["query"] == "a=1&a=2&b="
    assert seen["lean"] == "HTTPServerRequest"  # a query: Tornado's own request parses it
    status, seen = await attrs(b"GET /attrs HTTP/1.0\r\n\r\n")
    assert status == 200 and seen["host"] == "127.0.0.1"
    for bad in (b"a b", b"a,b", b"x/y"):
        for _ in range(2):  # refused each time, never remembered
            status, _ = await attrs(b"GET /attrs HTTP/1.1\r\nHost: " + bad + b"\r\nConnection: close\r\n\r\n")
            assert status == 400, bad
    for i in range(tornado_fastpath.MAX_HOSTS_REMEMBERED + 10):
        tornado_fastpath._host_name(f"h{i}.example")
    assert 0 < len(tornado_fastpath._HOST_NAMES) <= tornado_fastpath.MAX_HOSTS_REMEMBERED
    server.stop()
    await server.close_all_connections()


class Held(tornado.web.RequestHandler):
    release: asyncio.Event

    async def get(self):
        await Held.release.wait()
        self.write("released")


async def test_relays_application_holds_each_handlers_task_until_it_ends(io_loop):
    import gc

    from relay import tornado_fastpath
    Held.release = asyncio.Event()
    app = tornado_fastpath.RelayApplication([(r"/held", Held), (r"/upload", Upload), (r"/echo", Echo)])
    server = HTTPServer(app)
    port = unused_port()
    server.listen(port, "127.0.0.1")
    waiting = asyncio.ensure_future(exchange(port, b"GET /held HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"))
    await eventually(lambda: len(tornado_fastpath._RUNNING) == 1)
    gc.collect()  # the loop holds tasks weakly: only relay's set keeps the handler alive
    Held.release.set()
    assert (await waiting).endswith(b"released")
    await eventually(lambda: not tornado_fastpath._RUNNING)

    # A streamed body (the prepared future) and a handler that answers in prepare() still work.
    body = b"x" * 100_000
    got = await exchange(port, b"PUT /upload HTTP/1.1\r\nHost: h\r\nAuthorization: yes\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b'{"size": 100000}')
    got = await exchange(port, b"PUT /upload HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc")
    assert got.startswith(b"HTTP/1.1 401") and got.endswith(b"no")
    assert not tornado_fastpath._RUNNING
    server.stop()
    await server.close_all_connections()

    # Tornado's own delegate where it does more per request: debug mode's reloading, transforms.
    start = tornado.httputil.RequestStartLine("GET", "/echo", "HTTP/1.0")
    request = tornado.httputil.HTTPServerRequest(start_line=start)
    assert type(app.get_handler_delegate(request, Echo)).__name__ == "_LeanHandlerDelegate"
    for other in (tornado_fastpath.RelayApplication([(r"/echo", Echo)], debug=True),
                  tornado_fastpath.RelayApplication([(r"/echo", Echo)], compress_response=True)):
        assert type(other.get_handler_delegate(request, Echo)) is tornado.web._HandlerDelegate
