"""Every API route at once, on the real store with leases on, against the example file's prices:
successes, upstream failures and clients hanging up; every answer billed once, every unit kept."""
import asyncio
import io
import json
import socket
import uuid
import wave
from collections import Counter

import pytest
from openai import APIStatusError, AsyncOpenAI

from relay.keys import hash_key
from relay.serve import example_config_text
from relay.store.connect import close_client, open_store
from tests.conservation import assert_conserved, settled
from tests.helpers import TEST_KEY, add_key, serve, start_fake
from tests.processes import db_uri

HI = [{"role": "user", "content": "Hi"}]


def wav(seconds: float) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(2 * round(seconds * 8000)))
    return out.getvalue()


def hang_up_mid_stream(port: int, path: str, body: dict) -> None:
    """A client that reads the first events of a stream, then leaves."""
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode() + raw)
        got = b""
        while got.count(b"data: ") < 3:
            got += s.recv(4096)


@pytest.mark.timeout(seconds=180)
async def test_every_route_together_bills_each_answer_once_and_keeps_every_unit(embedded, io_loop):
    store = await open_store(db_uri(embedded, "every" + uuid.uuid4().hex[:6]))
    await add_key(store, quota=10**9)
    fake = start_fake()
    fake.state.behaviour.chunk_delay = 0.01
    config = example_config_text().replace("http://127.0.0.1:9000/v1", fake.base_url)
    url, server, services = await serve(config, store)
    assert services.quota.book is not None, "leases on: the shipped mode"
    c = AsyncOpenAI(base_url=url + "/v1", api_key=TEST_KEY, max_retries=0)
    served: Counter[str] = Counter()

    async def one(api: str, call) -> None:
        try:
            result = call()
            result = await result
            if hasattr(result, "__aiter__"):  # a stream: read it to the end
                async for _ in result:
                    pass
            elif hasattr(result, "aread"):  # speech: the audio, as it comes
                await result.aread()
            served[api] += 1
        except APIStatusError as exc:
            assert exc.status_code >= 500, exc  # only the injected failures

    def calls():
        yield "chat", lambda: c.chat.completions.create(model="gpt-4o-mini", messages=HI)
        yield "chat", lambda: c.chat.completions.create(model="gpt-4", messages=HI, stream=True)
        yield "completions", lambda: c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi", max_tokens=5)
        yield "embeddings", lambda: c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        yield "moderations", lambda: c.moderations.create(input="hello")
        yield "responses", lambda: c.responses.create(model="gpt-4o", input="Hi", max_output_tokens=20)
        yield "responses", lambda: c.responses.create(model="gpt-4o-mini", input="Hi", stream=True)
        yield "images", lambda: c.images.generate(model="dall-e-3", prompt="a cat", size="1024x1024")
        yield "audio", lambda: c.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav(1.5)))
        yield "audio", lambda: c.audio.speech.create(model="tts-1", voice="alloy", input="Hello there")

    for _ in range(3):  # rounds of every route at once
        await asyncio.gather(*(one(api, call) for api, call in calls()))
    fake.state.behaviour.status = 500  # every upstream fails: refunds
    await asyncio.gather(*(one(api, call) for api, call in calls()))
    fake.state.behaviour.status = None
    port = int(url.rsplit(":", 1)[1])
    loop = asyncio.get_running_loop()
    await asyncio.gather(
        loop.run_in_executor(None, hang_up_mid_stream, port, "/v1/chat/completions",
                             {"model": "gpt-4", "messages": HI, "stream": True}),
        loop.run_in_executor(None, hang_up_mid_stream, port, "/v1/responses",
                             {"model": "gpt-4o", "input": "Hi", "stream": True}))
    await settled(store, services)
    await store.flush_ledger()
    entries = await store.ledger_entries(hash_key(TEST_KEY))
    by_api = Counter(e.get("api") for e in entries)
    # The hung-up streams delivered something before the client left: billed, once each.
    expected = served + Counter({"chat": 1, "responses": 1})
    assert by_api == expected, (by_api, expected)
    assert len({e["_id"] for e in entries}) == len(entries)
    assert all(e["cost"] >= 0 for e in entries) and sum(e["cost"] for e in entries) > 0
    server.stop()
    await services.close()
    await c.close()
    doc = await store.key_doc(hash_key(TEST_KEY))
    assert doc["used"] == sum(e["cost"] for e in entries) and doc["reserved"] == 0
    await assert_conserved(store)
    await close_client(store.client)
    fake.stop()
