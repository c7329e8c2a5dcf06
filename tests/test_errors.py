"""Every error relay answers has its status and OpenAI's shape; nothing reveals a key."""
import asyncio
import json
import socket

import pytest
from tornado.httpclient import AsyncHTTPClient

from tests.helpers import (
    TEST_KEY,
    UPSTREAM_KEY,
    add_key,
    mock_store,
    one_upstream_config,
    serve,
    start_fake,
    unused_port,
)

CHAT = "/v1/chat/completions"


def assert_openai_error(resp, status, code=None, type_=None):
    assert resp.code == status, resp.body
    assert resp.headers["Content-Type"].startswith("application/json")
    err = json.loads(resp.body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    if type_ is not None:
        assert err["type"] == type_
    return err


async def post(client, body, headers=None, path=CHAT):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return await client.fetch(path, method="POST", body=data, headers=headers, raise_error=False)


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer sk-notarelaykey",
                                    "Bearer ak-short", "Bearer ak-" + "x" * 40])
async def test_missing_malformed_or_unknown_key_is_401(http_server_client, header):
    headers = {"Authorization": header} if header else {}
    resp = await post(http_server_client, {"model": "gpt-4", "messages": []}, headers)
    assert_openai_error(resp, 401, "invalid_api_key", "invalid_request_error")


async def _relay_on(config_text, status="active"):
    store = mock_store()
    await add_key(store, status=status)
    return await serve(config_text, store)


async def fetch(url, **kw):
    return await AsyncHTTPClient().fetch(url, raise_error=False, **kw)


async def test_disabled_key_is_401_saying_so(fake, io_loop):
    url, server, services = await _relay_on(one_upstream_config(fake.base_url), status="disabled")
    resp = await fetch(f"{url}/v1/models",
                                         headers={"Authorization": f"Bearer {TEST_KEY}"})
    err = assert_openai_error(resp, 401, "key_disabled")
    assert "disabled" in err["message"]
    server.stop()
    await services.close()


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": 42, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "gpt-4"}, "messages"),
    ({"model": "gpt-4", "messages": "hello"}, "messages"),
    ({"model": "gpt-4", "messages": []}, "messages"),
    ({"model": "gpt-4", "messages": [{"content": "no role"}]}, "messages[0]"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, "max_tokens"),
])
async def test_bad_chat_bodies_are_400_naming_the_param(http_server_client, auth, fake, body, param):
    resp = await post(http_server_client, body, auth)
    err = assert_openai_error(resp, 400, type_="invalid_request_error")
    assert err["param"] == param
    assert fake.requests == [], "nothing is forwarded"


@pytest.mark.parametrize("body,param", [({"model": "text-embedding-ada-002"}, "input"),
                                        ({"model": "text-embedding-ada-002", "input": 3}, "input"),
                                        ({"input": "x"}, "model")])
async def test_bad_embedding_bodies_are_400(http_server_client, auth, body, param):
    resp = await post(http_server_client, body, auth, path="/v1/embeddings")
    assert assert_openai_error(resp, 400)["param"] == param


async def test_model_no_upstream_serves_is_404(fake, io_loop):
    text = one_upstream_config(fake.base_url).replace("keys: [", "models: [gpt-4]\n    keys: [")
    url, server, services = await _relay_on(text)
    resp = await fetch(
        f"{url}{CHAT}", method="POST",
        headers={"Authorization": f"Bearer {TEST_KEY}"},
        body=json.dumps({"model": "gpt-3.5-turbo-16k", "messages": [{"role": "user", "content": "x"}]}))
    err = assert_openai_error(resp, 404, "model_not_found")
    assert "gpt-3.5-turbo-16k" in err["message"] and err["param"] == "model"
    server.stop()
    await services.close()


@pytest.mark.parametrize("path", ["/v1/nothing", "/v1/chat/complete", "/openai/v1/files", "/v2/models"])
async def test_unknown_urls_are_404_in_openai_shape(http_server_client, auth, path):
    resp = await http_server_client.fetch(path, headers=auth, raise_error=False)
    assert_openai_error(resp, 404, "unknown_url")


async def test_wrong_method_is_405_in_openai_shape(http_server_client, auth):
    resp = await http_server_client.fetch(CHAT, headers=auth, raise_error=False)
    assert_openai_error(resp, 405)


def _raw_exchange(port: int, head: bytes, body_chunks) -> bytes:
    """Send a request by hand and return whatever comes back before the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    break
                data += got
        except (TimeoutError, ConnectionResetError):
            pass
        return data


async def _limited_relay(fake, limit):
    url, server, services = await _relay_on(
        one_upstream_config(fake.base_url, extra=f"limits:\n  max_body_bytes: {limit}\n"))
    return int(url.rsplit(":", 1)[1]), server, services


async def test_declared_oversized_body_gets_413_before_it_is_sent(fake, io_loop):
    port, server, services = await _limited_relay(fake, 1000)
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n").encode()
    # Only the headers are sent: a 413 proves the limit is checked before reading the body.
    reply = await asyncio.get_running_loop().run_in_executor(None, _raw_exchange, port, head, [])
    assert reply.startswith(b"HTTP/1.1 413")
    assert b'"request_too_large"' in reply
    server.stop()
    await services.close()


async def test_chunked_body_over_the_limit_gets_413_while_reading(fake, io_loop):
    port, server, services = await _limited_relay(fake, 1000)
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"x" * 600
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 3  # never terminated: relay must not wait for the end
    reply = await asyncio.get_running_loop().run_in_executor(None, _raw_exchange, port, head, chunks)
    assert reply.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in reply
    assert fake.requests == []
    server.stop()
    await services.close()


async def test_upstream_500_is_502(http_server_client, auth, fake):
    fake.state.behaviour.status = 500
    resp = await post(http_server_client, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, auth)
    err = assert_openai_error(resp, 502, "bad_gateway", "upstream_error")
    assert UPSTREAM_KEY not in resp.body.decode() and "sk-" not in err["message"]


async def test_unreachable_upstream_is_502(io_loop, http_server_client):
    dead = f"http://127.0.0.1:{unused_port()}/v1"
    url, server, services = await _relay_on(one_upstream_config(dead))
    resp = await fetch(
        f"{url}{CHAT}", method="POST",
        headers={"Authorization": f"Bearer {TEST_KEY}"},
        body=json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}))
    assert_openai_error(resp, 502, "bad_gateway")
    server.stop()
    await services.close()


async def test_upstream_rejecting_relays_key_is_502_then_503_without_the_key(io_loop):
    fake = start_fake(keys={UPSTREAM_KEY})
    url, server, services = await _relay_on(one_upstream_config(fake.base_url))
    while not fake.probes:  # the start-up probe found the key working
        await asyncio.sleep(0.01)
    fake.state.keys = {"sk-the-only-good-key"}  # now the upstream revokes relay's key
    chat = {"method": "POST", "headers": {"Authorization": f"Bearer {TEST_KEY}"},
            "body": json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})}
    resp = await fetch(f"{url}{CHAT}", **chat)
    assert_openai_error(resp, 502, "bad_gateway")
    again = await fetch(f"{url}{CHAT}", **chat)  # the key is out of rotation: nothing left to try
    assert_openai_error(again, 503, "no_available_endpoint")
    for r in (resp, again):
        text = r.body.decode()
        assert "sk-" not in text and UPSTREAM_KEY[-8:] not in text  # [-4:] alone can match a request id
    server.stop()
    fake.stop()
    await services.close()


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_upstream_client_errors_pass_through_without_the_key(http_server_client, auth, fake, status):
    fake.state.behaviour.status = status
    fake.state.behaviour.error_code = "some_upstream_code"
    resp = await post(http_server_client, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, auth)
    err = assert_openai_error(resp, status, "some_upstream_code")
    assert err["message"].startswith(f"fake upstream failure {status}")
    assert UPSTREAM_KEY not in resp.body.decode() and "[redacted]" in err["message"]


async def test_upstream_429_is_429_with_retry_after(http_server_client, auth, fake):
    fake.state.behaviour.status = 429
    fake.state.behaviour.retry_after = 7
    resp = await post(http_server_client, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, auth)
    assert_openai_error(resp, 429, "rate_limit_exceeded")
    assert resp.headers["Retry-After"] == "7"
