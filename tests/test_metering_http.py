"""Today's metering over the wire: cached and reasoning tokens at their prices, the whole prompt
(tools, images) reserved before anything is forwarded, the breakdown in the ledger and on the page."""
import base64
import json
import struct
import zlib

from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from tests.conservation import assert_conserved, settled
from tests.helpers import TEST_KEY, add_key, mock_store, serve, start_fake

PRICES = """
pricing:
  gpt-4o: {input: "5/3", cached_input: "5/6", output: "20/3", reasoning: 10}
  gpt-4: {input: 20, output: 40}
"""
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
HI = [{"role": "user", "content": "Hi"}]


def config(fake, extra=""):
    return f"upstreams:\n  - {{name: p, base_url: '{fake.base_url}', keys: [sk-m1]}}\n{PRICES}{extra}"


def png(width: int, height: int) -> str:
    """A real PNG's header (signature and IHDR): all an estimate may read of it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk + b"\0" * 64).decode()


async def chat(c, url, **body):
    return await c.fetch(url + "/v1/chat/completions", method="POST", raise_error=False, headers=AUTH,
                         body=json.dumps({"model": "gpt-4o", "messages": HI, **body}))


async def test_cached_and_reasoning_tokens_are_billed_at_their_prices(io_loop):
    fake, store = start_fake(), mock_store()
    await add_key(store, quota=10_000_000)
    url, server, services = await serve(config(fake), store)
    c = AsyncHTTPClient(force_instance=True)
    fake.state.behaviour.cached_tokens = 6  # of the 8 prompt tokens the fake counts for "Hi"
    fake.state.behaviour.reasoning_tokens = 30
    for stream in (False, True):
        r = await chat(c, url, stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
        assert r.code == 200, r.body
    fake.state.behaviour.cached_tokens = fake.state.behaviour.reasoning_tokens = 0
    assert (await chat(c, url)).code == 200
    await settled(store, services)
    entries = sorted(await store.ledger_entries(), key=lambda e: e["at"])
    # 2 text + 6 cached prompt tokens, 10 text + 30 reasoning completion tokens:
    # 2 × 5/3 + 6 × 5/6 + 10 × 20/3 + 30 × 10 = 10/3 + 5 + 200/3 + 300 = 375 (exactly)
    assert [(e["prompt_tokens"], e["cached_tokens"], e["completion_tokens"], e["reasoning_tokens"], e["cost"])
            for e in entries] == [(8, 6, 40, 30, 375), (8, 6, 40, 30, 375), (8, 0, 10, 0, 80)]
    assert all(e["requested_model"] == "gpt-4o" and e["api"] == "chat" for e in entries)
    summary = json.loads((await c.fetch(url + "/usage/api/summary", headers=AUTH)).body)
    assert summary["recent"][-1]["cached_tokens"] == 6 and summary["recent"][-1]["reasoning_tokens"] == 30
    server.stop()
    await services.close()
    doc = await store.key_doc(hash_key(TEST_KEY))
    assert doc["used"] == 375 + 375 + 80
    await assert_conserved(store)
    fake.stop()
    c.close()


async def test_tools_and_images_count_before_anything_is_forwarded(io_loop):
    fake, store = start_fake(), mock_store()
    await add_key(store, quota=300)  # "Hi" to gpt-4 costs 160 to reserve; a 1024² image adds 765 tokens
    url, server, services = await serve(config(fake), store)
    c = AsyncHTTPClient(force_instance=True)
    image = [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                          {"type": "image_url", "image_url": {"url": png(1024, 1024),
                                                                              "detail": "high"}}]}]
    r = await c.fetch(url + "/v1/chat/completions", method="POST", raise_error=False, headers=AUTH,
                      body=json.dumps({"model": "gpt-4", "messages": image, "max_tokens": 1}))
    assert r.code == 429 and json.loads(r.body)["error"]["code"] == "insufficient_quota"
    tool = {"type": "function", "function": {"name": "lookup", "description": "x " * 400,
                                             "parameters": {"type": "object", "properties": {}}}}
    r = await c.fetch(url + "/v1/chat/completions", method="POST", raise_error=False, headers=AUTH,
                      body=json.dumps({"model": "gpt-4", "messages": HI, "tools": [tool], "max_tokens": 1}))
    assert r.code == 429, "400 tokens of tool description at 20 units each do not fit in 300"
    assert fake.requests == [], "nothing was forwarded"
    r = await c.fetch(url + "/v1/chat/completions", method="POST", raise_error=False, headers=AUTH,
                      body=json.dumps({"model": "gpt-4", "messages": HI, "max_tokens": 1}))
    assert r.code == 200, "the same key, without them, is served"
    server.stop()
    await services.close()
    await assert_conserved(store)
    fake.stop()
    c.close()
