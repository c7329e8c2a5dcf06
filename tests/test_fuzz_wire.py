"""Fuzz over the wire in the shipped mode: leases on, the embedded store, a real port.

Hypothesis sends chat (JSON and stream), embeddings and the billing and usage routes, with
hostile numbers (``max_tokens``, ``max_completion_tokens``, ``n`` up to and beyond 2^63 and
-2^63), JSON nested deeper than Python's recursion limit, and a fake upstream that reports
random ``usage`` (0, normal, 2^31, 2^53, 2^63, 2^64, negative, floats, strings, missing), on
several funded keys. Every answer is checked as it comes: never a 5xx (the upstream and the
store are healthy throughout) and OpenAI's error shape on every 4xx. Every problem is
collected rather than stopping the run, so that the money is checked after the whole run
whatever happened: once settled, every request answered 200 on chat or embeddings has
exactly one ledger entry, ``used = Σ ledger`` and ``granted = balance + reserved + used``
for every key, and once relay's services are closed no lease holds a unit (``reserved == 0``).
"""
from __future__ import annotations

import json
import uuid
from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from relay.metering.bounds import MAX_UNITS
from relay.store.connect import close_client, open_store
from tests.conservation import assert_conserved
from tests.helpers import PRICING, TEST_KEY, add_key, eventually, serve, start_fake
from tests.processes import db_uri

EXAMPLES = 400
KEYS = {  # funded keys: plenty, some, a few requests' worth, and a balance near the int64 range
    TEST_KEY: 10**9,
    TEST_KEY[:-1] + "2": 200_000,
    TEST_KEY[:-1] + "3": 3_000,
    TEST_KEY[:-1] + "4": MAX_UNITS,  # the largest grant relay takes
}
UNKNOWN_KEY = "ak-" + "u" * 40

# Hypothesis favours the first values of a list: the hostile ones come first.
POSITIVE_EDGES = [2**63, 10**20, 2**64, 10**17, 2**63 - 1, 2**62, 2**56, 2**53, 2**53 + 1, 2**64 - 1, 10**30, 2**31,
                  2**31 - 1, 2**32, 129, 128, 10, 2, 1]
NEGATIVE_EDGES = [0, -1, -(2**31), -(2**53), -(2**63), -(2**63) - 1, -(2**64)]
EDGES = POSITIVE_EDGES + NEGATIVE_EDGES
# Mostly numbers relay must take (whole, >= 1), often huge; else anything a client can send.
numberish = st.one_of(st.sampled_from(POSITIVE_EDGES), st.sampled_from(POSITIVE_EDGES), st.integers(1, 40),
                      st.sampled_from(NEGATIVE_EDGES) | st.integers(-(2**70), 2**70) | st.floats()
                      | st.sampled_from(["10", "", "1e20", None, True, False]))
hostile_ints = st.sampled_from(EDGES) | st.integers(-(2**70), 2**70) | st.integers(1, 40)
usage_values = st.sampled_from([2**63, 2**64, 2**53, 2**31, 0, 8, 10, 25, -1, -(2**63), 1.5, 10.0, 1e300, "10", None,
                                True])
usages = st.none() | st.fixed_dictionaries({}, optional={
    "prompt_tokens": usage_values, "completion_tokens": usage_values, "total_tokens": usage_values})
keys = st.sampled_from(list(KEYS) * 4 + [UNKNOWN_KEY])
texts = st.text(max_size=40)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                           "content": texts}), min_size=1, max_size=3)
chat_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4", "gpt-3.5-turbo", "gpt-3.5-turbo-1106"]), "messages": messages},
    optional={"max_tokens": numberish, "max_completion_tokens": numberish, "n": st.integers(1, 4) | numberish,
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})})
embedding_bodies = st.fixed_dictionaries({
    "model": st.just("text-embedding-ada-002"),
    "input": texts.filter(bool) | st.lists(texts.filter(bool), min_size=1, max_size=3)
    | st.lists(hostile_ints, min_size=1, max_size=4)})


def nested(depth: int, body_of=lambda inner: inner) -> bytes:
    return body_of(b"[" * depth + b"]" * depth)


deep_bodies = st.one_of(
    # Deeper than Python's recursion limit (1000), as raw bytes, alone or inside a valid request.
    st.integers(1_000, 100_000).map(lambda d: b"[" * d),
    st.integers(1_000, 100_000).map(lambda d: b'{"a":' * d),
    st.integers(1_000, 20_000).map(lambda d: nested(d, lambda x: b'{"model":"gpt-4","messages":' + x + b"}")),
    # Around the limit: it parses, and must also survive being re-serialised (a stream, a mapped model).
    st.integers(850, 1_000).map(lambda d: nested(d, lambda x: b'{"model":"gpt-3.5-turbo","stream":true,'
                                                             b'"messages":[{"role":"user","content":' + x + b"}]}")),
    # Embedding input is counted by a recursive function: a few hundred levels are enough there.
    st.integers(300, 1_000).map(lambda d: nested(d, lambda x: b'{"model":"text-embedding-ada-002","input":'
                                                             b'[' + x + b"]}")),
)
allowance_bodies = st.tuples(  # valid requests with a huge completion allowance, one way or another
    st.fixed_dictionaries({"model": st.sampled_from(["gpt-4", "gpt-3.5-turbo"]), "messages": messages}),
    st.sampled_from(["max_tokens", "max_completion_tokens"]), st.sampled_from(POSITIVE_EDGES),
    st.none() | st.integers(1, 128)).map(
        lambda t: {**t[0], t[1]: t[2], **({"n": t[3]} if t[3] else {})})
cases = st.one_of(
    st.tuples(st.just("chat"), chat_bodies, st.booleans()),
    st.tuples(st.just("chat"), allowance_bodies, st.booleans()),
    st.tuples(st.just("embeddings"), embedding_bodies, st.just(False)),
    st.tuples(st.just("raw-chat"), deep_bodies, st.just(False)),
    st.tuples(st.just("raw-embeddings"), deep_bodies, st.just(False)),
    st.tuples(st.sampled_from(["subscription", "usage", "summary"]), st.none(), st.just(False)),
)


class Run:
    def __init__(self):
        self.ok: dict[str, set[str]] = defaultdict(set)  # key hash -> request ids answered 200 (charged)
        self.problems: dict[str, str] = {}  # symptom -> the first case that showed it
        self.statuses: dict[int, int] = defaultdict(int)
        self.n = 0
        self.closed = False

    def problem(self, symptom: str, case) -> None:
        self.problems.setdefault(symptom, repr(case)[:400])


async def send(url: str, http: AsyncHTTPClient, run: Run, case, key: str, usage) -> None:
    route, body, stream = case
    label = {"route": route, "stream": stream, "key": key[-4:], "upstream usage": usage,
             "body": body if not isinstance(body, bytes) else f"{body[:60]!r}... ({len(body)} bytes)"}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    charged = route in ("chat", "embeddings", "raw-chat", "raw-embeddings")
    if route == "chat":
        data, path = json.dumps({**body, "stream": stream}).encode(), "/v1/chat/completions"
    elif route == "embeddings":
        data, path = json.dumps(body).encode(), "/v1/embeddings"
    elif route == "raw-chat":
        data, path = body, "/v1/chat/completions"
    elif route == "raw-embeddings":
        data, path = body, "/v1/embeddings"
    else:
        data, path = None, {"subscription": "/dashboard/billing/subscription",
                            "usage": "/v1/dashboard/billing/usage?start_date=2026-01-01&end_date=2026-04-01",
                            "summary": "/usage/api/summary"}[route]
    resp = await http.fetch(url + path, method="POST" if data is not None else "GET", body=data, headers=headers,
                            raise_error=False)
    run.n += 1
    run.statuses[resp.code] += 1
    if resp.code >= 500 or resp.code < 200:
        run.problem(f"{route}: {resp.code} {resp.body[:160]!r}", label)
    if resp.code >= 400:
        try:
            err = json.loads(resp.body)["error"]
            assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
        except Exception:
            run.problem(f"{route}: {resp.code} not in OpenAI's error shape", label)
    elif resp.code == 200 and charged:
        run.ok[hash_key(key)].add(resp.headers["X-Request-Id"])
        if stream and not resp.body.startswith(b"data: "):
            run.problem(f"{route}: a 200 stream that is not SSE", label)


async def money_problems(store, run: Run, services) -> list[str]:
    problems = []

    async def committed() -> bool:
        for key in KEYS:
            h = hash_key(key)
            ids = {e["_id"] for e in await store.ledger_entries(h)}
            doc = await store.key_doc(h)
            if ids != run.ok[h] or doc["used"] != await store.ledger_total(h):
                return False
        return True
    try:
        await eventually(committed, timeout=10, interval=0.1, message="the group commits settle every request")
    except AssertionError as exc:
        problems.append(str(exc))
    await services.close()  # commits every batch and hands every slice back
    run.closed = True
    for key in KEYS:
        h = hash_key(key)
        doc = await store.key_doc(h)
        ids = {e["_id"] for e in await store.ledger_entries(h)}
        ledger = await store.ledger_total(h)
        summary = (f"{key[-1]}: granted {doc['granted']} balance {doc['balance']} reserved {doc['reserved']} "
                   f"used {doc['used']} Σledger {ledger}; {len(run.ok[h])} answered 200, {len(ids)} in the ledger, "
                   f"{len(run.ok[h] - ids)} unbilled, {len(ids - run.ok[h])} billed but not answered 200")
        print(summary)
        if doc["reserved"] != 0:
            problems.append(f"after close, a lease still holds units nobody will return: {summary} "
                            f"leases {doc.get('leases')}")
        if ids != run.ok[h] or doc["used"] != ledger or doc["granted"] != doc["balance"] + doc["reserved"] + ledger:
            problems.append(f"money not exact: {summary}")
    try:
        await assert_conserved(store)
    except AssertionError as exc:
        problems.append(f"assert_conserved: {exc}")
    return problems


def test_fuzz_over_the_wire_with_leases_keeps_the_money_exact(embedded, io_loop):
    async def start():
        store = await open_store(db_uri(embedded, "fuzzwire" + uuid.uuid4().hex[:6]))
        for key, quota in KEYS.items():
            await add_key(store, key=key, quota=quota)
        fake = start_fake()
        text = f"upstreams:\n  - {{name: p, base_url: '{fake.base_url}', keys: [sk-f1]}}\n" \
               f"model_map:\n  gpt-3.5-turbo: gpt-3.5-turbo-1106\nquota: {{leases: true}}\n{PRICING}"
        url, server, services = await serve(text, store)
        assert services.quota.book is not None, "leases on"
        services.throttle.delay_s = services.admin_throttle.delay_s = 0.0  # unknown keys and tokens still
        # turn into 429s; the fuzz need not wait for them
        return store, fake, url, server, services

    store, fake, url, server, services = io_loop.run_sync(start)
    http = AsyncHTTPClient(force_instance=True, defaults={"request_timeout": 30})
    run = Run()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases, key=keys, usage=usages, reply_tokens=st.integers(0, 12))
    def one(case, key, usage, reply_tokens):
        fake.state.behaviour.usage_override = usage
        fake.state.behaviour.reply_tokens = reply_tokens
        io_loop.run_sync(lambda: send(url, http, run, case, key, usage), timeout=30)

    try:
        one()
        fake.state.behaviour.usage_override = None
        server.stop()
        problems = io_loop.run_sync(lambda: money_problems(store, run, services), timeout=60)
    finally:
        server.stop()
        if not run.closed:
            io_loop.run_sync(services.close)
        io_loop.run_sync(lambda: close_client(store.client))
        fake.stop()
        http.close()
    print(f"\nfuzz over the wire: {run.n} requests, statuses {dict(sorted(run.statuses.items()))}")
    found = [f"{symptom}\n    first seen with: {case}" for symptom, case in run.problems.items()] + problems
    assert run.n >= EXAMPLES
    assert not found, f"{len(found)} problem(s):\n" + "\n".join(found)
