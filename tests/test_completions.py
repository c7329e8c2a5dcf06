"""Legacy completions, moderations and the model object, through relay with the official openai SDK
over real sockets, against the fake upstream: the wire shapes, the prices, refunds and conservation."""
import asyncio
import datetime as dt
import json
import socket
from fractions import Fraction
from math import ceil
from urllib.parse import quote

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI
from tornado.httpclient import AsyncHTTPClient

from relay.config import parse_config
from relay.keys import hash_key
from relay.metering.completions import count_completion_prompt, echoed_tokens, quote_completion
from relay.proxy.sse import CompletionStreamMeter, StreamMeter
from tests.conftest import ADMIN_TOKEN
from tests.conservation import assert_conserved, settled
from tests.helpers import TEST_KEY, UPSTREAM_KEY, add_key, eventually, relay_app
from tests.test_metrics import value

INSTRUCT = "gpt-3.5-turbo-instruct"  # {input: 1, output: 4/3}
PROMPT = "Say this is a test"  # 5 tokens (cl100k); the fake completes with 10 tokens
REPLY = "Hello from the fake upstream, relay says hi!"
FINE_TUNE = "ft:gpt-4o-mini:org::abc123"

CONFIG = """
upstreams:
  - name: primary
    base_url: {base_url}
    keys: [{key}]
model_map:
  gpt-3.5-turbo: gpt-3.5-turbo-1106
  instruct: gpt-3.5-turbo-instruct
pricing:
  gpt-3.5-turbo-1106: {{input: "2/3", output: "4/3"}}
  gpt-4: {{input: 20, output: 40}}
  gpt-3.5-turbo-instruct: {{input: 1, output: "4/3"}}
  omni-moderation-latest: {{input: 0}}
  text-moderation-latest: {{input: 0}}
  "{fine_tune}": {{input: "1/10", output: "2/5"}}
  meta-llama/Llama-3-8b: {{input: 1, output: 1}}
"""


@pytest.fixture
def relay(io_loop, fake, store):
    """One fake upstream, the legacy models priced, leases on (the default)."""
    text = CONFIG.format(base_url=fake.base_url, key=UPSTREAM_KEY, fine_tune=FINE_TUNE)
    app, services = relay_app(text, store, admin_token=ADMIN_TOKEN)
    yield app, services
    io_loop.run_sync(services.close)


@pytest.fixture
def client(io_loop):
    """``client(url, key)``: an SDK client, closed after the test whatever happened."""
    made: list[AsyncOpenAI] = []

    def make(url: str, key: str = TEST_KEY) -> AsyncOpenAI:
        made.append(AsyncOpenAI(base_url=url, api_key=key, max_retries=0))
        return made[-1]
    yield make
    for sdk in made:
        io_loop.run_sync(sdk.close)


async def ledger(store, services) -> list[dict]:
    await settled(store, services)
    return sorted(await store.ledger_entries(), key=lambda e: e["at"])


async def post(http_server_client, path: str, body: dict, key: str = TEST_KEY):
    return await http_server_client.fetch(path, method="POST", body=json.dumps(body), raise_error=False,
                                          headers={"Authorization": f"Bearer {key}"})


# --- completions ---------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
async def test_sdk_completes_a_prompt_and_pays_its_tokens(client, http_server_client, fake, store, services, prefix):
    sdk = client(http_server_client.get_url(prefix))
    reply = await sdk.completions.create(model="instruct", prompt=PROMPT)
    assert reply.object == "text_completion" and reply.choices[0].text == REPLY
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 10)
    seen = fake.requests[-1]
    assert seen["path"] == "/v1/completions" and seen["model"] == INSTRUCT
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    [e] = await ledger(store, services)
    # 5 × 1 + 10 × 4/3 = 55/3 → 19
    assert (e["model"], e["requested_model"], e["api"], e["prompt_tokens"], e["completion_tokens"], e["cost"]) == \
        (INSTRUCT, "instruct", "completions", 5, 10, 19)
    await assert_conserved(store)


async def test_sdk_streams_a_completion_and_gets_usage_only_when_asked(client, base_url, fake, store, services):
    sdk = client(base_url)
    plain = [c async for c in await sdk.completions.create(model=INSTRUCT, prompt=PROMPT, stream=True)]
    assert "".join(c.choices[0].text for c in plain) == REPLY
    assert all(c.choices and c.usage is None for c in plain), "the usage chunk relay asked for is dropped"
    assert fake.requests[-1]["stream_options"] == {"include_usage": True}
    asked = [c async for c in await sdk.completions.create(model=INSTRUCT, prompt=PROMPT, stream=True,
                                                             stream_options={"include_usage": True})]
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 10
    entries = await ledger(store, services)
    assert [(e["stream"], e["prompt_tokens"], e["completion_tokens"], e["cost"]) for e in entries] == \
        [(True, 5, 10, 19)] * 2
    await assert_conserved(store)


async def test_a_prompt_list_gets_choices_for_each_prompt_and_pays_for_all(client, base_url, store, services):
    sdk = client(base_url)
    reply = await sdk.completions.create(model=INSTRUCT, prompt=[PROMPT, "Once upon a time"], n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3] and {c.text for c in reply.choices} == {REPLY}
    stream = await sdk.completions.create(model=INSTRUCT, prompt=[PROMPT, "Once upon a time"], stream=True)
    texts: dict[int, str] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: REPLY, 1: REPLY}
    entries = await ledger(store, services)
    # 5 + 4 prompt tokens; 10 completion tokens per choice: 4 choices, then 2.
    # 9 + 40 × 4/3 = 187/3 → 63;  9 + 20 × 4/3 = 107/3 → 36
    assert [(e["prompt_tokens"], e["completion_tokens"], e["cost"]) for e in entries] == [(9, 40, 63), (9, 20, 36)]
    await assert_conserved(store)


async def test_token_arrays_count_as_given_and_best_of_is_paid_in_full(client, base_url, fake, store, services):
    sdk = client(base_url)
    reply = await sdk.completions.create(model=INSTRUCT, prompt=[[9906, 1917], [1, 2, 3]], max_tokens=4)
    assert [c.text for c in reply.choices] == ["Hello from the fake"] * 2
    reply = await sdk.completions.create(model=INSTRUCT, prompt=[9906, 1917, 0], best_of=3, max_tokens=5)
    assert len(reply.choices) == 1, "best_of generates 3 and returns n (1)"
    fake.state.behaviour.omit_usage = True  # relay counts: every returned choice's text
    await sdk.completions.create(model=INSTRUCT, prompt=[[9906, 1917], [1, 2, 3]], max_tokens=4)
    entries = await ledger(store, services)
    # 2 + 3 prompt tokens, 4 per choice: 5 + 8 × 4/3 = 47/3 → 16
    # 3 prompt tokens, best_of 3 × 5 completion tokens: 3 + 15 × 4/3 = 23
    assert [(e["prompt_tokens"], e["completion_tokens"], e["cost"]) for e in entries] == \
        [(5, 8, 16), (3, 15, 23), (5, 8, 16)]
    await assert_conserved(store)


async def test_the_legacy_default_of_16_tokens_is_reserved_for_every_generated_choice(
        client, base_url, fake, store, services):
    fake.state.behaviour.first_byte_delay = 1.0  # the request holds its reservation meanwhile
    sdk = client(base_url)

    def holds():
        wallet = services.quota.book.wallets.get(hash_key(TEST_KEY))
        return list(wallet.holds.values()) if wallet else []
    request = asyncio.ensure_future(sdk.completions.create(model=INSTRUCT, prompt=[PROMPT, PROMPT], n=2, best_of=3))
    held = await eventually(holds, timeout=5, message="the request holds its reservation")
    await request
    # 10 prompt tokens + 16 tokens × best_of 3 × 2 prompts at 4/3: 10 + 128 = 138
    assert held == [138]
    [e] = await ledger(store, services)
    assert (e["prompt_tokens"], e["completion_tokens"], e["cost"]) == (10, 60, 90)  # 10 + 60 × 4/3
    await assert_conserved(store)


@pytest.mark.parametrize("stream", [False, True])
async def test_without_upstream_usage_the_echoed_prompt_is_not_billed_as_completion(
        client, http_server_client, fake, store, services, stream):
    fake.state.behaviour.omit_usage = True
    sdk = client(http_server_client.get_url("/v1"))
    prompt = "Say this is a test.\n"  # 6 tokens
    if stream:
        text = "".join([c.choices[0].text async for c in await sdk.completions.create(
            model=INSTRUCT, prompt=prompt, echo=True, stream=True)])
    else:
        text = (await sdk.completions.create(model=INSTRUCT, prompt=prompt, echo=True)).choices[0].text
    assert text == prompt + REPLY
    [e] = await ledger(store, services)
    assert (e["prompt_tokens"], e["completion_tokens"], e["cost"]) == (6, 10, 6 + 14)  # 6 + 40/3 → 20
    await assert_conserved(store)


async def test_an_upstream_failure_is_refunded(client, base_url, fake, store, services):
    fake.state.behaviour.status = 500
    sdk = client(base_url)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as failed:
            await sdk.completions.create(model=INSTRUCT, prompt=PROMPT, stream=stream)
        assert failed.value.status_code == 502
    assert await ledger(store, services) == []
    doc = await store.key_doc(hash_key(TEST_KEY))
    assert doc["used"] == 0 and doc["balance"] == 1_000_000
    await assert_conserved(store)


def _read_some_then_hang_up(port: int, events: int) -> bytes:
    body = json.dumps({"model": INSTRUCT, "prompt": PROMPT, "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        got = b""
        while got.count(b"data: ") < events:
            got += s.recv(4096)
    return got


async def test_a_client_hanging_up_mid_stream_cancels_upstream_and_pays_for_what_it_got(
        http_server_client, fake, store, services):
    fake.state.behaviour.chunk_delay = 0.1
    port = int(http_server_client.get_url("/").split(":")[2].split("/")[0])
    seen = await asyncio.get_running_loop().run_in_executor(None, _read_some_then_hang_up, port, 3)
    await eventually(lambda: fake.requests[-1]["aborted"], timeout=5, message="the upstream request was cancelled")
    [e] = await ledger(store, services)
    pieces_seen = seen.count(b'"text":"') - seen.count(b'"text":""')
    assert 3 <= pieces_seen <= e["completion_tokens"] < 10
    assert e["prompt_tokens"] == 5 and e["cost"] == 5 + -(-e["completion_tokens"] * 4 // 3)
    await assert_conserved(store)


@pytest.mark.parametrize("body, param", [
    ({"model": INSTRUCT}, "prompt"),
    ({"model": INSTRUCT, "prompt": 42}, "prompt"),
    ({"model": INSTRUCT, "prompt": []}, "prompt"),
    ({"model": INSTRUCT, "prompt": ["a", [1, 2]]}, "prompt"),
    ({"model": INSTRUCT, "prompt": [[1], []]}, "prompt"),
    ({"model": INSTRUCT, "prompt": [1, -2]}, "prompt"),
    ({"model": INSTRUCT, "prompt": [True]}, "prompt"),
    ({"model": INSTRUCT, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": INSTRUCT, "prompt": "x", "max_tokens": 2**31}, "max_tokens"),
    ({"model": INSTRUCT, "prompt": "x", "max_tokens": "16"}, "max_tokens"),
    ({"model": INSTRUCT, "prompt": "x", "n": 0}, "n"),
    ({"model": INSTRUCT, "prompt": "x", "n": 129}, "n"),
    ({"model": INSTRUCT, "prompt": "x", "best_of": 21}, "best_of"),
    ({"model": INSTRUCT, "prompt": "x", "best_of": 2.5}, "best_of"),
    ({"model": INSTRUCT, "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": INSTRUCT, "prompt": "x", "echo": 1}, "echo"),
    ({"model": INSTRUCT, "prompt": "x", "suffix": ["a"]}, "suffix"),
    ({"prompt": "x"}, "model"),
])
async def test_bad_completion_requests_are_openai_shaped_400s_and_nothing_is_forwarded(
        http_server_client, fake, body, param):
    resp = await post(http_server_client, "/v1/completions", body)
    assert resp.code == 400, resp.body
    error = json.loads(resp.body)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert fake.requests == []


async def test_completion_limits_at_their_bounds_are_served(http_server_client, store, services):
    for body in ({"prompt": "x", "max_tokens": 0, "echo": True}, {"prompt": "x", "n": 128, "max_tokens": 1},
                 {"prompt": "x", "best_of": 20, "max_tokens": 1}, {"prompt": [[0]]}):
        resp = await post(http_server_client, "/v1/completions", {"model": INSTRUCT, **body})
        assert resp.code == 200, (body, resp.body)
    await settled(store, services)
    await assert_conserved(store)


# --- moderations ---------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
async def test_sdk_moderates_for_free_and_the_ledger_records_it(client, http_server_client, fake, store, services,
                                                                prefix):
    sdk = client(http_server_client.get_url(prefix))
    result = await sdk.moderations.create(input="I will kill you")
    assert result.results[0].flagged and result.results[0].categories.violence
    assert fake.requests[-1]["model"] == "omni-moderation-latest", "the default model is named upstream"
    several = await sdk.moderations.create(model="text-moderation-latest", input=["hello", "I hate you"])
    assert [r.flagged for r in several.results] == [False, True]
    parts = await sdk.moderations.create(input=[
        {"type": "text", "text": "a kill"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}])
    assert parts.results[0].category_applied_input_types.violence == ["text", "image"]
    entries = await ledger(store, services)
    assert [(e["api"], e["model"], e["completion_tokens"], e["cost"]) for e in entries] == [
        ("moderations", "omni-moderation-latest", 0, 0), ("moderations", "text-moderation-latest", 0, 0),
        ("moderations", "omni-moderation-latest", 0, 0)]
    assert entries[1]["prompt_tokens"] == 4  # "hello", "I hate you" counted, at price 0
    await assert_conserved(store)


async def test_a_free_moderation_is_served_on_an_empty_balance_but_needs_a_key(
        client, http_server_client, fake, store, services):
    broke = "ak-test0000000000000000000000000000000000000002"
    await add_key(store, broke, quota=0)
    sdk, stranger = client(http_server_client.get_url("/v1"), broke), client(http_server_client.get_url("/v1"),
                                                                              "ak-" + "z" * 40)
    result = await sdk.moderations.create(input="hello")
    assert result.results[0].flagged is False
    with pytest.raises(openai.RateLimitError):  # a priced request on that key is refused
        await sdk.completions.create(model=INSTRUCT, prompt="x")
    with pytest.raises(openai.AuthenticationError):
        await stranger.moderations.create(input="hello")
    [e] = await ledger(store, services)
    assert (e["key_hash"], e["api"], e["cost"]) == (hash_key(broke), "moderations", 0)
    await assert_conserved(store)


@pytest.mark.parametrize("body, status, param", [
    ({}, 400, "input"),
    ({"input": 7}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [1, 2]}, 400, "input"),
    ({"input": "x", "model": 5}, 400, "model"),
    ({"input": "x", "model": "no-such-moderation"}, 400, "model"),  # served by "*", but not priced
])
async def test_bad_moderation_requests_are_openai_shaped_errors(http_server_client, fake, body, status, param):
    resp = await post(http_server_client, "/v1/moderations", body)
    assert resp.code == status, resp.body
    assert json.loads(resp.body)["error"]["param"] == param
    assert fake.requests == []


# --- the model object ----------------------------------------------------------------------

async def test_sdk_retrieves_a_served_model_and_gets_not_found_otherwise(client, base_url, http_server_client):
    sdk = client(base_url)
    for name in ("gpt-4", "gpt-3.5-turbo", "instruct", FINE_TUNE, "meta-llama/Llama-3-8b"):
        model = await sdk.models.retrieve(name)
        assert (model.id, model.object, model.owned_by) == (name, "model", "relay")
        assert isinstance(model.created, int)
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found" and missing.value.body["param"] == "model"
    resp = await http_server_client.fetch("/openai/v1/models/gpt-4", raise_error=False,
                                          headers={"Authorization": f"Bearer {TEST_KEY}"})
    assert json.loads(resp.body) == {"id": "gpt-4", "object": "model", "created": 0, "owned_by": "relay"}
    assert (await http_server_client.fetch("/v1/models/gpt-4", raise_error=False)).code == 401


# --- all of it together --------------------------------------------------------------------

async def test_a_mixed_workload_of_these_routes_conserves_every_unit(
        client, http_server_client, fake, store, services):
    sdk = client(http_server_client.get_url("/v1"))
    fake.state.behaviour.chunk_delay = 0.002
    metrics_before = (await http_server_client.fetch("/metrics")).body.decode()

    async def stream_all(**kw):
        return [c async for c in await sdk.completions.create(model=INSTRUCT, stream=True, **kw)]
    work = []
    for i in range(6):
        work += [sdk.completions.create(model=INSTRUCT, prompt=[PROMPT] * (1 + i % 3), max_tokens=3 + i),
                 stream_all(prompt=PROMPT, n=1 + i % 2),
                 sdk.moderations.create(input=["hello"] * (1 + i)),
                 sdk.models.retrieve("instruct"),
                 sdk.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hi"}])]
    await asyncio.gather(*work)
    entries = await ledger(store, services)
    by_api = {api: [e for e in entries if e["api"] == api] for api in ("completions", "moderations", "chat")}
    assert [len(v) for v in by_api.values()] == [12, 6, 6]
    assert all(e["cost"] == 0 for e in by_api["moderations"])
    doc = await store.key_doc(hash_key(TEST_KEY))
    assert doc["used"] == sum(e["cost"] for e in entries) > 0
    c = AsyncHTTPClient()
    today = dt.datetime.now(dt.UTC).date()
    usage = json.loads((await c.fetch(http_server_client.get_url(
        f"/v1/dashboard/billing/usage?start_date={today}&end_date={today + dt.timedelta(days=1)}"),
        headers={"Authorization": f"Bearer {TEST_KEY}"})).body)
    summary = json.loads((await c.fetch(http_server_client.get_url("/usage/api/summary"),
                                        headers={"Authorization": f"Bearer {TEST_KEY}"})).body)
    assert {r["api"] for r in summary["recent"]} >= {"completions", "moderations"}
    await assert_conserved(store)
    assert usage["total_usage"] == doc["used"] * 100
    metrics = (await http_server_client.fetch("/metrics")).body.decode()

    def delta(name, **labels):
        return value(metrics, name, **labels) - value(metrics_before, name, **labels)
    assert delta("relay_requests_total", route="completions", model=INSTRUCT, status_class="2xx") == 12
    assert delta("relay_requests_total", route="moderations", model="omni-moderation-latest", status_class="2xx") == 6
    assert delta("relay_requests_total", route="models", model="instruct", status_class="2xx") == 6
    assert delta("relay_tokens_total", model="omni-moderation-latest", kind="prompt") == sum(range(1, 7))
    assert delta("relay_quota_units_charged_total", model=INSTRUCT) == sum(e["cost"] for e in by_api["completions"])


# --- the pure parts: the quote and the stream meter ----------------------------------------

def _config():
    return parse_config(CONFIG.format(base_url="http://127.0.0.1:9/v1", key=UPSTREAM_KEY, fine_tune=FINE_TUNE), {})


@pytest.mark.parametrize("body, prompt, allowance, limited", [
    ({"prompt": PROMPT}, 5, 16, False),                                   # OpenAI's legacy default: 16
    ({"prompt": PROMPT, "max_tokens": 100}, 5, 100, True),
    ({"prompt": PROMPT, "max_tokens": 0, "echo": True}, 5, 0, True),
    ({"prompt": [PROMPT, PROMPT, PROMPT], "n": 2}, 15, 16 * 2 * 3, False),
    ({"prompt": PROMPT, "n": 2, "best_of": 5, "max_tokens": 10}, 5, 50, True),  # best_of generated, all billed
    ({"prompt": PROMPT, "n": 4, "best_of": 2}, 5, 64, False),
    ({"prompt": [1, 2, 3, 4]}, 4, 16, False),                              # a token array as given
    ({"prompt": [[1, 2], [3], [4, 5, 6]]}, 6, 48, False),
    ({"prompt": [PROMPT, PROMPT], "suffix": "Once upon a time"}, 10 + 2 * 4, 32, False),  # a suffix per prompt
])
def test_a_completion_quote_holds_the_prompts_and_every_generated_choice(body, prompt, allowance, limited):
    quote, _ = quote_completion(_config(), INSTRUCT, {"model": INSTRUCT, **body})
    assert (quote.prompt_tokens, quote.allowance, quote.limited) == (prompt, allowance, limited)
    assert quote.minimum == prompt and quote.full == prompt + ceil(Fraction(4, 3) * allowance)


def test_only_the_returned_choices_echo_their_prompt():
    body = {"prompt": [PROMPT, PROMPT], "n": 3, "best_of": 5, "echo": True}
    assert echoed_tokens(body, count_completion_prompt(body, "cl100k_base")) == 10 * 3
    assert echoed_tokens({**body, "echo": False}, count_completion_prompt(body, "cl100k_base")) == 0


def _event(choices, usage=None, with_usage=False):
    obj = {"object": "text_completion", "choices": choices}
    if with_usage:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_the_completion_meter_reads_text_drops_the_usage_chunk_unless_asked_and_takes_the_echo_off():
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    events = [_event([{"index": 0, "text": "Say this"}], with_usage=True),
              _event([{"index": 0, "text": " Hello"}], with_usage=True),
              _event([{"index": 1, "text": " there", "finish_reason": "stop"}], with_usage=True),
              _event([], usage, with_usage=True), b"data: [DONE]\n\n"]
    quiet = CompletionStreamMeter(forward_usage_chunk=False, echoed=2)
    assert [quiet.accept(e) for e in events] == [True, True, True, False, True]
    assert quiet.delivered_text == "Say this Hello there" and quiet.done
    assert quiet.usage.completion_tokens == 3
    assert quiet.completion_tokens(quiet.text.close()) == 4 - 2 and quiet.completion_tokens(1) == 0
    asked = CompletionStreamMeter(forward_usage_chunk=True)
    assert all(asked.accept(e) for e in events)
    reply = {"choices": [{"text": "a"}, {"text": "b"}, {"text": None}, "junk"], "usage": None}
    assert asked.reply_texts(reply) == ["a", "b"] and asked.reply_texts([]) == []
    chat = StreamMeter(forward_usage_chunk=False)
    assert chat.accept(events[1]) and chat.delivered_text == "", "a chat meter reads deltas, not text"


# --- fuzz: any body gets an OpenAI-shaped answer, never a 500, and every unit is accounted for ---

_junk = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
_tokens = st.lists(st.integers(-2, 120_000) | st.sampled_from([2**31 - 1, 2**31, 2**64]), max_size=4)
_counts = st.integers(-2, 6) | st.sampled_from([128, 129, 2**31 - 1, 2**31, 2**63]) | _junk
_prompts = st.text(max_size=20) | st.lists(st.text(max_size=8), min_size=1, max_size=3) \
    | st.lists(st.integers(0, 100_000), min_size=1, max_size=4) \
    | st.lists(st.lists(st.integers(0, 100_000), min_size=1, max_size=3), min_size=1, max_size=3)
# Bodies mostly within bounds (served, charged), and bodies of anything at all.
_completion_bodies = st.fixed_dictionaries({"model": st.sampled_from([INSTRUCT, "instruct"]), "prompt": _prompts},
                                           optional={"max_tokens": st.integers(0, 4), "n": st.integers(1, 3),
                                                     "best_of": st.integers(0, 4), "echo": st.booleans(),
                                                     "suffix": st.text(max_size=8), "stream": st.booleans(),
                                                     "stream_options": st.just({"include_usage": True})}) \
    | st.fixed_dictionaries({}, optional={
        "model": st.sampled_from([INSTRUCT, "instruct", "gpt-4", "", "no-such-model"]) | _junk,
        "prompt": _prompts | _tokens | st.lists(_tokens, max_size=3) | _junk,
        "max_tokens": _counts, "n": _counts, "best_of": _counts, "echo": st.booleans() | _junk,
        "suffix": st.text(max_size=8) | _junk, "stream": st.booleans() | _junk,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | _junk}) | _junk})
_parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]) | _junk}, optional={
    "text": st.text(max_size=8) | _junk, "image_url": st.fixed_dictionaries({"url": st.text(max_size=12) | _junk})
    | _junk}), max_size=3)
_moderation_bodies = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["omni-moderation-latest", "text-moderation-latest", "gpt-4", ""]) | _junk,
    "input": st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=3) | _parts | _junk})
_requests = st.tuples(st.just("/v1/completions"), _completion_bodies) | \
    st.tuples(st.just("/openai/v1/moderations"), _moderation_bodies) | \
    st.tuples(st.just("/v1/models/"), st.text(max_size=30) | st.sampled_from([INSTRUCT, FINE_TUNE, "gpt-4"]))
FUZZED = {"n": 0}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=_requests)
def test_no_completion_moderation_or_model_request_gets_a_500(http_server_client, fake, store, services, io_loop,
                                                              request):
    fake.state.behaviour.reply_tokens = 3
    path, body = request
    auth = {"Authorization": f"Bearer {TEST_KEY}"}
    if path.endswith("/models/"):
        resp = io_loop.run_sync(lambda: http_server_client.fetch(path + quote(body, safe=""), headers=auth,
                                                                 raise_error=False))
    else:
        resp = io_loop.run_sync(lambda: http_server_client.fetch(path, method="POST", body=json.dumps(body),
                                                                 headers=auth, raise_error=False))
    FUZZED["n"] += 1
    assert resp.code < 500, (resp.code, body, resp.body[:300])
    if resp.code >= 400:
        err = json.loads(resp.body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)

    async def conserved():
        await settled(store, services)
        await assert_conserved(store)
    io_loop.run_sync(conserved)


def test_the_fuzz_ran_its_cases():
    assert FUZZED["n"] >= 300
