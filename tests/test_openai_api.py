"""The OpenAI API through relay, driven by the official openai SDK over real sockets."""
import asyncio
import json
import socket
import time

import pytest
from openai import AsyncOpenAI

from tests.helpers import TEST_KEY, UPSTREAM_KEY


def client(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url, api_key=TEST_KEY, max_retries=0)


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
async def test_sdk_chats_through_relay_on_both_base_urls(http_server_client, fake, prefix):
    sdk = client(http_server_client.get_url(prefix))
    reply = await sdk.chat.completions.create(model="gpt-3.5-turbo",
                                              messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == "Hello from the fake upstream, relay says hi!"
    assert reply.usage.prompt_tokens == 8 and reply.usage.completion_tokens == 10
    # The upstream saw the mapped model and its own key; the response keeps its model field.
    seen = fake.requests[-1]
    assert seen["model"] == "gpt-3.5-turbo-1106"
    assert reply.model == "gpt-3.5-turbo-1106"
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "ak-" not in json.dumps(seen["headers"])
    await sdk.close()


async def test_stream_chunks_reach_the_client_before_the_upstream_finishes(base_url, fake):
    fake.state.behaviour.chunk_delay = 0.05
    sdk = client(base_url)
    stream = await sdk.chat.completions.create(model="gpt-4", stream=True,
                                               messages=[{"role": "user", "content": "Hi"}])
    first_at = None
    parts = []
    async for chunk in stream:
        if first_at is None:
            first_at = time.monotonic()
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    sent = fake.requests[-1]["chunks_sent_at"]
    assert "".join(parts) == "Hello from the fake upstream, relay says hi!"
    assert first_at < sent[-1] - 0.2, "the first chunk must arrive long before the upstream's last"
    await sdk.close()


async def test_stream_asks_upstream_for_usage_only_forwarding_it_when_asked(base_url, fake):
    sdk = client(base_url)
    plain = [c async for c in await sdk.chat.completions.create(
        model="gpt-4", stream=True, messages=[{"role": "user", "content": "Hi"}])]
    assert all(c.usage is None for c in plain)
    assert all(c.choices for c in plain), "the usage chunk the client did not ask for is dropped"
    assert fake.requests[-1]["stream_options"] == {"include_usage": True}
    with_usage = [c async for c in await sdk.chat.completions.create(
        model="gpt-4", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Hi"}])]
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 10
    await sdk.close()


async def test_stream_response_headers_prevent_buffering(http_server_client, auth):
    body = json.dumps({"model": "gpt-4", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    resp = await http_server_client.fetch("/v1/chat/completions", method="POST", body=body, headers=auth)
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["Cache-Control"] == "no-cache"
    events = [e for e in resp.body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


async def test_sdk_embeds_and_lists_models(base_url, fake):
    sdk = client(base_url)
    emb = await sdk.embeddings.create(model="text-embedding-ada-002", input=["a", "b"])
    assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) == 8
    models = [m.id async for m in sdk.models.list()]
    assert "gpt-3.5-turbo" in models and "gpt-4" in models and "text-embedding-ada-002" in models
    await sdk.close()


async def test_healthz(http_server_client):
    resp = await http_server_client.fetch("/healthz")
    assert json.loads(resp.body) == {"status": "ok", "store": "up", "store_down_s": 0.0}


async def test_every_answer_has_a_current_date_server_and_type_even_after_an_error(http_server_client, auth):
    """relay's handlers reset headers themselves (Tornado's clear(), with the Date made once a second)."""
    import email.utils
    ok = await http_server_client.fetch("/healthz")
    refused = await http_server_client.fetch("/v1/models", headers={"Authorization": "Bearer ak-nope"},
                                             raise_error=False)
    assert refused.code == 401 and refused.headers["Content-Type"].startswith("application/json")
    for resp in (ok, refused):
        when = email.utils.parsedate_to_datetime(resp.headers["Date"]).timestamp()
        assert abs(when - time.time()) < 3 and resp.headers["Date"].endswith(" GMT")
        assert resp.headers["Server"].startswith("TornadoServer/") and resp.headers["X-Request-Id"]


async def test_any_host_header_is_served(http_server_client, auth):
    resp = await http_server_client.fetch("/v1/models", headers={**auth, "Host": "backup.example.org"})
    assert resp.code == 200


async def test_cors_preflight_lists_authorization(http_server_client):
    resp = await http_server_client.fetch("/v1/chat/completions", method="OPTIONS", headers={
        "Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert resp.code == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]


async def test_cors_header_on_errors_too(http_server_client):
    resp = await http_server_client.fetch("/v1/models", raise_error=False)
    assert resp.code == 401 and resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_access_line_has_prefix_model_upstream_and_no_content(http_server_client, auth, caplog):
    caplog.set_level("INFO", logger="relay.access")
    marker = "SECRET-MARKER-93817"
    body = json.dumps({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": marker}]})
    await http_server_client.fetch("/v1/chat/completions", method="POST", body=body, headers=auth)
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.access"]
    assert len(lines) == 1
    line = lines[0]
    assert "key=ak-test000 " in line and "model=gpt-3.5-turbo " in line and "upstream=primary " in line
    assert "status=200" in line and "req_" in line
    assert marker not in caplog.text and TEST_KEY not in caplog.text and UPSTREAM_KEY not in caplog.text


async def test_client_connections_keep_tcp_nodelay_across_requests(io_loop, fake):
    """Nagle stays off for the connection's whole life (Tornado's server turned it back on
    after each request; a stream's later events would then wait for the client's delayed ACK)."""
    from tests.helpers import add_key, mock_store, serve
    store = mock_store()
    await add_key(store)
    url, server, services = await serve(f"upstreams:\n  - {{name: p, base_url: '{fake.base_url}', keys: [sk-n]}}\n",
                                        store)
    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):  # two requests on one keep-alive connection
        writer.write(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
    [conn] = server._connections
    assert conn.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    writer.close()
    server.stop()
    await services.close()
