"""Holes an attacker's trial found: odd Retry-After values, deep JSON, forged access lines,
admin token guessing, credentials in base_url. Each test talks to relay over real sockets."""
import json
import time
from email.utils import formatdate

import pytest
import tornado.httpserver
import tornado.tcpclient
import tornado.testing
import tornado.web
from tornado.httpclient import AsyncHTTPClient

from relay.app import make_app, make_server
from relay.balancer.outcome import retry_after_seconds
from relay.config import parse_config
from relay.services import build_services
from tests.conftest import ADMIN_TOKEN
from tests.helpers import PRICING, TEST_KEY, add_key, mock_store, start_fake, unused_port

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
CHAT_BODY = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}


# --- plumbing ----------------------------------------------------------------------------

class OddUpstream:
    """An upstream that answers everything with one canned status and headers."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes = b"{}"):
        self.hits: list[str] = []
        outer = self

        class Handler(tornado.web.RequestHandler):
            def _answer(self, *_):
                outer.hits.append(f"{self.request.method} {self.request.path}")
                self.set_status(status)
                for name, value in headers.items():
                    self.set_header(name, value)
                self.set_header("Content-Type", "application/json")
                self.finish(body)

            get = post = _answer

        sock, self.port = tornado.testing.bind_unused_port()
        self.server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/.*", Handler)]))
        self.server.add_socket(sock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def posts(self) -> int:
        return sum(1 for h in self.hits if h.startswith("POST"))


def rate_limited(retry_after: str) -> OddUpstream:
    body = json.dumps({"error": {"message": "Rate limit reached", "type": "requests", "param": None,
                                 "code": "rate_limit_exceeded"}}).encode()
    return OddUpstream(429, {"Retry-After": retry_after}, body)


def two_tiers(first_url: str, second_url: str) -> str:
    """The first upstream is tried first; the second is the backup tier."""
    return f"""
upstreams:
  - {{name: first, base_url: "{first_url}", keys: [sk-first-0001], priority: 0}}
  - {{name: second, base_url: "{second_url}", keys: [sk-second-0001], priority: 1}}
{PRICING}
"""


class Relay:
    """relay on its own port, without background jobs: no health probe races a test's request."""

    def __init__(self, config_text: str, store, admin_token: str | None = "", trusted_proxies=(), config=None):
        config = config or parse_config(config_text, {})
        self.services = build_services(config, store, trusted_proxies=trusted_proxies, admin_token=admin_token)
        port = unused_port()
        self.server = make_server(make_app(self.services))
        self.server.listen(port, "127.0.0.1")
        self.url = f"http://127.0.0.1:{port}"

    async def fetch(self, path: str, body=None, headers=None, method=None):
        data = body if body is None or isinstance(body, (bytes, str)) else json.dumps(body)
        return await AsyncHTTPClient().fetch(self.url + path, method=method or ("GET" if data is None else "POST"),
                                             body=data, headers=headers, raise_error=False,
                                             request_timeout=30)

    def endpoint(self, upstream: str):
        return next(e for e in self.services.router.pool.endpoints if e.upstream.name == upstream)

    def state(self, upstream: str):
        router = self.services.router
        return self.endpoint(upstream).state(router.pool.config, router.clock())

    async def close(self) -> None:
        self.server.stop()
        await self.services.close()


async def funded_store():
    store = mock_store()
    await add_key(store)
    return store


def assert_openai_error(resp, status, code=None):
    assert resp.code == status, resp.body
    err = json.loads(resp.body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    return err


# --- 1. Retry-After from an upstream -------------------------------------------------------

@pytest.mark.parametrize("retry_after,cooldown", [
    ("inf", 10), ("nan", 10), ("-5", 10), ("1e309", 10), ("soon", 10),  # unusable: the default cooldown
    pytest.param("9" * 400, 300, id="huge"),                            # capped at max_cooldown_s
    ("30", 30),
])
async def test_a_429_with_any_retry_after_cools_the_key_and_fails_over(io_loop, retry_after, cooldown):
    fake, limited = start_fake(), rate_limited(retry_after)
    relay = Relay(two_tiers(limited.base_url, fake.base_url), await funded_store())
    try:
        resp = await relay.fetch("/v1/chat/completions", CHAT_BODY, AUTH)
        assert resp.code == 200, resp.body
        assert limited.posts == 1 and fake.count() == 1, "tried the rate-limited key, then failed over"
        st = relay.state("first")
        assert st.state == "cooling"
        assert st.until - relay.services.router.clock() == pytest.approx(cooldown, abs=2)
    finally:
        await relay.close()
        fake.stop()
        limited.server.stop()


async def test_a_429_with_an_http_date_retry_after_cools_until_that_date(io_loop):
    fake, limited = start_fake(), rate_limited(formatdate(time.time() + 120, usegmt=True))
    relay = Relay(two_tiers(limited.base_url, fake.base_url), await funded_store())
    try:
        assert (await relay.fetch("/v1/chat/completions", CHAT_BODY, AUTH)).code == 200
        st = relay.state("first")
        assert st.state == "cooling" and st.until - relay.services.router.clock() == pytest.approx(120, abs=3)
    finally:
        await relay.close()
        fake.stop()
        limited.server.stop()


@pytest.mark.parametrize("retry_after", ["inf", "nan", "-5", "1e309"])
async def test_when_every_key_is_rate_limited_the_client_gets_a_429_not_a_500(io_loop, retry_after):
    limited = rate_limited(retry_after)
    relay = Relay(two_tiers(limited.base_url, limited.base_url), await funded_store())
    try:
        resp = await relay.fetch("/v1/chat/completions", CHAT_BODY, AUTH)
        assert_openai_error(resp, 429, "rate_limit_exceeded")
        assert "Retry-After" not in resp.headers, "an unusable value is not passed on"
    finally:
        await relay.close()
        limited.server.stop()


@pytest.mark.parametrize("retry_after,cooldown", [("inf", 10), ("nan", 10), ("-5", 10),
                                                      pytest.param("9" * 400, 300, id="huge")])
async def test_a_probe_answered_429_with_any_retry_after_cools_the_key(io_loop, retry_after, cooldown):
    limited = rate_limited(retry_after)
    relay = Relay(two_tiers(limited.base_url, limited.base_url), await funded_store())
    try:
        assert await relay.services.checker.probe(relay.endpoint("first")) == "429"
        st = relay.state("first")
        assert st.state == "cooling"
        assert st.until - relay.services.router.clock() == pytest.approx(cooldown, abs=2)
    finally:
        await relay.close()
        limited.server.stop()


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert retry_after_seconds(None, 0.0) is None
    for unusable in ("inf", "-inf", "nan", "-5", "1e309", "1e3", "+5", "0x10", "", "soon", "\u0663",
                     "Wed, 21 Oct 99999 07:28:00 GMT"):
        assert retry_after_seconds(unusable, now) is None, unusable
    assert retry_after_seconds(" 7 ", now) == 7.0
    assert retry_after_seconds("1.5", now) == 1.5
    assert retry_after_seconds("9" * 5000, now) == 86_400.0
    assert retry_after_seconds(formatdate(now + 60, usegmt=True), now) == pytest.approx(60, abs=1)
    assert retry_after_seconds(formatdate(now - 60, usegmt=True), now) == 0.0, "a date in the past means now"


# --- 2. Deeply nested JSON -----------------------------------------------------------------

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DEEP = 100_000


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def chat_with(field: str, value: str, model: str = "gpt-4") -> str:
    return '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (model, field, value)


@pytest.mark.parametrize("path,body", [
    pytest.param("/v1/chat/completions", nested(DEEP), id="top-level"),
    pytest.param("/v1/chat/completions", '{"model": "gpt-4", "messages": [{"role": "user", "content": %s}]}'
                 % nested(DEEP), id="chat-content"),
    pytest.param("/v1/chat/completions", chat_with("tools", nested(DEEP)), id="chat-tools"),
    pytest.param("/v1/embeddings", nested(DEEP), id="embeddings-top-level"),
    pytest.param("/v1/embeddings", '{"model": "text-embedding-ada-002", "input": %s}' % nested(DEEP),
                 id="embeddings-input"),
    # Parses within Python's stack, but token counting of `input` recursed once per level.
    pytest.param("/v1/embeddings", '{"model": "text-embedding-ada-002", "input": %s}' % nested(700, '"x"'),
                 id="embeddings-input-700"),
])
async def test_deeply_nested_bodies_are_a_400(http_server_client, fake, path, body):
    resp = await http_server_client.fetch(path, method="POST", body=body, headers=AUTH, raise_error=False)
    err = assert_openai_error(resp, 400)
    assert err["type"] == "invalid_request_error" and "64 levels" in err["message"]
    assert fake.requests == [], "nothing is forwarded"


@pytest.mark.parametrize("path,body", [
    pytest.param("/admin/keys", nested(DEEP), id="top-level"),
    pytest.param("/admin/keys", '{"quota": 5, "note": %s}' % nested(DEEP), id="note"),
    pytest.param("/admin/keys/%s/topup" % TEST_KEY[:10], '{"quota": %s}' % nested(DEEP), id="topup"),
])
async def test_deeply_nested_admin_bodies_are_a_400(http_server_client, services, path, body):
    before = len(await services.store.list_keys())
    resp = await http_server_client.fetch(path, method="POST", body=body, headers=ADMIN, raise_error=False)
    assert "64 levels" in assert_openai_error(resp, 400)["message"]
    assert len(await services.store.list_keys()) == before


async def test_nesting_up_to_the_limit_is_served_and_one_more_level_is_not(http_server_client, fake):
    # gpt-3.5-turbo is mapped, so relay re-serialises the body (json.dumps walks it again).
    fits = chat_with("metadata", nested(63), model="gpt-3.5-turbo")  # the body's object is level 1
    resp = await http_server_client.fetch("/v1/chat/completions", method="POST", body=fits, headers=AUTH,
                                          raise_error=False)
    assert resp.code == 200, resp.body
    assert fake.count() == 1
    too_deep = chat_with("metadata", nested(64), model="gpt-3.5-turbo")
    resp = await http_server_client.fetch("/v1/chat/completions", method="POST", body=too_deep, headers=AUTH,
                                          raise_error=False)
    assert_openai_error(resp, 400)
    assert fake.count() == 1


async def test_an_upstream_error_body_nested_deep_is_a_plain_failure_and_fails_over(io_loop):
    fake, broken = start_fake(), OddUpstream(500, {}, nested(DEEP).encode())
    relay = Relay(two_tiers(broken.base_url, fake.base_url), await funded_store())
    try:
        resp = await relay.fetch("/v1/chat/completions", CHAT_BODY, AUTH)
        assert resp.code == 200, resp.body
        assert broken.posts == 1 and fake.count() == 1
    finally:
        await relay.close()
        fake.stop()
        broken.server.stop()


# --- 3. Client strings in the access line --------------------------------------------------

def access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "relay.access"]


def field(line: str, name: str) -> str:
    return line.split(f" {name}=", 1)[1].split(" ", 1)[0]


async def test_a_newline_in_the_model_cannot_forge_an_access_line(http_server_client, caplog):
    caplog.set_level("INFO", logger="relay.access")
    model = f"gpt-4\nFAKE LINE key={TEST_KEY} status=200"
    resp = await http_server_client.fetch("/v1/chat/completions", method="POST", headers=AUTH, raise_error=False,
                                          body=json.dumps({**CHAT_BODY, "model": model}))
    assert_openai_error(resp, 400, "model_not_priced")
    [line] = access_lines(caplog)
    assert "\n" not in line and "\r" not in line
    assert field(line, "model").startswith("gpt-4\\nFAKE\\x20LINE\\x20key=" + TEST_KEY[:10] + "...")
    assert TEST_KEY not in caplog.text
    assert len([t for t in caplog.text.splitlines() if "relay.access" in t]) == len(caplog.text.splitlines()) == 1


async def test_a_long_or_odd_model_is_bounded_in_the_access_line(http_server_client, caplog):
    caplog.set_level("INFO", logger="relay.access")
    for model in ("m" * 100_000, "\u202egpt-4\x1b[2J\u2028\U0001f600" * 1000):
        await http_server_client.fetch("/v1/chat/completions", method="POST", headers=AUTH, raise_error=False,
                                       body=json.dumps({**CHAT_BODY, "model": model}))
    long, odd = (field(line, "model") for line in access_lines(caplog))
    assert long == "m" * 64 + "...(+99936)"
    assert odd.startswith("\\u202egpt-4\\x1b[2J\\u2028\\U0001f600") and len(odd) <= 64 + len("...(+99999)")
    assert odd.isascii() and odd.isprintable()


async def test_odd_bytes_in_the_path_are_escaped_in_the_access_line(http_server_client, caplog):
    # Tornado refuses control bytes in the request line, but passes obs-text (0x80-0xff) on,
    # and U+0085 (NEL) is a line break to str.splitlines() and to some log viewers.
    caplog.set_level("INFO", logger="relay.access")
    port = int(http_server_client.get_url("/").rsplit(":", 1)[1].split("/")[0])
    stream = await tornado.tcpclient.TCPClient().connect("127.0.0.1", port)
    await stream.write(b"GET /v1/x\x85FAKE\xff" + b"p" * 1000 + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    head = await stream.read_until(b"\r\n")
    stream.close()
    assert head.startswith(b"HTTP/1.1 404")
    [line] = access_lines(caplog)
    path = line.split(" ")[2]
    assert path.startswith("/v1/x\\x85FAKE\\xffppp") and path.endswith("...(+761)")
    assert line.isascii() and line.isprintable() and len(line.splitlines()) == 1


async def test_a_forwarded_address_is_escaped_in_the_access_line(io_loop, caplog):
    from relay.net import parse_trusted
    caplog.set_level("INFO", logger="relay.access")
    relay = Relay(two_tiers("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"), await funded_store(),
                  trusted_proxies=parse_trusted(["127.0.0.1"]))
    try:
        await relay.fetch("/healthz", headers={"X-Forwarded-For": "evil key=ak-x status=200\u00e9"})
    finally:
        await relay.close()
    [line] = access_lines(caplog)
    assert line.split(" ")[3] == "evil\\x20key=ak-x\\x20status=200\\xe9"


# --- 4. Admin token: throttled guesses, a minimum length ------------------------------------

async def test_wrong_admin_tokens_are_throttled_per_address(io_loop):
    from relay.net import parse_trusted
    relay = Relay(two_tiers("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"), await funded_store(),
                  admin_token=ADMIN_TOKEN, trusted_proxies=parse_trusted(["127.0.0.1"]))
    attacker = {"X-Forwarded-For": "203.0.113.66"}
    wrong = {**attacker, "Authorization": "Bearer " + ADMIN_TOKEN[:-1] + "x"}
    try:
        codes = [(await relay.fetch("/admin/keys", headers=wrong)).code for _ in range(20)]
        assert codes == [401] * 20
        t0 = time.monotonic()
        assert_openai_error(await relay.fetch("/admin/keys", headers=wrong), 429, "too_many_failed_attempts")
        assert time.monotonic() - t0 >= relay.services.admin_throttle.delay_s, "the guesser is slowed down"
        assert_openai_error(await relay.fetch("/admin/upstreams", headers=attacker), 429, "too_many_failed_attempts")
        other = {"X-Forwarded-For": "198.51.100.7", **ADMIN}
        t0 = time.monotonic()
        assert (await relay.fetch("/admin/keys", headers=other)).code == 200, "another address is untouched"
        assert time.monotonic() - t0 < 0.5
        assert (await relay.fetch("/admin/keys", headers={**attacker, **ADMIN})).code == 200, \
            "the right token is never held back"
        bad_key = {**attacker, "Authorization": "Bearer ak-" + "g" * 40}
        assert_openai_error(await relay.fetch("/v1/models", headers=bad_key), 401, "invalid_api_key")
    finally:
        await relay.close()


@pytest.mark.parametrize("token", ["s3cr3t", "x" * 15, " " + "x" * 20, "x" * 20 + "\n"])
def test_a_short_or_unusable_admin_token_refuses_to_build(token, monkeypatch):
    from relay.config import ConfigError
    config = parse_config(two_tiers("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"), {})
    with pytest.raises(ConfigError) as info:
        build_services(config, mock_store(), admin_token=token)
    assert info.value.path == "RELAY_ADMIN_TOKEN" and token.strip() not in str(info.value)
    monkeypatch.setenv("RELAY_ADMIN_TOKEN", token)
    with pytest.raises(ConfigError):
        build_services(config, mock_store())
    assert build_services(config, mock_store(), admin_token="x" * 16).admin_token == "x" * 16
    assert build_services(config, mock_store(), admin_token="").admin_token is None, "empty: the admin API is off"


def test_relay_serve_refuses_to_start_with_a_short_admin_token(tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, "RELAY_ADMIN_TOKEN": "tooshort"}
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--port", str(unused_port()), "--data-dir", str(tmp_path),
         "--mongodb-uri", "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=300"],
        capture_output=True, text=True, env=env, timeout=20)
    assert proc.returncode == 1
    assert "RELAY_ADMIN_TOKEN: too short (8 characters): use at least 16" in proc.stderr
    assert "tooshort" not in proc.stderr + proc.stdout, "the token itself is not printed"


# --- 5. Credentials in a base URL -----------------------------------------------------------

async def test_admin_upstreams_never_shows_a_urls_credentials(io_loop):
    import dataclasses
    # The parser refuses such a URL (tests/test_config.py); this config skips it, as a bug might.
    config = parse_config(two_tiers("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"), {})
    config = dataclasses.replace(config, upstreams=(
        dataclasses.replace(config.upstreams[0], base_url="https://user:s3cret-pw@api.example.com:8443/v1"),
        config.upstreams[1]))
    relay = Relay("", await funded_store(), admin_token=ADMIN_TOKEN, config=config)
    try:
        resp = await relay.fetch("/admin/upstreams", headers=ADMIN)
        assert resp.code == 200
        shown = {u["name"]: u["base_url"] for u in json.loads(resp.body)["upstreams"]}
        assert shown == {"first": "https://***@api.example.com:8443/v1", "second": "http://127.0.0.1:9/v1"}
        assert b"s3cret" not in resp.body
    finally:
        await relay.close()
