"""Numbers out of range, from a client or an upstream, on the real store with leases on."""
import json
import uuid

import tornado.httpserver
import tornado.testing
import tornado.web
from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from relay.metering.bounds import MAX_TOKENS
from relay.store.connect import close_client, open_store
from tests.conservation import assert_conserved
from tests.helpers import TEST_KEY, add_key, one_upstream_config, serve
from tests.processes import db_uri

OTHER_KEY = "ak-test0000000000000000000000000000000000000002"


class HostileUsage(tornado.web.RequestHandler):
    """An upstream that reports whatever usage the test sets."""

    usage: dict = {}

    def post(self) -> None:
        body = json.loads(self.request.body)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({
            "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                         "finish_reason": "stop"}], "usage": HostileUsage.usage}))


def hostile_upstream():
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/v1/chat/completions", HostileUsage)]))
    server.add_socket(sock)
    return server, f"http://127.0.0.1:{port}/v1"


async def chat(c, url, key=TEST_KEY, **extra):
    return await c.fetch(url + "/v1/chat/completions", method="POST", raise_error=False,
                         headers={"Authorization": f"Bearer {key}"},
                         body=json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}], **extra}))


async def test_numbers_beyond_64_bits_are_refused_or_clamped_and_billing_goes_on(embedded, io_loop):
    store = await open_store(db_uri(embedded, "bounds" + uuid.uuid4().hex[:6]))
    await add_key(store, quota=1_000_000)
    await add_key(store, OTHER_KEY, quota=1_000_000)
    upstream, base = hostile_upstream()
    url, server, services = await serve(one_upstream_config(base), store)
    assert services.quota.book is not None, "the shipped mode: leases"
    c = AsyncHTTPClient(force_instance=True)
    HostileUsage.usage = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
    for name in ("max_tokens", "max_completion_tokens"):
        for value in (10**20, 2**63, MAX_TOKENS + 1):
            r = await chat(c, url, **{name: value})
            assert r.code == 400 and json.loads(r.body)["error"]["param"] == name, r.body
    assert (await chat(c, url)).code == 200
    r = await chat(c, url, max_tokens=MAX_TOKENS)  # in range: holds what the balance has
    assert r.code == 200
    HostileUsage.usage = {"prompt_tokens": 2**70, "completion_tokens": 2**64, "total_tokens": 2**71}
    assert (await chat(c, url, key=OTHER_KEY)).code == 200  # billed, clamped
    HostileUsage.usage = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
    for _ in range(5):  # the group commits that follow go through
        assert (await chat(c, url)).code == 200
    server.stop()
    await services.close()
    ok, hostile = await store.key_doc(hash_key(TEST_KEY)), await store.key_doc(hash_key(OTHER_KEY))
    assert ok["used"] == 7 * (8 * 20 + 2 * 40) and ok["balance"] == 1_000_000 - ok["used"]
    assert hostile["used"] == MAX_TOKENS * 20 + MAX_TOKENS * 40, "clamped to the largest count relay takes"
    await assert_conserved(store)
    await close_client(store.client)
    upstream.stop()
    c.close()
