"""The Responses API's WebSocket mode through relay, driven by the openai SDK's
``responses.connect()``: turns billed one by one, a mid-turn close billed what was delivered,
bad frames answered with error events, the relay key checked on the upgrade."""
import json

import pytest
import websockets
from openai import AsyncOpenAI

from relay.keys import hash_key
from tests.conservation import assert_conserved, settled
from tests.helpers import TEST_KEY, UPSTREAM_KEY, add_key, eventually

HI_COST = 8 * 20 + 10 * 40


def client(url: str, key: str = TEST_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url, api_key=key, max_retries=0)


@pytest.fixture
def sdk(io_loop, base_url):
    c = client(base_url)
    yield c
    io_loop.run_sync(c.close)


async def until_done(conn) -> list:
    events = []
    async for event in conn:
        events.append(event)
        if event.type in ("response.completed", "response.incomplete", "response.failed", "error"):
            return events
    return events


async def ledger(store):
    return sorted(await store.ledger_entries(), key=lambda e: e["at"])


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
async def test_a_session_of_several_turns_is_billed_turn_by_turn(http_server_client, fake, store, services, prefix):
    sdk = client(http_server_client.get_url(prefix))
    async with sdk.responses.connect() as conn:
        await conn.response.create(model="gpt-4", input="Hi")
        first = await until_done(conn)
        assert first[-1].type == "response.completed"
        assert "".join(e.delta for e in first if e.type == "response.output_text.delta") == \
            "Hello from the fake upstream, relay says hi!"
        first_id = first[-1].response.id
        # Continued on the socket with store: false, as WebSocket mode is meant to be used.
        await conn.response.create(model="gpt-4", input="And?", previous_response_id=first_id, store=False)
        second = await until_done(conn)
        await conn.response.create(model="gpt-4", input="Hi", previous_response_id=second[-1].response.id,
                                   max_output_tokens=4)
        third = await until_done(conn)
    await sdk.close()
    assert [t[-1].type for t in (second, third)] == ["response.completed", "response.incomplete"]
    # One upstream socket, with the upstream's key; the relay key never went upstream.
    sockets = [r for r in fake.state.requests if r["method"] == "WS" and "response_id" not in r and "done" not in r]
    assert len(sockets) == 1 and sockets[0]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    await settled(store, services)
    entries = await ledger(store)
    assert len({e["_id"] for e in entries}) == 3 and all(e["api"] == "responses" and e["stream"] for e in entries)
    usages = [t[-1].response.usage for t in (first, second, third)]
    assert [(e["prompt_tokens"], e["completion_tokens"]) for e in entries] == \
        [(u.input_tokens, u.output_tokens) for u in usages]
    assert entries[0]["cost"] == HI_COST
    # The stored turns are reachable over HTTP, from the same upstream account; store: false is not.
    record = await eventually(lambda: store.responses.find_one({"_id": first_id}), message="the owner is written")
    assert record["key_hash"] == hash_key(TEST_KEY)
    assert await store.responses.find_one({"_id": second[-1].response.id}) is None
    await assert_conserved(store)


async def test_a_client_closing_mid_turn_pays_for_what_was_delivered(fake, store, services, sdk):
    fake.state.behaviour.chunk_delay = 0.1
    async with sdk.responses.connect() as conn:
        await conn.response.create(model="gpt-4", input="Hi")
        deltas = 0
        async for event in conn:
            deltas += event.type == "response.output_text.delta"
            if deltas == 3:
                break
    await eventually(lambda: fake.state.requests[-1]["aborted"], timeout=5,
                     message="the upstream socket was closed, cancelling its work")
    await settled(store, services)
    [entry] = await ledger(store)
    assert 3 <= entry["completion_tokens"] < 10
    assert entry["cost"] == 8 * 20 + entry["completion_tokens"] * 40
    await assert_conserved(store)


async def test_bad_frames_get_error_events_and_the_socket_goes_on(http_server_client, fake, store, services):
    url = http_server_client.get_url("/v1/responses").replace("http", "ws")
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {TEST_KEY}"}) as ws:
        for frame, param in [("not json", None), ("[1]", None), ('{"type": "session.update"}', "type"),
                             ('{"type": "response.create", "input": "Hi"}', "model"),
                             ('{"type": "response.create", "model": "gpt-4", "max_output_tokens": -1}',
                              "max_output_tokens"),
                             ('{"type": "response.create", "model": "gpt-4", "previous_response_id": "resp_x"}',
                              "previous_response_id"),
                             ('{"type": "response.create", "model": "nope"}', "model")]:
            await ws.send(frame)
            event = json.loads(await ws.recv())
            assert event["type"] == "error" and event["status"] in (400, 404), event
            assert event["error"]["param"] == param and event["error"]["message"]
        await ws.send(json.dumps({"type": "response.create", "model": "gpt-4", "input": "Hi"}))
        while (event := json.loads(await ws.recv()))["type"] != "response.completed":
            pass
    assert len([r for r in fake.requests if r.get("response_id")]) == 1, "only the good frame went upstream"
    await settled(store, services)
    assert [e["cost"] for e in await ledger(store)] == [HI_COST]
    await assert_conserved(store)


@pytest.mark.parametrize("key", [None, "ak-" + "x" * 40])
async def test_the_upgrade_needs_a_relay_key(http_server_client, fake, key):
    url = http_server_client.get_url("/v1/responses").replace("http", "ws")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, additional_headers=headers):
            pass
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
    assert fake.requests == []


async def test_a_turn_the_balance_cannot_cover_is_refused_with_an_error_event(base_url, fake, store, services):
    key = await add_key(store, "ak-test0000000000000000000000000000000000000003", quota=100)
    sdk = client(base_url, key)
    async with sdk.responses.connect() as conn:
        await conn.response.create(model="gpt-4", input="Hi")
        [event] = await until_done(conn)
    await sdk.close()
    assert event.type == "error" and event.status == 429 and event.error.code == "insufficient_quota"
    assert fake.requests == []
    await settled(store, services)
    await assert_conserved(store)


async def test_an_upstream_breaking_off_mid_turn_closes_the_socket_and_bills_what_was_delivered(
        fake, store, services, sdk):
    async with sdk.responses.connect() as conn:
        await conn.response.create(model="gpt-4", input="Hi")
        await until_done(conn)
        fake.state.behaviour.truncate_after_chunks = 2
        await conn.response.create(model="gpt-4", input="Hi")
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await until_done(conn)
    assert closed.value.rcvd.code == 1011
    await settled(store, services)
    assert [(e["completion_tokens"], e["cost"]) for e in await ledger(store)] == [(10, HI_COST), (2, 160 + 80)]
    await assert_conserved(store)


async def test_an_upstream_refusing_the_socket_fails_the_turn_over_and_refunds_when_all_fail(
        fake, store, services, sdk):
    fake.state.behaviour.status = 500
    async with sdk.responses.connect() as conn:
        await conn.response.create(model="gpt-4", input="Hi")
        [event] = await until_done(conn)
    assert event.type == "error" and event.status == 502 and event.error.type == "upstream_error"
    assert UPSTREAM_KEY not in event.error.message
    await settled(store, services)
    assert await ledger(store) == []
    await assert_conserved(store)
