"""Cache affinity and failover without waste, without sockets: the key, the ranking, and the
router placing requests with a scripted transport, the clock and randomness passed in."""
import asyncio
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest

from relay.balancer import affinity as a
from relay.balancer.pool import Pool
from relay.config import parse_config
from relay.errors import UpstreamError
from relay.proxy.request import UpstreamRequest
from relay.proxy.router import Router
from tests.fake_transport import FakeTransport, Reply

# 4 upstream keys over 2 base URLs, weights 3 and 1.
FOUR = """
upstreams:
  - {name: east, base_url: 'http://east', keys: [sk-e0, sk-e1], weight: 3}
  - {name: west, base_url: 'http://west', keys: [sk-w0, sk-w1]}
  - {name: spare, base_url: 'http://spare', keys: [sk-s0], priority: 1}
health: {eject_after: 3, default_cooldown_s: 10}
retries: {max_attempts: 3, budget_ratio: 0.2, budget_floor: 3, budget_window_s: 10}
pricing: {"*": {input: 1}}
"""
CLIENT = "3f" * 32  # a relay key's hash
SYSTEM = "You are a careful translator. " * 40


def chat_body(user="Translate: good morning", system=SYSTEM, history=()):
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": user}, *history]
    return {"model": "gpt-4o", "messages": messages}


def request(body, api="chat", client=CLIENT, model="gpt-4o"):
    return UpstreamRequest("POST", "/chat/completions", model, body, None, api=api,
                           affinity=a.affinity_key(api, body, model, client))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def router(answers=None, text=FOUR, seed=3):
    clock = Clock()
    r = Router(Pool.from_config(parse_config(text, {})), FakeTransport(answers), random.Random(seed), clock=clock,
               wall_clock=lambda: 1_700_000_000.0)
    return r, r.transport, clock


async def send(r, req):
    async with r.exchange(req) as resp:
        return resp.endpoint.name


# --- the key ------------------------------------------------------------------------------

def test_a_conversations_turns_share_a_key_and_other_prompts_do_not():
    key = a.affinity_key("chat", chat_body(), "gpt-4o", CLIENT)
    later = chat_body(history=[{"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "more"}])
    assert a.affinity_key("chat", later, "gpt-4o", CLIENT) == key, "later turns keep the first turn's key"
    parts = chat_body(user=[{"type": "text", "text": " Translate: good morning "}])
    assert a.affinity_key("chat", parts, "gpt-4o", CLIENT) == key, "a list of parts says the same as a string"
    others = [a.affinity_key("chat", chat_body(user="Translate: good night"), "gpt-4o", CLIENT),
              a.affinity_key("chat", chat_body(system="You are terse."), "gpt-4o", CLIENT),
              a.affinity_key("chat", chat_body(), "gpt-4o-mini", CLIENT),
              a.affinity_key("chat", chat_body(), "gpt-4o", "00" * 32)]
    assert None not in others and len({key, *others}) == 5, "prompt, system, model and relay key all count"


def test_the_clients_cache_key_comes_first_then_the_previous_response():
    hinted = {**chat_body(), "prompt_cache_key": "user-42"}
    other_prompt = {**chat_body(user="something else"), "prompt_cache_key": "user-42"}
    assert a.affinity_key("chat", hinted, "m", CLIENT) == a.affinity_key("chat", other_prompt, "m", CLIENT)
    assert a.affinity_key("chat", hinted, "m", CLIENT) != a.affinity_key("chat", chat_body(), "m", CLIENT)
    resp = {"model": "m", "input": "hi", "previous_response_id": "resp_1"}
    assert a.affinity_key("responses", resp, "m", CLIENT) == \
        a.affinity_key("responses", {**resp, "input": "other"}, "m", CLIENT)
    assert a.affinity_key("responses", {**resp, "prompt_cache_key": "k"}, "m", CLIENT) == \
        a.affinity_key("chat", {"prompt_cache_key": "k"}, "m", CLIENT)


def test_responses_and_completions_prompts_have_prefixes():
    as_text = {"instructions": "Be brief.", "input": "Hello there"}
    as_items = {"instructions": "Be brief.",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello there"}]},
                          {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "later"}]}
    assert a.prompt_prefix("responses", as_text) == a.prompt_prefix("responses", as_items) == \
        "system: Be brief.\nuser: Hello there"
    assert a.prompt_prefix("completions", {"prompt": ["Once upon", "x"]}) == "prompt: Once upon"


@pytest.mark.parametrize("api,body", [
    ("embeddings", {"input": "hello"}), ("images", {"prompt": "a cat"}), ("chat", {"messages": []}),
    ("chat", {"messages": [{"role": "user", "content": "  "}]}), ("chat", {"messages": "junk"}),
    ("chat", {"messages": [1, None, {"role": 5}, {"role": "user", "content": {"x": 1}}]}),
    ("chat", {"prompt_cache_key": "", "messages": [{"role": "user", "content": [None, {"text": 3}]}]}),
    ("completions", {"prompt": [1, 2, 3]}), ("responses", {"input": 7})])
def test_a_request_without_a_usable_prefix_has_no_key(api, body):
    assert a.affinity_key(api, body, "m", CLIENT) is None


def test_only_the_leading_part_counts_and_odd_text_is_fine():
    long = "x" * (a.MAX_PREFIX_CHARS * 3)
    assert a.affinity_key("chat", chat_body(user=long + "A"), "m", CLIENT) == \
        a.affinity_key("chat", chat_body(user=long + "B"), "m", CLIENT)
    assert len(a.prompt_prefix("chat", chat_body(user=[{"type": "text", "text": long}] * 50))) == a.MAX_PREFIX_CHARS
    assert a.affinity_key("chat", chat_body(user="\ud800 lone surrogate, 中文"), "m", CLIENT) is not None


# --- the ranking --------------------------------------------------------------------------

def _tier(text=FOUR):
    return Pool.from_config(parse_config(text, {})).tiers_for("gpt-4o")[0]


def test_rendezvous_ranking_shares_keys_by_weight_and_a_removed_endpoint_moves_only_its_own():
    tier = _tier()
    keys = [a.affinity_key("chat", chat_body(user=f"conversation {i}"), "gpt-4o", CLIENT) for i in range(8000)]
    firsts = [a.rank(tier, k)[0] for k in keys]
    by_upstream = Counter(ep.upstream.name for ep in firsts)
    assert 0.72 < by_upstream["east"] / len(keys) < 0.78, by_upstream  # weights 3+3 against 1+1: 75%
    by_key = Counter(ep.name for ep in firsts)
    assert all(0.9 < by_key[f"east/k{i}"] / by_key[f"east/k{1 - i}"] < 1.1 for i in (0, 1))
    gone = tier[0]
    rest = [ep for ep in tier if ep is not gone]
    for k, first in zip(keys, firsts, strict=True):
        if first is not gone:
            assert a.rank(rest, k)[0] is first, "keys of the endpoints that stay do not move"


def test_the_first_choice_is_the_rankings_first_ties_included():
    tier = _tier()
    for i in range(2000):
        k = a.affinity_key("chat", chat_body(user=f"k{i}"), "gpt-4o", CLIENT)
        assert a.first_choice(tier, k) is a.rank(tier, k)[0]
    # Equal scores (the same seed twice): the first name wins, as in the ranking.
    twins = [replace(tier[1], seed=tier[0].seed), replace(tier[0])]
    k = a.affinity_key("chat", chat_body(), "gpt-4o", CLIENT)
    assert a.score(k, twins[0]) == a.score(k, twins[1]) and twins[0].name != twins[1].name
    assert a.first_choice(twins, k) is a.rank(twins, k)[0] is min(twins, key=lambda ep: ep.name)


def test_the_ranking_is_the_same_in_another_process():
    tier = _tier()
    keys = [a.affinity_key("chat", chat_body(user=f"c{i}"), "gpt-4o", CLIENT) for i in range(50)]
    here = [[ep.name for ep in a.rank(tier, k)] for k in keys]
    code = ("import json, sys; from tests.test_affinity import _tier, chat_body, CLIENT; from relay.balancer import "
            "affinity as a; print(json.dumps([[e.name for e in a.rank(_tier(), a.affinity_key('chat', chat_body("
            "user=f'c{i}'), 'gpt-4o', CLIENT))] for i in range(50)]))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert eval(out.stdout) == here  # noqa: S307  (our own subprocess's JSON)


# --- the router ---------------------------------------------------------------------------

async def test_repeated_requests_with_one_prefix_land_on_one_key_and_others_spread_by_weight():
    r, t, _ = router()
    conversations = [chat_body(user=f"conversation {i}") for i in range(40)]
    for _ in range(10):
        for body in conversations:
            await send(r, request(body))
    per_conversation = [Counter(t.tried[i::40]) for i in range(40)]
    assert all(len(c) == 1 for c in per_conversation), "each conversation stays on its key"
    shares = Counter(name.split("/")[0] for name in t.tried)
    assert 0.6 < shares["east"] / len(t.tried) < 0.9, shares  # 40 conversations spread by weight (3:1)
    plain, pt, _ = router()
    for _ in range(400):
        await send(plain, UpstreamRequest("POST", "/chat/completions", "gpt-4o", api="chat"))
    shares = Counter(name.split("/")[0] for name in pt.tried)
    assert 0.68 < shares["east"] / 400 < 0.9 and len(set(pt.tried)) == 4, shares


async def test_affinity_off_places_by_load():
    r, t, _ = router(text=FOUR + "routing: {affinity: false}\n")
    for _ in range(100):
        await send(r, request(chat_body()))
    assert len(set(t.tried)) == 4


async def test_a_cooling_key_moves_its_prefix_to_one_other_key_and_it_comes_back():
    r, t, clock = router()
    tier = r.pool.tiers_for("gpt-4o", "chat")[0]
    # A conversation whose second-ranked endpoint is on the other upstream: it still moves to its
    # own upstream's other key, where the failed request's retry went too.
    req = next(req for i in range(100) if (req := request(chat_body(user=f"c{i}"))) and
               len({ep.upstream.name for ep in a.rank(tier, req.affinity)[:2]}) == 2)
    home = await send(r, req)
    t.answers[home] = Reply(429, b"{}", {"Retry-After": "5"})
    moved = {await send(r, req) for _ in range(20)}
    assert len(moved) == 1 and home not in moved, moved
    assert t.tried.count(home) == 2, "one 429, then the key rests"
    assert moved.pop().split("/")[0] == home.split("/")[0], "a key's fault moves the prefix within its upstream"
    del t.answers[home]
    clock.now += 6
    assert {await send(r, req) for _ in range(5)} == {home}


async def test_an_overloaded_first_choice_passes_requests_to_one_other_key():
    r, t, _ = router()
    req = request(chat_body())
    home = await send(r, req)
    ep = next(e for e in r.pool.endpoints if e.name == home)
    ep.health.in_flight = 3  # three of this prefix's requests still running, nothing elsewhere
    second = {await send(r, req) for _ in range(5)}
    assert len(second) == 1 and home not in second
    assert second.pop().split("/")[0] == home.split("/")[0], "its upstream's other key first"
    ep.health.in_flight = 1
    assert await send(r, req) == home


async def test_a_pinned_request_goes_to_its_endpoint_whatever_its_affinity():
    r, t, _ = router()
    body = {"model": "gpt-4o", "input": "next", "previous_response_id": "resp_9"}
    key = a.affinity_key("responses", body, "gpt-4o", CLIENT)
    first = a.rank(r.pool.tiers_for("gpt-4o", "responses")[0], key)[0]
    other = next(ep for ep in r.pool.endpoints if ep.upstream is not first.upstream)
    req = UpstreamRequest("POST", "/responses", "gpt-4o", body, None, api="responses", affinity=key,
                          pinned=(other.upstream.name, other.fingerprint))
    assert {await send(r, req) for _ in range(5)} == {other.name}
    assert await send(r, replace(req, pinned=None)) == first.name


async def test_an_outage_burst_right_after_other_failures_is_served_by_the_backup():
    """50 requests in flight at the primary when it starts failing, the retry budget already spent
    by earlier failures elsewhere: every one is served by the backup tier."""
    text = """
upstreams:
  - {name: primary, base_url: 'http://p', keys: [sk-p0, sk-p1], models: [gpt-4]}
  - {name: backup, base_url: 'http://b', keys: [sk-b0], priority: 1, models: [gpt-4]}
  - {name: flaky, base_url: 'http://f', keys: [sk-f0, sk-f1], models: [gpt-3.5-turbo]}
retries: {budget_ratio: 0.01, budget_floor: 1}
pricing: {"*": {input: 1}}
"""
    gate = asyncio.Event()
    arrived = []

    async def held(endpoint, req, body, timeouts):
        if endpoint.upstream.name == "primary":
            arrived.append(endpoint.name)
            if len(arrived) == 50:
                gate.set()
            await gate.wait()
        return await FakeTransport.send(r.transport, endpoint, req, body, timeouts)

    r, t, _ = router({"primary/k0": Reply(500, b"{}"), "primary/k1": Reply(500, b"{}"),
                      "flaky/k0": Reply(500, b"{}"), "flaky/k1": Reply(500, b"{}")}, text=text)
    with pytest.raises(UpstreamError):
        await send(r, UpstreamRequest("POST", "/chat/completions", "gpt-3.5-turbo", api="chat"))
    assert t.tried == ["flaky/k0", "flaky/k1"] or t.tried == ["flaky/k1", "flaky/k0"]
    assert not r.budget.try_retry(r.clock()), "the budget is spent"
    t.send = held
    results = await asyncio.gather(*(send(r, request(chat_body(user=f"u{i}"), model="gpt-4"))
                                      for i in range(50)), return_exceptions=True)
    assert results == ["backup/k0"] * 50
    assert len(arrived) == 50
    assert [await send(r, request(chat_body(user=f"v{i}"), model="gpt-4")) for i in range(20)] == ["backup/k0"] * 20
    assert len(arrived) == 50, "the ejected primary gets nothing more"


@pytest.mark.parametrize("models,served,refused", [
    ('["*"]', ["gpt-4o", "anything-at-all"], []),
    ('["gpt-4o*", "o?"]', ["gpt-4o", "gpt-4o-mini", "o3"], ["gpt-4", "o4-mini"]),
    ("[gpt-4]", ["gpt-4"], ["gpt-4o"]),
])
async def test_model_globs_and_star_route(models, served, refused):
    text = f"upstreams:\n  - {{name: u, base_url: 'http://u', keys: [k], models: {models}}}\n"
    r, t, _ = router(text=text)
    for model in served:
        assert await send(r, UpstreamRequest("POST", "/chat/completions", model, api="chat")) == "u/k0"
    for model in refused:
        assert not r.pool.serves(model)


async def test_only_upstreams_serving_the_api_are_chosen():
    text = """
upstreams:
  - {name: chatty, base_url: 'http://c', keys: [k1], apis: [chat, responses]}
  - {name: vectors, base_url: 'http://v', keys: [k2], apis: [embeddings]}
"""
    r, t, _ = router({"chatty/k0": Reply(500, b"{}")}, text=text)
    assert {await send(r, UpstreamRequest("POST", "/embeddings", "m", api="embeddings")) for _ in range(10)} == \
        {"vectors/k0"}
    with pytest.raises(UpstreamError) as info:
        await send(r, UpstreamRequest("POST", "/chat/completions", "m", api="chat"))
    assert info.value.status == 502 and t.tried.count("vectors/k0") == 10, "chat never fails over to embeddings"
    assert r.pool.serves("m", "chat") and not r.pool.serves("m", "images")
