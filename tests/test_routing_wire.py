"""Routing over real sockets: cache affinity across conversations and across relay processes,
model patterns, per-upstream APIs, and the 404 that says which models exist."""
import asyncio
import json
import uuid
from collections import Counter

import pytest
from tornado.httpclient import AsyncHTTPClient

from relay.store.connect import close_client, open_store
from tests.helpers import PRICING, TEST_KEY, add_key, mock_store, serve, start_fake
from tests.processes import RelayProcess, db_uri

CHAT = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


def four_keys(east, west, extra=""):
    """4 upstream keys over 2 base URLs, weights 3 and 1."""
    return f"""
upstreams:
  - {{name: east, base_url: '{east.base_url}', keys: [sk-e0, sk-e1], weight: 3}}
  - {{name: west, base_url: '{west.base_url}', keys: [sk-w0, sk-w1]}}
health: {{interval_s: 60}}
{PRICING}
{extra}
"""


def conversation(i: int, turns: int) -> dict:
    """Conversation ``i`` at its turn ``turns``: the same system prompt and first question, more
    history each turn. ``max_tokens`` tags it, so the fake's records say which key served it."""
    messages = [{"role": "system", "content": f"You are assistant {i}. " + "Follow the style guide. " * 50},
                {"role": "user", "content": f"First question of conversation {i}"}]
    for t in range(1, turns):
        messages += [{"role": "assistant", "content": f"answer {t}"}, {"role": "user", "content": f"follow-up {t}"}]
    return {"model": "gpt-4", "messages": messages, "max_tokens": 100 + i}


def keys_by_tag(*fakes) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for f in fakes:
        for r in f.requests:
            out.setdefault(r["max_tokens"], Counter())[r["authorization"]] += 1
    return out


def client():
    return AsyncHTTPClient(force_instance=True, max_clients=64, defaults={"request_timeout": 30})


async def post(c, url, body, path=CHAT):
    return await c.fetch(url + path, method="POST", raise_error=False, headers=AUTH, body=json.dumps(body))


async def affinity_counts(c, url) -> Counter:
    text = (await c.fetch(url + "/metrics")).body.decode()
    out: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("relay_affinity_total{"):
            out[line.split('outcome="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture
def pair(io_loop):
    east, west = start_fake(), start_fake()
    yield east, west
    east.stop()
    west.stop()


async def test_a_conversation_stays_on_one_key_and_traffic_without_affinity_spreads_by_weight(pair, io_loop):
    east, west = pair
    store = mock_store()
    await add_key(store)
    # Bounded load has tests of its own (tests/test_affinity.py); here a slow machine's pile-up of
    # the 20-request bursts must not pass for overload.
    url, server, services = await serve(four_keys(east, west, "routing: {overload_factor: 4}"), store)
    c = client()
    before = await affinity_counts(c, url)
    for turn in range(1, 6):  # 20 conversations at once, five turns each
        codes = [r.code for r in await asyncio.gather(*(post(c, url, conversation(i, turn)) for i in range(20)))]
        assert codes == [200] * 20
    tags = keys_by_tag(east, west)
    on_home = sum(counts.most_common(1)[0][1] for counts in tags.values())
    assert on_home >= 0.95 * 100, tags
    homes = Counter(counts.most_common(1)[0][0] for counts in tags.values())
    assert len(homes) >= 3, f"conversations are spread over the keys: {homes}"
    after = await affinity_counts(c, url)
    first, fell_back = (after[k] - before[k] for k in ("first_choice", "fell_back"))
    # Each turn starts from idle, 20 at once: a lightly weighted key that is first for two of the
    # first requests may pass one to its sibling (bounded load), the same one every turn.
    assert first + fell_back == 100 and first >= 80, (first, fell_back)
    # Embeddings have no prompt to cache: placed by load, following the weights (3:1).
    before = east.count(), west.count()
    for _ in range(200):
        assert (await post(c, url, {"model": "text-embedding-ada-002", "input": "hello"}, "/v1/embeddings")).code \
            == 200
    to_east, to_west = east.count() - before[0], west.count() - before[1]
    assert 0.65 < to_east / 200 < 0.92, (to_east, to_west)
    assert {r["authorization"] for r in east.requests[-200:]} == {"Bearer sk-e0", "Bearer sk-e1"}
    server.stop()
    await services.close()
    c.close()


async def test_two_relay_processes_send_a_prefix_to_the_same_key(pair, embedded, tmp_path, io_loop):
    east, west = pair
    uri = db_uri(embedded, "r" + uuid.uuid4().hex[:10])
    store = await open_store(uri)
    await add_key(store)
    text = four_keys(east, west)
    relays = [await RelayProcess(text, tmp_path, "--mongodb-uri", uri).start() for _ in range(2)]
    c = client()
    try:
        for i in range(12):  # each conversation's turns alternate between the two processes
            for turn in range(1, 5):
                assert (await post(c, relays[(i + turn) % 2].url, conversation(i, turn))).code == 200
        tags = keys_by_tag(east, west)
        assert all(len(counts) == 1 for counts in tags.values()), tags
        assert len({next(iter(counts)) for counts in tags.values()}) >= 3, tags
    finally:
        for r in relays:
            await r.stop()
        c.close()
        await close_client(store.client)


async def test_model_patterns_route_and_models_lists_what_clients_may_ask_for(pair, io_loop):
    east, west = pair
    store = mock_store()
    await add_key(store)
    text = f"""
upstreams:
  - {{name: east, base_url: '{east.base_url}', keys: [sk-e0], models: ["gpt-4*", "gpt-3.5-turbo-1106"],
     apis: [chat]}}
  - {{name: west, base_url: '{west.base_url}', keys: [sk-w0], models: ["text-embedding-*"], apis: [embeddings]}}
model_map: {{gpt-3.5-turbo: gpt-3.5-turbo-1106}}
{PRICING}
  gpt-4o: {{input: "5/3", output: "20/3"}}
"""
    url, server, services = await serve(text, store)
    c = client()
    hi = [{"role": "user", "content": "Hi"}]
    for model in ("gpt-4", "gpt-4o", "gpt-3.5-turbo"):
        assert (await post(c, url, {"model": model, "messages": hi})).code == 200
    assert [r["model"] for r in east.requests] == ["gpt-4", "gpt-4o", "gpt-3.5-turbo-1106"]
    assert (await post(c, url, {"model": "text-embedding-ada-002", "input": "x"}, "/v1/embeddings")).code == 200
    assert west.count() == 1
    models = json.loads((await c.fetch(url + "/v1/models", headers=AUTH)).body)
    assert [m["id"] for m in models["data"]] == ["gpt-3.5-turbo", "gpt-3.5-turbo-1106", "gpt-4", "gpt-4o",
                                                "text-embedding-ada-002"]
    # A model nobody serves for the API asked: OpenAI's 404, naming what exists.
    resp = await post(c, url, {"model": "gpt-5-turbo", "messages": hi})
    err = json.loads(resp.body)["error"]
    assert resp.code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    assert err["message"] == ("The model 'gpt-5-turbo' does not exist or you do not have access to it. "
                              "Models available: gpt-3.5-turbo, gpt-3.5-turbo-1106, gpt-4, gpt-4o.")
    resp = await post(c, url, {"model": "x" * 5000, "messages": hi})
    assert resp.code == 404 and len(json.loads(resp.body)["error"]["message"]) < 400
    resp = await post(c, url, {"model": "gpt-4o", "input": "x"}, "/v1/embeddings")
    err = json.loads(resp.body)["error"]
    assert resp.code == 404 and err["code"] == "model_not_found" and "text-embedding-ada-002" in err["message"]
    # Served (the pattern matches) but not priced: 400 model_not_priced, as before.
    resp = await post(c, url, {"model": "gpt-4-unpriced", "messages": hi})
    assert resp.code == 400 and json.loads(resp.body)["error"]["code"] == "model_not_priced"
    assert east.count() == 3 and west.count() == 1, "nothing refused was forwarded"
    server.stop()
    await services.close()
    c.close()


async def test_a_star_in_the_models_list_serves_every_model(pair, io_loop):
    east, _ = pair
    store = mock_store()
    await add_key(store)
    url, server, services = await serve(
        f"upstreams:\n  - {{name: e, base_url: '{east.base_url}', keys: [k], models: ['*']}}\n{PRICING}", store)
    c = client()
    for model in ("gpt-4", "gpt-3.5-turbo-1106"):
        assert (await post(c, url, {"model": model, "messages": [{"role": "user", "content": "Hi"}]})).code == 200
    assert [r["model"] for r in east.requests] == ["gpt-4", "gpt-3.5-turbo-1106"]
    models = json.loads((await c.fetch(url + "/v1/models", headers=AUTH)).body)
    assert "gpt-4" in {m["id"] for m in models["data"]}
    server.stop()
    await services.close()
    c.close()


async def test_the_404_lists_a_bounded_number_of_models(pair, io_loop):
    east, _ = pair
    store = mock_store()
    await add_key(store)
    prices = "\n".join(f"  model-{i:03d}-with-a-long-name: {{input: 1}}" for i in range(300))
    url, server, services = await serve(
        f"upstreams:\n  - {{name: e, base_url: '{east.base_url}', keys: [k], models: ['model-*']}}\n"
        f"pricing:\n{prices}\n", store)
    c = client()
    resp = await post(c, url, {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]})
    message = json.loads(resp.body)["error"]["message"]
    assert resp.code == 404 and "model-000-with-a-long-name, " in message and message.endswith("more).")
    assert len(message) < 800
    server.stop()
    await services.close()
    c.close()


async def test_uploads_and_every_route_go_only_to_upstreams_serving_their_api(pair, io_loop):
    from openai import AsyncOpenAI

    from tests.test_media import make_wav
    east, west = pair
    store = mock_store()
    await add_key(store)
    text = f"""
upstreams:
  - {{name: chatty, base_url: '{east.base_url}', keys: [sk-e0], apis: [chat, completions]}}
  - {{name: media, base_url: '{west.base_url}', keys: [sk-w0], apis: [audio, images, embeddings]}}
{PRICING}
  whisper-1: {{per_second: "200/3"}}
  tts-1: {{per_character: 10}}
"""
    url, server, services = await serve(text, store)
    sdk = AsyncOpenAI(base_url=url + "/v1", api_key=TEST_KEY, max_retries=0)
    for _ in range(6):  # with any endpoint allowed, all six uploads on one of two: 1 in 32
        await sdk.audio.transcriptions.create(model="whisper-1", file=("hi.wav", make_wav(1.0), "audio/wav"))
        await sdk.audio.speech.create(model="tts-1", voice="alloy", input="hello")
        await sdk.embeddings.create(model="text-embedding-ada-002", input="x")
        await sdk.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    assert [r["path"] for r in east.requests] == ["/v1/chat/completions"] * 6
    assert sorted({r["path"] for r in west.requests}) == ["/v1/audio/speech", "/v1/audio/transcriptions",
                                                          "/v1/embeddings"]
    await sdk.close()
    server.stop()
    await services.close()
