"""The Responses API through relay, driven by the official openai SDK over real sockets: JSON and
typed-event streams charged exactly, stored responses for their owner only, on the upstream
account that made them, and the calls that cost nothing."""
import asyncio
import datetime as dt
import json
import socket
import time

import pytest
from openai import AsyncOpenAI, BadRequestError, InternalServerError, NotFoundError, RateLimitError

from relay.keys import hash_key
from tests.conservation import assert_conserved, settled
from tests.helpers import TEST_KEY, UPSTREAM_KEY, add_key, eventually

OTHER_KEY = "ak-test0000000000000000000000000000000000000002"
HI_COST = 8 * 20 + 10 * 40  # gpt-4: "Hi" is 8 input tokens, the fake's reply 10 output tokens


def client(url: str, key: str = TEST_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url, api_key=key, max_retries=0)


@pytest.fixture
def sdk(io_loop, base_url):
    c = client(base_url)
    yield c
    io_loop.run_sync(c.close)


async def ledger(store):
    return sorted(await store.ledger_entries(), key=lambda e: e["at"])


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
async def test_sdk_creates_a_response_charged_from_its_usage(http_server_client, fake, store, services, prefix):
    sdk = client(http_server_client.get_url(prefix))
    reply = await sdk.responses.create(model="gpt-4", input="Hi")
    assert reply.output_text == "Hello from the fake upstream, relay says hi!"
    assert reply.usage.input_tokens == 8 and reply.usage.output_tokens == 10
    seen = fake.requests[-1]
    assert seen["path"] == "/v1/responses" and seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "ak-" not in json.dumps(seen["headers"])
    await sdk.close()
    await settled(store, services)
    [entry] = await ledger(store)
    assert (entry["api"], entry["model"], entry["prompt_tokens"], entry["completion_tokens"], entry["cost"]) == \
        ("responses", "gpt-4", 8, 10, HI_COST)
    await assert_conserved(store)


async def test_stream_passes_typed_events_through_and_is_charged_from_completed(
        http_server_client, auth, fake, store, services, sdk):
    fake.state.behaviour.reasoning_tokens = 4
    fake.state.behaviour.cached_tokens = 6
    events = [e async for e in await sdk.responses.create(model="gpt-4", input="Hi", stream=True)]
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
        "Hello from the fake upstream, relay says hi!"
    # Byte for byte what the upstream sent: event lines, data lines, no [DONE].
    body = json.dumps({"model": "gpt-4", "input": "Hi", "stream": True})
    raw = await http_server_client.fetch("/v1/responses", method="POST", body=body, headers=auth)
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    assert raw.body.startswith(b"event: response.created\ndata: {") and b"[DONE]" not in raw.body
    assert raw.body.endswith(b"\n\n") and raw.body.count(b"event: ") == len(events)
    await settled(store, services)
    entries = await ledger(store)
    assert [(e["prompt_tokens"], e["cached_tokens"], e["completion_tokens"], e["reasoning_tokens"], e["stream"])
            for e in entries] == [(8, 6, 14, 4, True)] * 2
    assert entries[0]["cost"] == 2 * 20 + 6 * 20 + 14 * 40  # no cached or reasoning price: input and output
    await assert_conserved(store)


async def test_stream_reaches_the_client_before_the_upstream_finishes(fake, sdk):
    fake.state.behaviour.chunk_delay = 0.05
    first_at = None
    async for _ in await sdk.responses.create(model="gpt-4", input="Hi", stream=True):
        first_at = first_at or time.monotonic()
    sent = fake.requests[-1]["chunks_sent_at"]
    assert first_at < sent[-1] - 0.3, "the first event must arrive long before the upstream's last"


@pytest.mark.parametrize("stream", [False, True])
async def test_without_usage_relay_counts_the_delivered_text(fake, store, services, sdk, stream):
    fake.state.behaviour.omit_usage = True
    reply = await sdk.responses.create(model="gpt-4", input="Hi", stream=stream)
    if stream:
        [e async for e in reply]
    await settled(store, services)
    [entry] = await ledger(store)
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["cost"]) == (8, 10, HI_COST)
    await assert_conserved(store)


async def test_max_output_tokens_is_reserved_and_bounds_the_bill(fake, store, services, sdk):
    fake.state.behaviour.usage_override = {"input_tokens": 8, "output_tokens": 500}  # a lying upstream
    reply = await sdk.responses.create(model="gpt-4", input="Hi", max_output_tokens=3)
    assert reply.status == "incomplete"
    await settled(store, services)
    [entry] = await ledger(store)
    assert entry["completion_tokens"] == 3 and entry["cost"] == 8 * 20 + 3 * 40
    await assert_conserved(store)


@pytest.mark.parametrize("body, param", [
    ({"input": "Hi"}, "model"),
    ({"model": "gpt-4", "input": 42}, "input"),
    ({"model": "gpt-4", "input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "gpt-4", "input": "Hi", "max_output_tokens": 2 ** 31}, "max_output_tokens"),
    ({"model": "gpt-4", "input": "Hi", "max_output_tokens": True}, "max_output_tokens"),
    ({"model": "gpt-4", "input": "Hi", "stream": "yes"}, "stream"),
    ({"model": "gpt-4", "input": "Hi", "instructions": ["x"]}, "instructions"),
    ({"model": "gpt-4", "input": "Hi", "background": True}, "background"),
    ({"model": "gpt-4", "input": "Hi", "conversation": "conv_1"}, "conversation"),
    ({"model": "gpt-4", "input": "Hi", "previous_response_id": 7}, "previous_response_id"),
    ({"model": "gpt-4", "input": "Hi", "previous_response_id": "resp_nobody"}, "previous_response_id"),
])
async def test_bad_bodies_get_openai_shaped_400s_and_nothing_is_forwarded(
        http_server_client, auth, fake, store, body, param):
    resp = await http_server_client.fetch("/v1/responses", method="POST", body=json.dumps(body), headers=auth,
                                          raise_error=False)
    assert resp.code == 400, resp.body
    err = json.loads(resp.body)["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert fake.requests == []
    await assert_conserved(store)


async def test_stored_response_is_retrieved_listed_continued_and_deleted_by_its_owner(
        fake, store, services, sdk):
    first = await sdk.responses.create(model="gpt-4", input="Hi")
    got = await sdk.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    items = [i async for i in sdk.responses.input_items.list(first.id)]
    assert [i.type for i in items] == ["message"]
    follow = await sdk.responses.create(model="gpt-4", input="And?", previous_response_id=first.id)
    assert follow.usage.input_tokens == 18 + 8 + 1  # the conversation so far comes in with it
    count = await sdk.responses.input_tokens.count(model="gpt-4", input="Hi", previous_response_id=follow.id)
    assert count.input_tokens == 8 + follow.usage.input_tokens + follow.usage.output_tokens
    compacted = await sdk.responses.compact(model="gpt-4", input="Hi", previous_response_id=follow.id)
    assert compacted.usage.output_tokens == 5
    await sdk.responses.delete(first.id)
    with pytest.raises(NotFoundError):
        await sdk.responses.retrieve(first.id)
    assert await store.responses.find_one({"_id": first.id}) is None
    paths = [(r["method"], r["path"]) for r in fake.requests]
    assert ("GET", f"/v1/responses/{first.id}/input_items") in paths
    assert ("DELETE", f"/v1/responses/{first.id}") in paths
    await settled(store, services)
    entries = await ledger(store)
    # Created, continued and compacted are charged; retrieve, input_items, input_tokens and delete are not.
    assert [e["api"] for e in entries] == ["responses"] * 3
    assert entries[1]["prompt_tokens"] == follow.usage.input_tokens
    await assert_conserved(store)


async def test_a_continuation_reserves_the_conversation_it_brings_in(base_url, fake, store, services):
    # 560 for the first response; then 400 cover the continuation's own 8 input tokens (160) but
    # not with the 18 of the conversation it brings in (26 × 20 = 520): refused, nothing forwarded.
    key = await add_key(store, OTHER_KEY, quota=HI_COST + 400)
    sdk = client(base_url, key)
    first = await sdk.responses.create(model="gpt-4", input="Hi")
    record = await eventually(lambda: store.responses.find_one({"_id": first.id}), message="the owner is written")
    assert record["history"] == 18 and record["key_hash"] == hash_key(key)
    assert UPSTREAM_KEY not in json.dumps(record, default=str) and len(record["key_fp"]) == 16
    await settled(store, services)
    with pytest.raises(RateLimitError) as refused:
        await sdk.responses.create(model="gpt-4", input="Hi", previous_response_id=first.id)
    assert refused.value.status_code == 429 and refused.value.code == "insufficient_quota"
    assert len(fake.requests) == 1
    await sdk.close()
    await settled(store, services)
    await assert_conserved(store)


async def test_another_key_cannot_see_or_continue_a_response(http_server_client, base_url, fake, store, sdk):
    first = await sdk.responses.create(model="gpt-4", input="Hi")
    await add_key(store, OTHER_KEY)
    other = client(base_url, OTHER_KEY)
    with pytest.raises(NotFoundError) as retrieve:
        await other.responses.retrieve(first.id)
    with pytest.raises(NotFoundError) as unknown:
        await other.responses.retrieve("resp_unknown")
    assert retrieve.value.body == {**unknown.value.body, "message": f"Response with id '{first.id}' not found."}
    with pytest.raises(NotFoundError):
        await other.responses.delete(first.id)
    with pytest.raises(NotFoundError):
        [i async for i in other.responses.input_items.list(first.id)]
    with pytest.raises(BadRequestError) as cont:
        await other.responses.create(model="gpt-4", input="x", previous_response_id=first.id)
    assert cont.value.code == "previous_response_not_found"
    assert [r["method"] for r in fake.requests] == ["POST"], "nothing about it went upstream"
    await other.close()
    assert (await sdk.responses.retrieve(first.id)).id == first.id


async def test_cancel_goes_to_the_creating_upstream_and_is_not_charged(fake, store, services, sdk):
    first = await sdk.responses.create(model="gpt-4", input="Hi")
    cancelled = await sdk.responses.cancel(first.id)
    assert cancelled.id == first.id
    assert fake.requests[-1]["path"] == f"/v1/responses/{first.id}/cancel"
    await settled(store, services)
    assert len(await ledger(store)) == 1


def _read_some_then_hang_up(port: int, events: int) -> bytes:
    body = json.dumps({"model": "gpt-4", "stream": True, "input": "Hi"}).encode()
    head = (f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        got = b""
        while got.count(b"response.output_text.delta\ndata") < events:
            got += s.recv(4096)
    return got


async def test_client_hanging_up_mid_stream_cancels_upstream_and_pays_for_delivery(
        http_server_client, fake, store, services):
    fake.state.behaviour.chunk_delay = 0.1
    port = int(http_server_client.get_url("/").split(":")[2].split("/")[0])
    seen = await asyncio.get_running_loop().run_in_executor(None, _read_some_then_hang_up, port, 3)
    await eventually(lambda: fake.requests[-1]["aborted"], timeout=5, message="the upstream request was cancelled")
    await settled(store, services)
    [entry] = await ledger(store)
    assert seen.count(b"response.output_text.delta\ndata") <= entry["completion_tokens"] < 10
    assert entry["cost"] == 8 * 20 + entry["completion_tokens"] * 40
    # The response exists upstream all the same: its owner can still look at it.
    await eventually(lambda: store.responses.count_documents({}), message="the owner is written")
    await assert_conserved(store)


async def test_upstream_failure_before_output_is_refunded(fake, store, services, sdk):
    fake.state.behaviour.status = 500
    with pytest.raises(InternalServerError):
        await sdk.responses.create(model="gpt-4", input="Hi")
    await settled(store, services)
    assert await ledger(store) == []
    await assert_conserved(store)


@pytest.mark.parametrize("state", ["ejected", "disabled_by_checker"])
async def test_a_pinned_endpoint_that_is_unavailable_is_a_503_never_another_account(
        fake, store, services, sdk, state):
    first = await sdk.responses.create(model="gpt-4", input="Hi")
    [endpoint] = services.router.pool.endpoints
    now = services.router.clock()
    if state == "ejected":
        endpoint.upstream_health.ejected_until = now + 30
    else:
        endpoint.health.disabled_reason = "auth"
    sent = len(fake.requests)
    for call in (lambda: sdk.responses.retrieve(first.id),
                 lambda: sdk.responses.create(model="gpt-4", input="x", previous_response_id=first.id)):
        with pytest.raises(InternalServerError) as refused:
            await call()
        assert refused.value.status_code == 503 and refused.value.code == "pinned_endpoint_unavailable"
        assert state in refused.value.message and UPSTREAM_KEY not in refused.value.message
    if state == "ejected":
        assert 1 <= int(refused.value.response.headers["Retry-After"]) <= 30
    assert len(fake.requests) == sent, "nothing was sent anywhere"
    # A new conversation is not pinned: panic mode still tries the ejected upstream.
    if state == "ejected":
        await sdk.responses.create(model="gpt-4", input="Hi")
    await settled(store, services)
    await assert_conserved(store)


async def test_conservation_after_a_mixed_workload_with_failures_and_hang_ups(
        http_server_client, base_url, fake, store, services, sdk):
    fake.state.behaviour.chunk_delay = 0.01
    port = int(http_server_client.get_url("/").split(":")[2].split("/")[0])
    loop = asyncio.get_running_loop()
    first = await sdk.responses.create(model="gpt-4", input="Hi")

    async def streamed():
        return [e async for e in await sdk.responses.create(model="gpt-4", input="Hi", stream=True)]

    async def continued():
        return await sdk.responses.create(model="gpt-4", input="More", previous_response_id=first.id,
                                          max_output_tokens=5)

    async def over_a_socket():
        async with sdk.responses.connect() as conn:
            await conn.response.create(model="gpt-4", input="Hi", previous_response_id=first.id)
            async for event in conn:
                if event.type == "response.completed":
                    break
            await conn.response.create(model="gpt-4", input="Hi")
            async for event in conn:
                if event.type == "response.output_text.delta":
                    break  # and the socket closes mid-turn

    work = [sdk.responses.create(model="gpt-4", input="Hi") for _ in range(6)]
    work += [streamed() for _ in range(6)] + [continued() for _ in range(4)] + [over_a_socket() for _ in range(3)]
    work += [loop.run_in_executor(None, _read_some_then_hang_up, port, 2) for _ in range(3)]
    work += [sdk.responses.input_tokens.count(model="gpt-4", input="Hi") for _ in range(2)]
    results = await asyncio.gather(*work, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)], results
    fake.state.behaviour.status = 503
    failed = await asyncio.gather(*(sdk.responses.create(model="gpt-4", input="Hi") for _ in range(3)),
                                  return_exceptions=True)
    assert all(isinstance(r, InternalServerError) for r in failed)
    await settled(store, services)
    entries = await ledger(store)
    assert len(entries) == 1 + 6 + 6 + 4 + 3 * 2 + 3, "every create, stream and turn once; nothing free or failed"
    assert len({e["_id"] for e in entries}) == len(entries)
    assert sum(e["cost"] for e in entries) == (await store.key_doc(hash_key(TEST_KEY)))["used"]
    await assert_conserved(store)


async def test_responses_show_in_billing_the_usage_page_and_the_metrics_like_chat(
        http_server_client, auth, store, services, sdk):
    def counted(text: str, line: str) -> float:  # the metrics are the process's: other tests count too
        return next((float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line + " ")), 0.0)

    before = (await http_server_client.fetch("/metrics")).body.decode()
    await sdk.responses.create(model="gpt-4", input="Hi")
    [e async for e in await sdk.responses.create(model="gpt-4", input="Hi", stream=True)]
    await settled(store, services)
    summary = json.loads((await http_server_client.fetch("/usage/api/summary", headers=auth)).body)
    assert [(r["model"], r["cost"]) for r in summary["recent"]] == [("gpt-4", HI_COST)] * 2
    assert summary["used"] == 2 * HI_COST
    day = dt.datetime.now(dt.UTC).date()
    billing = json.loads((await http_server_client.fetch(
        f"/dashboard/billing/usage?start_date={day}&end_date={day + dt.timedelta(days=1)}", headers=auth)).body)
    assert billing["total_usage"] == 2 * HI_COST * 100
    after = (await http_server_client.fetch("/metrics")).body.decode()
    for line, grew in [('relay_requests_total{model="gpt-4",route="responses",status_class="2xx"}', 2),
                       ('relay_quota_units_charged_total{model="gpt-4"}', 2 * HI_COST)]:
        assert counted(after, line) - counted(before, line) == grew, line
