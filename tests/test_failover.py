"""Failover and health on real sockets: fake upstreams that fail on command."""
import asyncio
import json
import os
import time

import pytest
from tornado.httpclient import AsyncHTTPClient

from tests.conservation import assert_conserved, settled
from tests.helpers import PRICING, TEST_KEY, add_key, mock_store, serve, start_fake

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]
INTERVAL = 0.5
ADMIN = "admin-token-for-failover-tests"


def pool_config(primary, backup, extra=""):
    return f"""
upstreams:
  - name: primary
    base_url: {primary.base_url}
    keys: [sk-p1, sk-p2]
  - name: backup
    base_url: {backup.base_url}
    keys: [sk-b1]
    priority: 1
health: {{interval_s: {INTERVAL}, recheck_disabled_s: 1.0, probe_timeout_s: 0.5}}
timeouts: {{connect_s: 0.5, first_byte_s: 1, idle_s: 0.5}}
{PRICING}
{extra}
"""


@pytest.fixture
def two(io_loop):
    """Primary and backup fakes, and a relay in front of them."""
    primary, backup = start_fake(), start_fake()
    store = mock_store()
    io_loop.run_sync(lambda: add_key(store))
    url, server, services = io_loop.run_sync(lambda: serve(pool_config(primary, backup), store, admin_token=ADMIN))
    yield primary, backup, url, store, services
    server.stop()
    io_loop.run_sync(services.close)
    primary.stop()
    backup.stop()


def user(i):
    """A different conversation each time: cache affinity does not hold them on one key."""
    return [{"role": "user", "content": f"Hi, I am user {i}"}]


def client():
    return AsyncHTTPClient(force_instance=True, max_clients=64, defaults={"request_timeout": 30})


async def chat(c, url, stream=False, **extra):
    return await c.fetch(url + CHAT, method="POST", raise_error=False, headers={"Authorization": f"Bearer {TEST_KEY}"},
                         body=json.dumps({"model": "gpt-4", "messages": HI, "stream": stream, **extra}))


async def test_backup_serves_while_primary_is_down_and_traffic_returns(two):
    primary, backup, url, store, services = two
    c = client()
    await primary.go_down()
    codes = [(await chat(c, url, stream=i % 2 == 0)).code for i in range(20)]
    assert codes == [200] * 20
    assert backup.count() == 20
    primary.come_back()
    back_at = time.monotonic()
    await asyncio.sleep(2 * INTERVAL)
    before = primary.count()
    assert (await chat(c, url)).code == 200
    assert primary.count() == before + 1, "traffic is back on the primary tier within two health intervals"
    assert time.monotonic() - back_at < 2 * INTERVAL + 0.5
    await settled(store, services)
    await assert_conserved(store)
    c.close()


async def test_revoked_key_is_dropped_after_one_failure_and_comes_back(two):
    primary, backup, url, store, services = two
    c = client()
    primary.state.keys = {"sk-p2"}  # sk-p1 is revoked upstream
    codes = [(await chat(c, url, messages=user(i))).code for i in range(20)]
    assert codes == [200] * 20
    assert primary.count("sk-p1") <= 1, "a revoked key stops receiving requests after one failure"
    assert primary.count("sk-p2") >= 19 and backup.count() == 0
    primary.state.keys = {"sk-p1", "sk-p2"}
    await asyncio.sleep(1.0 + 2 * INTERVAL)  # the slower recheck of disabled keys
    seen = primary.count("sk-p1")
    for i in range(20):
        await chat(c, url, messages=user(i))
    assert primary.count("sk-p1") > seen, "the checker re-enabled the key"
    c.close()


async def test_429_rests_that_key_for_retry_after(two):
    primary, backup, url, store, services = two
    c = client()
    primary.state.behaviour.key_status = {"sk-p1": 429}
    primary.state.behaviour.retry_after = 2
    started = time.monotonic()
    codes = []
    while time.monotonic() - started < 1.2:
        codes.append((await chat(c, url, messages=user(len(codes)))).code)
    assert set(codes) == {200}
    assert primary.count("sk-p1") <= 1, "at most one 429 (a probe may see it first), then the key rests"
    assert primary.count("sk-p2") == len(codes) and backup.count() == 0
    primary.state.behaviour.key_status = {}
    await asyncio.sleep(2.2)
    for i in range(20):
        await chat(c, url, messages=user(i))
    assert primary.count("sk-p1") > 1, "after Retry-After the key carries load again"
    c.close()


async def test_stall_mid_stream_ends_within_the_idle_timeout_and_charges_what_arrived(two):
    primary, backup, url, store, services = two
    c = client()
    primary.state.behaviour.stall_after_chunks = 3
    t0 = time.monotonic()
    resp = await chat(c, url, stream=True)
    elapsed = time.monotonic() - t0
    assert resp.code == 200 and b"[DONE]" not in resp.body
    assert elapsed < 0.5 + 1.0, "the idle timeout (0.5 s) ended the stream"
    content = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in resp.body.split(b"\n\n")
               if e.startswith(b"data: {")]
    assert "".join(x for x in content if x) == "Hello from the"
    await settled(store, services)
    [e] = await store.ledger_entries()
    assert (e["prompt_tokens"], e["completion_tokens"], e["cost"]) == (8, 3, 8 * 20 + 3 * 40)
    assert (await chat(c, url)).code == 200  # relay keeps serving
    await settled(store, services)
    await assert_conserved(store)
    c.close()


async def test_hang_before_first_byte_fails_over_and_no_request_waits_forever(two):
    primary, backup, url, store, services = two
    c = client()
    primary.state.behaviour.first_byte_delay = 5
    t0 = time.monotonic()
    resp = await chat(c, url)
    assert resp.code == 200 and backup.count() == 1
    assert time.monotonic() - t0 < 4, "two first-byte timeouts of 1 s, then the backup"
    backup.state.behaviour.first_byte_delay = 5
    t0 = time.monotonic()
    resp = await chat(c, url)
    assert resp.code == 504 and json.loads(resp.body)["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - t0 < 4
    await settled(store, services)
    await assert_conserved(store)
    c.close()


async def test_no_retry_after_the_first_byte(two):
    primary, backup, url, store, services = two
    c = client()
    primary.state.behaviour.truncate_after_chunks = 2
    primary.state.behaviour.chunk_delay = 0.01
    resp = await chat(c, url, stream=True)
    assert resp.code == 200 and b"[DONE]" not in resp.body
    assert primary.count() + backup.count() == 1, "once bytes went out, the request is never sent again"
    c.close()


async def test_retries_stay_within_the_budget_in_a_total_outage(two):
    primary, backup, url, store, services = two
    c = client()
    primary.state.behaviour.status = 500
    backup.state.behaviour.status = 500
    n = 30
    codes = [(await chat(c, url)).code for _ in range(n)]
    assert set(codes) == {502}
    attempts = primary.count() + backup.count()
    # The budget's retries, and the free failover onto an upstream that has not failed yet: each
    # upstream takes those only until its first failure (one each, with requests one at a time).
    assert n <= attempts <= n + max(3, int(0.2 * n)) + 2, attempts
    await settled(store, services)
    await assert_conserved(store)
    c.close()


async def test_client_errors_are_not_retried(two):
    primary, backup, url, store, services = two
    c = client()
    primary.state.behaviour.status = 400
    assert (await chat(c, url)).code == 400
    assert primary.count() == 1 and backup.count() == 0
    c.close()


async def test_admin_upstreams_shows_states_with_masked_keys_and_readyz(two):
    primary, backup, url, store, services = two
    c = client()
    primary.state.keys = {"sk-p2"}
    await chat(c, url)
    await chat(c, url)
    view = await c.fetch(url + "/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN}"})
    text = view.body.decode()
    assert "sk-p1" not in text and "sk-p2" not in text and "sk-b1" not in text
    ups = {u["name"]: u for u in json.loads(text)["upstreams"]}
    assert ups["primary"]["tier"] == 0 and ups["backup"]["tier"] == 1
    states = {e["key_id"]: e["state"] for e in ups["primary"]["endpoints"]}
    assert states == {"k0": "disabled_by_checker", "k1": "healthy"}
    assert all(e["key"] == "***" for e in ups["primary"]["endpoints"])  # keys this short are hidden whole
    assert (await c.fetch(url + "/readyz")).code == 200
    denied = await c.fetch(url + "/admin/upstreams", raise_error=False)
    assert denied.code == 401
    c.close()


async def test_readyz_is_503_without_an_available_endpoint(io_loop):
    fake = start_fake(keys=set())  # refuses every key
    store = mock_store()
    await add_key(store)
    text = f"upstreams:\n  - {{name: only, base_url: '{fake.base_url}', keys: [sk-x]}}\n" \
           f"health: {{interval_s: 0.2}}\n{PRICING}"
    url, server, services = await serve(text, store)
    c = client()
    for _ in range(50):
        resp = await c.fetch(url + "/readyz", raise_error=False)
        if resp.code == 503:
            break
        await asyncio.sleep(0.05)
    assert resp.code == 503 and json.loads(resp.body)["available_endpoint"] is False
    server.stop()
    await services.close()
    fake.stop()
    c.close()


def write_atomically(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)  # what editors and config tools do


async def test_editing_the_pool_file_takes_effect_live(tmp_path, io_loop):
    a, b = start_fake(), start_fake()
    store = mock_store()
    await add_key(store)
    path = tmp_path / "upstreams.yaml"
    first = f"""
upstreams:
  - {{name: a, base_url: '{a.base_url}', keys: [sk-a1, sk-a2]}}
model_map: {{gpt-3.5-turbo: gpt-3.5-turbo-1106}}
{PRICING}"""
    path.write_text(first)
    url, server, services = await serve(first, store, admin_token=ADMIN, config_path=str(path))
    c = client()
    a.state.behaviour.chunk_delay = 0.1
    in_flight = asyncio.ensure_future(chat(c, url, stream=True))
    await asyncio.sleep(0.2)
    second = f"""
upstreams:
  - {{name: a, base_url: '{a.base_url}', keys: [sk-a1]}}
  - {{name: b, base_url: '{b.base_url}', keys: [sk-b1], weight: 3}}
model_map: {{gpt-3.5-turbo: gpt-4}}
{PRICING}"""
    write_atomically(path, second)
    t0 = time.monotonic()
    while not b.count():
        assert time.monotonic() - t0 < 5, "the new upstream must get traffic within 5 s"
        await chat(c, url)
        await asyncio.sleep(0.1)
    done = await in_flight
    assert done.code == 200 and done.body.endswith(b"data: [DONE]\n\n"), "the request in flight finished"
    a.state.behaviour.chunk_delay = 0
    a2_before, a1_before, b_before = a.count("sk-a2"), a.count("sk-a1"), b.count()
    for _ in range(40):
        body = json.dumps({"model": "gpt-3.5-turbo", "messages": HI})
        assert (await c.fetch(url + CHAT, method="POST", body=body,
                              headers={"Authorization": f"Bearer {TEST_KEY}"})).code == 200
    assert a.count("sk-a2") == a2_before, "a removed key gets nothing"
    models = {r["model"] for f in (a, b) for r in f.requests[-10:]}
    assert "gpt-4" in models and "gpt-3.5-turbo-1106" not in {r["model"] for r in b.requests}
    # weight 3 against 1: about 30 to 10 (b getting no more than a has odds below 1 in 10,000)
    assert b.count() - b_before > a.count("sk-a1") - a1_before
    # A broken file changes nothing, and says why.
    write_atomically(path, second.replace("weight: 3", "weight: 3, colour: red"))
    t0 = time.monotonic()
    while True:
        view = json.loads((await c.fetch(url + "/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN}"})).body)
        if view["config"]["last_reload_error"]:
            break
        assert time.monotonic() - t0 < 5
        await asyncio.sleep(0.1)
    assert "upstreams[1].colour: unknown key" in view["config"]["last_reload_error"]
    assert [u["name"] for u in view["upstreams"]] == ["a", "b"]
    resp = await c.fetch(url + "/admin/reload", method="POST", body=b"", raise_error=False,
                         headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.code == 400 and "upstreams[1].colour" in json.loads(resp.body)["error"]["message"]
    assert (await chat(c, url)).code == 200, "the old pool keeps serving"
    write_atomically(path, "upstreams: []\n")
    resp = await c.fetch(url + "/admin/reload", method="POST", body=b"", raise_error=False,
                         headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.code == 400 and "non-empty" in resp.body.decode()
    write_atomically(path, first)
    resp = await c.fetch(url + "/admin/reload", method="POST", body=b"", headers={"Authorization": f"Bearer {ADMIN}"})
    assert json.loads(resp.body) == {"reloaded": True}
    await settled(store, services)
    await assert_conserved(store)
    server.stop()
    await services.close()
    a.stop()
    b.stop()
    c.close()


async def test_an_outage_burst_right_after_other_failures_is_all_served_by_the_backup(io_loop):
    """The primary starts failing under 50 requests at once, the retry budget already spent by
    earlier failures: every request is served by the backup, none costs budget."""
    primary, backup, flaky = start_fake(), start_fake(), start_fake()
    store = mock_store()
    await add_key(store)
    text = f"""
upstreams:
  - {{name: primary, base_url: '{primary.base_url}', keys: [sk-p1, sk-p2], models: [gpt-4]}}
  - {{name: backup, base_url: '{backup.base_url}', keys: [sk-b1], priority: 1, models: [gpt-4]}}
  - {{name: flaky, base_url: '{flaky.base_url}', keys: [sk-f1, sk-f2], models: [gpt-3.5-turbo]}}
retries: {{budget_ratio: 0.01, budget_floor: 1}}
{PRICING}"""
    url, server, services = await serve(text, store)
    c = client()
    flaky.state.behaviour.status = 500
    resp = await c.fetch(url + CHAT, method="POST", raise_error=False, headers={"Authorization": f"Bearer {TEST_KEY}"},
                         body=json.dumps({"model": "gpt-3.5-turbo", "messages": HI}))
    assert resp.code == 502 and flaky.count() == 2, "the one retry the budget allows, spent"
    primary.state.behaviour.status = 500
    primary.state.behaviour.first_byte_delay = 0.2  # all 50 reach the primary before the first failure
    codes = [r.code for r in await asyncio.gather(*(chat(c, url, stream=i % 2 == 0) for i in range(50)))]
    assert codes == [200] * 50
    assert backup.count() == 50 and primary.count() >= 3, "enough to eject it"
    await settled(store, services)
    await assert_conserved(store)
    server.stop()
    await services.close()
    c.close()
    for f in (primary, backup, flaky):
        f.stop()
