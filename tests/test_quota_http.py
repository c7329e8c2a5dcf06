"""Charging through the HTTP API (store on mongomock): exact prices, refunds, 429s, billing."""
import asyncio
import datetime as dt
import json
import socket
from math import ceil

import pytest

from relay.keys import hash_key
from tests.conftest import ADMIN_TOKEN
from tests.conservation import assert_conserved, settled
from tests.helpers import TEST_KEY, add_key, eventually, mock_store, one_upstream_config, relay_app, serve

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]  # 8 prompt tokens; the fake replies with 10 tokens


async def chat(client, auth, model="gpt-4", stream=False, **extra):
    body = json.dumps({"model": model, "messages": HI, "stream": stream, **extra})
    resp = await client.fetch(CHAT, method="POST", body=body, headers=auth, raise_error=False)
    await settle()
    return resp


_current = {"store": None, "services": None}


async def settle() -> None:
    """Until the requests so far are settled and what they owe is in the store."""
    if _current["store"] is not None:
        await settled(_current["store"], _current["services"])


@pytest.fixture(params=["leases", "per_request"])
def relay(request, io_loop, fake, store):
    """Every test here runs in both quota modes: leases (the default) and per request."""
    extra = "" if request.param == "leases" else "quota: {leases: false}"
    app, services = relay_app(one_upstream_config(fake.base_url, extra=extra), store, admin_token=ADMIN_TOKEN)
    yield app, services
    io_loop.run_sync(services.close)


@pytest.fixture(autouse=True)
def _settle_after_each_chat(store, services):
    _current["store"], _current["services"] = store, services
    yield
    _current["store"] = _current["services"] = None


async def key_doc(store, key=TEST_KEY):
    return await store.key_doc(hash_key(key))


async def test_prices_match_hand_computed_costs(http_server_client, auth, store):
    await chat(http_server_client, auth, "gpt-4")
    await chat(http_server_client, auth, "gpt-3.5-turbo")  # mapped to gpt-3.5-turbo-1106
    ledger = sorted(await store.ledger_entries(), key=lambda e: e["model"])
    assert [(e["model"], e["prompt_tokens"], e["completion_tokens"], e["cost"]) for e in ledger] == [
        ("gpt-3.5-turbo-1106", 8, 10, 19),  # ceil(8 × 2/3 + 10 × 4/3) = ceil(56/3)
        ("gpt-4", 8, 10, 560),              # 8 × 20 + 10 × 40
    ]
    e = ledger[1]
    assert e["upstream"] == "primary" and e["status"] == 200 and e["stream"] is False
    assert e["latency_ms"] >= e["ttfb_ms"] > 0
    doc = await key_doc(store)
    assert doc["used"] == 579 and doc["balance"] == 1_000_000 - 579
    await settle()
    await assert_conserved(store)


async def test_streams_are_charged_from_upstream_usage(http_server_client, auth, store, fake):
    resp = await chat(http_server_client, auth, "gpt-4", stream=True)
    assert resp.body.endswith(b"data: [DONE]\n\n") and b'"usage":{' not in resp.body
    [e] = await store.ledger_entries()
    assert (e["prompt_tokens"], e["completion_tokens"], e["cost"], e["stream"]) == (8, 10, 560, True)
    await settle()
    await assert_conserved(store)


@pytest.mark.parametrize("stream", [False, True])
async def test_without_upstream_usage_relay_counts_with_tiktoken(http_server_client, auth, store, fake, stream):
    fake.state.behaviour.omit_usage = True
    await chat(http_server_client, auth, "gpt-4", stream=stream)
    [e] = await store.ledger_entries()
    assert (e["prompt_tokens"], e["completion_tokens"], e["cost"]) == (8, 10, 560)


async def test_embeddings_are_charged_by_input(http_server_client, auth, store):
    body = json.dumps({"model": "text-embedding-ada-002", "input": ["hello world"] * 8})
    resp = await http_server_client.fetch("/v1/embeddings", method="POST", body=body, headers=auth)
    assert resp.code == 200
    await settle()
    [e] = await store.ledger_entries()
    assert (e["prompt_tokens"], e["completion_tokens"], e["cost"]) == (16, 0, 2)  # ceil(16/15)


async def test_upstream_failure_before_output_is_refunded(http_server_client, auth, store, fake):
    fake.state.behaviour.status = 500
    for stream in (False, True):
        assert (await chat(http_server_client, auth, stream=stream)).code == 502
    doc = await key_doc(store)
    assert doc["balance"] == 1_000_000 and len(await store.ledger_entries()) == 0
    await settle()
    await assert_conserved(store)


async def test_upstream_client_error_is_not_charged(http_server_client, auth, store, fake):
    fake.state.behaviour.status = 400
    assert (await chat(http_server_client, auth)).code == 400
    assert (await key_doc(store))["balance"] == 1_000_000
    await settle()
    await assert_conserved(store)


async def test_stream_cut_by_upstream_is_charged_for_what_was_delivered(http_server_client, auth, store, fake):
    fake.state.behaviour.truncate_after_chunks = 3
    fake.state.behaviour.chunk_delay = 0.02  # chunks reach relay before the connection drops
    resp = await chat(http_server_client, auth, stream=True)
    assert b"[DONE]" not in resp.body
    [e] = await store.ledger_entries()
    assert (e["prompt_tokens"], e["completion_tokens"], e["cost"]) == (8, 3, 8 * 20 + 3 * 40)
    await settle()
    await assert_conserved(store)


def _read_some_then_hang_up(port: int, key: str, events: int) -> bytes:
    body = json.dumps({"model": "gpt-4", "stream": True, "messages": HI}).encode()
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        got = b""
        while got.count(b"data: ") < events:
            got += s.recv(4096)
    return got


async def test_client_hanging_up_mid_stream_cancels_upstream_and_pays_for_delivery(
        http_server_client, auth, store, fake):
    fake.state.behaviour.chunk_delay = 0.1
    port = int(http_server_client.get_url("/").split(":")[2].split("/")[0])
    seen = await asyncio.get_running_loop().run_in_executor(None, _read_some_then_hang_up, port, TEST_KEY, 4)
    await eventually(lambda: store.ledger_entries(), timeout=5, message="the cut stream is settled")
    [e] = await store.ledger_entries()
    content_seen = seen.count(b'"content":"') - 1  # the role chunk carries empty content
    assert content_seen <= e["completion_tokens"] < 10
    assert e["cost"] == 8 * 20 + e["completion_tokens"] * 40
    await eventually(lambda: fake.requests[-1]["aborted"], timeout=2, message="the upstream request was cancelled")
    await settle()
    await assert_conserved(store)


async def test_balance_short_of_the_prompt_gets_429_and_nothing_is_forwarded(fake, io_loop):
    store = mock_store()
    await add_key(store, quota=100)  # a gpt-4 prompt of 8 tokens costs 160
    url, server, services = await serve(one_upstream_config(fake.base_url), store)
    from tornado.httpclient import AsyncHTTPClient
    resp = await AsyncHTTPClient().fetch(url + CHAT, method="POST", raise_error=False,
                                         headers={"Authorization": f"Bearer {TEST_KEY}"},
                                         body=json.dumps({"model": "gpt-4", "messages": HI}))
    err = json.loads(resp.body)["error"]
    assert resp.code == 429 and err["code"] == err["type"] == "insufficient_quota"
    assert fake.requests == []
    ok = await AsyncHTTPClient().fetch(url + CHAT, method="POST", raise_error=False,
                                       headers={"Authorization": f"Bearer {TEST_KEY}"},
                                       body=json.dumps({"model": "gpt-3.5-turbo", "messages": HI}))
    assert ok.code == 200  # a cheaper model still fits
    await settled(store, services)
    server.stop()
    await services.close()
    await settled(store, services)
    await assert_conserved(store)


async def test_unpriced_model_is_refused_naming_it(http_server_client, auth, fake):
    resp = await chat(http_server_client, auth, model="gpt-4-32k")
    err = json.loads(resp.body)["error"]
    assert resp.code == 400 and "gpt-4-32k" in err["message"] and err["code"] == "model_not_priced"
    assert fake.requests == []


@pytest.mark.parametrize("prefix", ["", "/v1", "/openai/v1"])
async def test_billing_endpoints_report_granted_and_usage(http_server_client, auth, store, prefix):
    costs = 0
    for model in ("gpt-4", "gpt-3.5-turbo", "gpt-4"):
        await chat(http_server_client, auth, model)
    costs = sum(e["cost"] for e in await store.ledger_entries())
    assert costs == 560 + 19 + 560
    sub = json.loads((await http_server_client.fetch(f"{prefix}/dashboard/billing/subscription",
                                                     headers=auth)).body)
    assert sub["hard_limit_usd"] == 1_000_000 and sub["access_until"] == 0 and sub["has_payment_method"]
    today = dt.datetime.now(dt.UTC).date()
    q = f"start_date={today.replace(day=1)}&end_date={today + dt.timedelta(days=1)}"
    usage = json.loads((await http_server_client.fetch(f"{prefix}/dashboard/billing/usage?{q}", headers=auth)).body)
    assert usage["total_usage"] == costs * 100
    assert sum(d["line_items"][0]["cost"] for d in usage["daily_costs"]) == costs * 100
    before = f"start_date={today - dt.timedelta(days=40)}&end_date={today - dt.timedelta(days=10)}"
    empty = json.loads((await http_server_client.fetch(f"/dashboard/billing/usage?{before}", headers=auth)).body)
    assert empty["total_usage"] == 0


@pytest.mark.parametrize("query", ["", "start_date=2026-01-01", "start_date=x&end_date=2026-01-02",
                                   "start_date=2026-02-01&end_date=2026-01-01",
                                   "start_date=2025-01-01&end_date=2026-01-01"])
async def test_bad_usage_queries_are_400(http_server_client, auth, query):
    resp = await http_server_client.fetch(f"/v1/dashboard/billing/usage?{query}", headers=auth, raise_error=False)
    assert resp.code == 400 and json.loads(resp.body)["error"]["type"] == "invalid_request_error"


async def test_the_usage_range_may_span_100_days_and_no_more(http_server_client, auth):
    """As docs/api.md and docs/quota.md say: end_date (exclusive) at most 100 days after start_date."""
    start = dt.date(2026, 1, 1)
    ok = await http_server_client.fetch(f"/v1/dashboard/billing/usage?start_date={start}"
                                        f"&end_date={start + dt.timedelta(days=100)}", headers=auth)
    assert ok.code == 200
    over = await http_server_client.fetch(f"/v1/dashboard/billing/usage?start_date={start}"
                                          f"&end_date={start + dt.timedelta(days=101)}", headers=auth,
                                          raise_error=False)
    error = json.loads(over.body)["error"]
    assert over.code == 400 and error["param"] == "end_date"
    assert error["message"] == "The date range may span at most 100 days."


async def test_topup_shows_in_billing_at_once(http_server_client, auth, store):
    await store.topup(hash_key(TEST_KEY), 500)
    sub = json.loads((await http_server_client.fetch("/dashboard/billing/subscription", headers=auth)).body)
    assert sub["hard_limit_usd"] == 1_000_500


async def test_exhausted_then_topped_up_key(fake, io_loop):
    store = mock_store()
    await add_key(store, quota=600)
    url, server, services = await serve(one_upstream_config(fake.base_url), store)
    from tornado.httpclient import AsyncHTTPClient
    http = AsyncHTTPClient()

    async def go():
        return await http.fetch(url + CHAT, method="POST", raise_error=False,
                                headers={"Authorization": f"Bearer {TEST_KEY}"},
                                body=json.dumps({"model": "gpt-4", "messages": HI}))
    assert (await go()).code == 200  # 600 covers the prompt: holds all 600, costs 560
    await settled(store, services)
    assert (await go()).code == 429  # 40 left < 160
    await store.topup(hash_key(TEST_KEY), 1000)  # made elsewhere (relay keys topup): seen within a second
    deadline = asyncio.get_running_loop().time() + 1.5
    while (code := (await go()).code) == 429 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert code == 200
    await settled(store, services)
    server.stop()
    await services.close()
    await settled(store, services)
    await assert_conserved(store)


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def test_admin_api_manages_keys(http_server_client, fake):
    c = http_server_client
    created = await c.fetch("/admin/keys", method="POST", headers=ADMIN, body=json.dumps({"quota": 1000, "note": "n"}))
    assert created.code == 201
    info = json.loads(created.body)
    key, prefix = info["key"], info["prefix"]
    assert key.startswith("ak-") and key.startswith(prefix) and info["balance"] == 1000
    user = {"Authorization": f"Bearer {key}"}
    assert (await chat(c, user)).code == 200
    shown = json.loads((await c.fetch(f"/admin/keys/{prefix}", headers=ADMIN)).body)
    assert {k: shown[k] for k in ("granted", "used", "reserved", "balance", "status", "note")} == {
        "granted": 1000, "used": 560, "reserved": 0, "balance": 440, "status": "active", "note": "n"}
    assert "created_at" in shown and "key" not in shown
    topped = json.loads((await c.fetch(f"/admin/keys/{key}/topup", method="POST", headers=ADMIN,
                                       body=json.dumps({"quota": 60}))).body)
    assert topped["granted"] == 1060 and topped["balance"] == 500
    await c.fetch(f"/admin/keys/{key}/disable", method="POST", headers=ADMIN, body=b"")
    resp = await chat(c, user)
    assert resp.code == 401 and json.loads(resp.body)["error"]["code"] == "key_disabled"
    await c.fetch(f"/admin/keys/{prefix}/enable", method="POST", headers=ADMIN, body=b"")
    assert (await chat(c, user)).code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}])
async def test_admin_api_refuses_without_the_right_token(http_server_client, headers):
    resp = await http_server_client.fetch("/admin/keys", method="POST", headers=headers, raise_error=False,
                                          body=json.dumps({"quota": 5}))
    assert resp.code == 401 and json.loads(resp.body)["error"]["code"] == "invalid_admin_token"


async def test_admin_api_is_off_without_a_configured_token(fake, io_loop):
    url, server, services = await serve(one_upstream_config(fake.base_url), mock_store(), admin_token="")
    from tornado.httpclient import AsyncHTTPClient
    resp = await AsyncHTTPClient().fetch(url + "/admin/keys", method="POST", raise_error=False,
                                         headers={"Authorization": "Bearer "}, body=json.dumps({"quota": 5}))
    assert resp.code == 401 and json.loads(resp.body)["error"]["code"] == "admin_disabled"
    server.stop()
    await services.close()


@pytest.mark.parametrize("body", [{"quota": -1}, {"quota": "5"}, {}, {"quota": 5, "note": 7}])
async def test_admin_bad_bodies_are_400(http_server_client, body):
    resp = await http_server_client.fetch("/admin/keys", method="POST", headers=ADMIN, raise_error=False,
                                          body=json.dumps(body))
    assert resp.code == 400


async def test_admin_unknown_key_is_404(http_server_client):
    resp = await http_server_client.fetch("/admin/keys/ak-nothing", headers=ADMIN, raise_error=False)
    assert resp.code == 404 and json.loads(resp.body)["error"]["code"] == "key_not_found"


async def test_admin_names_a_key_by_a_unique_prefix_of_6_or_more(http_server_client, store):
    """TEST_KEY is ak-test000...1; two more keys start ak-test0 too."""
    await add_key(store, key="ak-test1" + "1" * 36)
    await add_key(store, key="ak-test0x" + "2" * 35)
    c = http_server_client
    shown = json.loads((await c.fetch("/admin/keys/ak-test1", headers=ADMIN)).body)
    assert shown["prefix"] == "ak-test111" and shown["available"] == shown["granted"] - shown["used"]
    for given, count in (("ak-test0", 2), ("ak-tes", 3)):
        resp = await c.fetch(f"/admin/keys/{given}", headers=ADMIN, raise_error=False)
        error = json.loads(resp.body)["error"]
        assert resp.code == 400 and error["message"].startswith(f"ambiguous: {count} keys start with '{given}'")
    short = await c.fetch("/admin/keys/ak-zz", headers=ADMIN, raise_error=False)  # too short to say "none"
    assert short.code == 400 and "at least 6 characters" in json.loads(short.body)["error"]["message"]


async def test_concurrent_requests_on_half_a_budget_conserve_quota(fake, io_loop):
    """Condition (a) on mongomock; the wire suite repeats it on the embedded server."""
    store = mock_store()
    await add_key(store, quota=560 * 50)
    fake.state.behaviour.chunk_delay = 0.001
    url, server, services = await serve(one_upstream_config(fake.base_url), store)
    from tornado.httpclient import AsyncHTTPClient
    http = AsyncHTTPClient(force_instance=True, max_clients=100)

    async def one(i):
        return await http.fetch(url + CHAT, method="POST", raise_error=False,
                                headers={"Authorization": f"Bearer {TEST_KEY}"},
                                body=json.dumps({"model": "gpt-4", "messages": HI, "stream": i % 2 == 0,
                                                 "max_tokens": 10}))
    codes = [r.code for r in await asyncio.gather(*(one(i) for i in range(100)))]
    assert set(codes) <= {200, 429} and codes.count(200) == 50 and codes.count(429) == 50
    await settled(store, services)
    doc = await key_doc(store)
    assert doc["balance"] == 0
    server.stop()
    await services.close()
    http.close()
    await settled(store, services)
    await assert_conserved(store)


def test_cost_formula_examples_are_exact():
    # The issue's own examples: gpt-4 is 20× input, 40× output; one unit per 3.5-turbo input token.
    assert ceil(8 * 20 + 10 * 40) == 560


async def test_charge_uses_the_price_of_the_model_an_upstream_map_serves(fake, io_loop):
    store = mock_store()
    await add_key(store, quota=100_000)
    text = one_upstream_config(fake.base_url).replace(
        "keys: [", "model_map: {gpt-3.5-turbo-1106: gpt-4}\n    keys: [")
    url, server, services = await serve(text, store)
    from tornado.httpclient import AsyncHTTPClient
    resp = await AsyncHTTPClient().fetch(url + CHAT, method="POST", headers={"Authorization": f"Bearer {TEST_KEY}"},
                                         body=json.dumps({"model": "gpt-3.5-turbo", "messages": HI}))
    assert resp.code == 200 and fake.requests[-1]["model"] == "gpt-4"
    await settled(store, services)
    [e] = await store.ledger_entries()
    assert (e["model"], e["cost"]) == ("gpt-4", COST_GPT4)
    server.stop()
    await services.close()


COST_GPT4 = 8 * 20 + 10 * 40
