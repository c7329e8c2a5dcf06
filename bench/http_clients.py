"""Compare upstream HTTP clients for relay's transport: latency and CPU per request.

Runs a tiny Tornado upstream in a child process and drives it from this process with each
candidate client, sequentially (concurrency 1) and with 32 concurrent requests: Tornado's
clients, aiohttp's pooled session, and relay's own transport (relay/proxy/http1.py), on
asyncio's loop and on uvloop's.
Usage: python bench/http_clients.py [N]
"""
import asyncio
import multiprocessing
import statistics
import sys
import time

BODY = b'{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1}}'


def _serve(port):
    import tornado.ioloop
    import tornado.web

    class H(tornado.web.RequestHandler):
        def post(self):
            self.set_header("Content-Type", "application/json")
            self.write(BODY)

    tornado.web.Application([(r"/.*", H)]).listen(port, "127.0.0.1")
    tornado.ioloop.IOLoop.current().start()


async def _drive(fetch, n, conc):
    lat = []

    async def one():
        t = time.perf_counter()
        await fetch()
        lat.append(time.perf_counter() - t)

    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n // conc):
        await asyncio.gather(*(one() for _ in range(conc)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return statistics.median(lat) * 1e3, cpu / len(lat) * 1e3, len(lat) / wall


async def main(n):
    port = 18999
    proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(port,), daemon=True)
    proc.start()
    await asyncio.sleep(1.5)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    import aiohttp
    from tornado.simple_httpclient import SimpleAsyncHTTPClient

    results = []
    simple = SimpleAsyncHTTPClient(force_instance=True, max_clients=64)
    results.append(("tornado simple (no keep-alive)", lambda: simple.fetch(url, method="POST", body=b"{}")))
    try:
        from tornado.curl_httpclient import CurlAsyncHTTPClient

        curl = CurlAsyncHTTPClient(force_instance=True, max_clients=64)
        results.append(("tornado curl", lambda: curl.fetch(url, method="POST", body=b"{}")))
    except ImportError:
        pass
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))

    async def aio():
        async with session.post(url, data=b"{}") as r:
            await r.read()

    results.append(("aiohttp pooled", aio))
    import os
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from types import SimpleNamespace

    from relay.config import Limits, Timeouts
    from relay.proxy.http1 import Http1Transport
    from relay.proxy.request import UpstreamRequest

    lean = Http1Transport(Limits())
    # What the transport reads of an endpoint: its upstream's name and base URL, and the key.
    endpoint = SimpleNamespace(upstream=SimpleNamespace(name="u", base_url=f"http://127.0.0.1:{port}/v1"), key="sk-x")
    request = UpstreamRequest("POST", "/chat/completions")
    timeouts = Timeouts()

    async def relay_transport():
        r = await lean.send(endpoint, request, b"{}", timeouts)
        await r.read()

    results.append((f"relay http1 ({type(asyncio.get_running_loop()).__module__.split('.')[0]})", relay_transport))
    print(f"{'client':32} {'conc':>4} {'p50 ms':>8} {'cpu ms/req':>10} {'req/s':>8}")
    for name, fetch in results:
        for conc in (1, 32):
            await _drive(fetch, 200, conc)  # warm up
            p50, cpu, rps = await _drive(fetch, n, conc)
            print(f"{name:32} {conc:>4} {p50:8.3f} {cpu:10.3f} {rps:8.0f}")
    await session.close()
    await lean.close()
    proc.terminate()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    asyncio.run(main(n))
    import uvloop
    print("on uvloop:")
    uvloop.run(main(n))
