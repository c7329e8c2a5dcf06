"""Attacks on the money, over the wire, with leases on (the shipped mode) and the embedded store.

Each test is one way an attacker (a client, or an upstream that lies) could try to mint money,
lose it or crash relay: hostile numbers, a burst while an idle slice is being handed back,
clients hanging up mid-stream, upstreams failing mid-stream or reporting more than they
delivered. Every test ends the same way: relay's services closed (every slice handed back),
then ``reserved == 0`` and exact conservation (``granted = balance + used``, ``used = Σ
ledger``) for every key, and one ledger entry per request answered 200.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from relay.store.connect import close_client, open_store
from tests.conftest import ADMIN_TOKEN
from tests.conservation import assert_conserved
from tests.helpers import PRICING, TEST_KEY, add_key, eventually, serve, start_fake
from tests.processes import db_uri

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]
OTHER_KEY = TEST_KEY[:-1] + "2"
PROMPT_COST = 8 * 20          # gpt-4: "Hi" is 8 prompt tokens at 20 units
COST = PROMPT_COST + 10 * 40  # and the fake's 10-token reply at 40: 560, what max_tokens=10 reserves
INT64_MAX = 2**63 - 1


def leased_config(fake) -> str:
    return (f"upstreams:\n  - {{name: p, base_url: '{fake.base_url}', keys: [sk-w1]}}\n"
            f"quota: {{leases: true}}\n{PRICING}")


def assert_openai_error(resp) -> dict:
    err = json.loads(resp.body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), resp.body[:300]
    return err


class Relay:
    """One relay on a real port, leases on, over a fresh database of the embedded store, with
    funded keys. It counts the requests answered 200 per key, and records every answer that
    breaks the rules (a 5xx, or a 4xx not in OpenAI's shape) instead of stopping there, so that
    a test checks the money first and the answers after."""

    def __init__(self, store, fake, url, server, services):
        self.store, self.fake, self.url, self.server, self.services = store, fake, url, server, services
        self.http = AsyncHTTPClient(force_instance=True, max_clients=64, defaults={"request_timeout": 30})
        self.ok: dict[str, set[str]] = defaultdict(set)  # key hash -> request ids answered 200
        self.bad: list[str] = []  # answers that break the rules
        self.closed = False

    async def chat(self, key: str = TEST_KEY, stream: bool = False, upstream_failed: bool = False, **body):
        body = {"model": "gpt-4", "messages": HI, "max_tokens": 10, "stream": stream, **body}
        resp = await self.http.fetch(self.url + CHAT, method="POST", raise_error=False,
                                     headers={"Authorization": f"Bearer {key}"}, body=json.dumps(body))
        self.check(resp, key, stream, upstream_failed, what=json.dumps({k: v for k, v in body.items()
                                                                        if k not in ("model", "messages")}))
        return resp

    def check(self, resp, key: str, stream: bool = False, upstream_failed: bool = False, what: str = "") -> None:
        if resp.code >= 500 and not (upstream_failed and resp.code == 502):
            self.bad.append(f"{what} -> {resp.code} {resp.body[:200]!r}")
        if resp.code >= 400:
            try:
                assert_openai_error(resp)
            except Exception:
                self.bad.append(f"{what} -> {resp.code} not in OpenAI's error shape: {resp.body[:200]!r}")
        elif resp.code == 200:
            if stream:
                assert resp.body.startswith(b"data: "), resp.body[:200]
            else:
                json.loads(resp.body)
            self.ok[hash_key(key)].add(resp.headers["X-Request-Id"])

    async def state(self, key: str) -> str:
        h = hash_key(key)
        doc = await self.store.key_doc(h)
        ids = {e["_id"] for e in await self.store.ledger_entries(h)}
        w = self.services.quota.book.wallets.get(h) if not self.closed else None
        return (f"key ..{key[-1]}: granted {doc['granted']} balance {doc['balance']} reserved {doc['reserved']} "
                f"used {doc['used']} Σledger {await self.store.ledger_total(h)}; {len(self.ok[h])} answered 200, "
                f"{len(ids)} in the ledger, {len(self.ok[h] - ids)} of them not" +
                (f"; in memory: {len(w.batch)} settled uncommitted, a commit retried with "
                 f"returned={w.inflight[1]} extra={w.inflight[2]}" if w is not None and w.inflight else ""))

    async def committed(self, *keys: str) -> bool:
        """Every request answered 200 on these keys is charged in the store (group commits land)."""
        for key in keys:
            h = hash_key(key)
            doc = await self.store.key_doc(h)
            ids = {e["_id"] for e in await self.store.ledger_entries(h)}
            if ids != self.ok[h] or doc["used"] != await self.store.ledger_total(h):
                return False
        return True

    async def settles(self, *keys: str, timeout: float = 5.0) -> None:
        """Wait for the group commits to charge every request answered 200 on these keys."""
        try:
            await eventually(lambda: self.committed(*keys), timeout=timeout)
        except AssertionError:
            states = [await self.state(k) for k in keys]
            raise AssertionError(f"group commits did not land within {timeout} s:\n  " + "\n  ".join(states)
                                 + ("\n answers: " + "\n  ".join(self.bad) if self.bad else "")) from None

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.stop()
            await self.services.close()  # commits every batch and hands every slice back
            self.http.close()

    async def assert_exact(self) -> list[dict]:
        """After ``close``: nothing held by a process that will not return it, conservation
        exactly, one ledger entry per request answered 200 (nothing lost, nothing twice); then
        every answer within the rules."""
        await self.close()
        for doc in await self.store.keys.find({}).to_list(None):
            h = doc["_id"]
            ids = {e["_id"] for e in await self.store.ledger_entries(h)}
            assert doc["reserved"] == 0 and ids == self.ok[h], \
                f"after close: {await self.state_of(doc)} leases {doc.get('leases')}"
        docs = await assert_conserved(self.store)
        assert not self.bad, "answers out of the rules:\n  " + "\n  ".join(self.bad)
        return docs

    async def state_of(self, doc: dict) -> str:
        h = doc["_id"]
        ids = {e["_id"] for e in await self.store.ledger_entries(h)}
        return (f"{doc['prefix']}: granted {doc['granted']} balance {doc['balance']} reserved {doc['reserved']} "
                f"used {doc['used']} Σledger {await self.store.ledger_total(h)}; {len(self.ok[h])} answered 200, "
                f"{len(self.ok[h] - ids)} of them not in the ledger")


@contextlib.asynccontextmanager
async def leased_relay(embedded, quotas: dict[str, int] | None = None):
    store = await open_store(db_uri(embedded, "attack" + uuid.uuid4().hex[:8]))
    for key, quota in (quotas or {TEST_KEY: 10_000_000, OTHER_KEY: 10_000_000}).items():
        await add_key(store, key=key, quota=quota)
    fake = start_fake()
    url, server, services = await serve(leased_config(fake), store, admin_token=ADMIN_TOKEN)
    assert services.quota.book is not None, "leases on"
    relay = Relay(store, fake, url, server, services)
    try:
        yield relay
    finally:
        await relay.close()
        fake.stop()
        await close_client(store.client)


# --- a slice handed back while a burst spends it ---------------------------------------------

async def test_an_idle_slice_being_handed_back_cannot_be_spent_twice(embedded, io_loop):
    """Process A's slice of a small balance goes idle; while A hands it back (the commit in
    flight: a slow store round trip), a burst reaches A and spends the slice from memory; once
    the units are back on the balance, process B takes them and spends them again."""
    quota = 4 * COST
    async with leased_relay(embedded, {TEST_KEY: quota}) as a:
        b_store = await open_store(db_uri(embedded, a.store.db.name))
        b_url, b_server, b_services = await serve(leased_config(a.fake), b_store)
        b = Relay(b_store, a.fake, b_url, b_server, b_services)
        real = a.store.commit_lease
        handing_back, release, handed_back = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def slow_hand_back(key_hash, rid, amount, seq, entries, returned, extra):
            if returned > 0 and not release.is_set():
                handing_back.set()
                await release.wait()  # the store is slow to answer, as a loaded one is
            result = await real(key_hash, rid, amount, seq, entries, returned, extra)
            if returned > 0:
                handed_back.set()
            return result
        a.store.commit_lease = slow_hand_back
        try:
            assert (await a.chat()).code == 200  # A's slice: the whole balance
            await a.settles(TEST_KEY)
            # Idle for IDLE_RETURN_S (2 s): A starts handing the slice back.
            await eventually(handing_back.is_set, timeout=10, message="the idle slice is being handed back")
            burst = [asyncio.ensure_future(a.chat(stream=i % 2 == 0)) for i in range(3)]
            await asyncio.wait(burst, timeout=1.0)  # served from memory meanwhile, or waiting for the hand-back
            release.set()
            await asyncio.gather(*burst)
            await eventually(handed_back.is_set, message="the hand-back applied")
            for _ in range(4):  # B takes what is on the balance
                await b.chat()
            for _ in range(2):  # and A, what it still can
                await a.chat()
        finally:
            a.store.commit_lease = real
            await b.close()
            await close_client(b_store.client)
        for h, ids in b.ok.items():
            a.ok[h] |= ids
        served = sum(len(ids) for ids in a.ok.values())
        docs = await a.assert_exact()
        doc = docs[0]
        print(f"\nhand-back race: {served} requests answered 200 on a balance for 4; "
              f"granted {doc['granted']}, used {doc['used']}, balance {doc['balance']}")
        assert served <= 4, (f"{served} requests of {COST} units were served from a balance of {quota}: "
                             f"used {doc['used']}, balance {doc['balance']}")
        assert doc["used"] <= doc["granted"] and doc["balance"] >= 0, doc


# --- hostile numbers from the client ----------------------------------------------------------

HUGE_ALLOWANCES = [
    pytest.param({"max_tokens": 10**20}, id="max_tokens-1e20"),
    pytest.param({"max_tokens": 2**63}, id="max_tokens-2^63"),
    pytest.param({"max_completion_tokens": 2**64, "max_tokens": None}, id="max_completion_tokens-2^64"),
    pytest.param({"max_tokens": 10**17}, id="max_tokens-1e17-reservation-fits-int64-slice-does-not"),
    pytest.param({"max_tokens": 2**56, "n": 128}, id="max_tokens-2^56-times-n-128"),
]


@pytest.mark.parametrize("hostile", HUGE_ALLOWANCES)
async def test_a_huge_completion_allowance_is_answered_and_does_not_poison_the_group_commit(
        hostile, embedded, io_loop):
    async with leased_relay(embedded) as relay:
        for key in (TEST_KEY, OTHER_KEY):  # both keys hold a slice
            assert (await relay.chat(key)).code == 200
        first = await relay.chat(stream=False, **hostile)
        second = await relay.chat(stream=True, **hostile)
        print(f"\n{hostile}: answered {first.code} {first.body[:160]!r} / stream {second.code}")
        after = []
        for i in range(4):  # both keys go on being served and charged
            after.append((await relay.chat(TEST_KEY, stream=i % 2 == 0)).code)
            after.append((await relay.chat(OTHER_KEY, stream=i % 2 == 1)).code)
        await relay.settles(TEST_KEY, OTHER_KEY)
        await relay.assert_exact()
        assert first.code in (200, 400, 429) and second.code in (200, 400, 429), (first.code, second.code)
        assert after == [200] * 8, after


async def test_a_huge_allowance_on_a_fresh_key_is_not_a_store_outage(embedded, io_loop):
    async with leased_relay(embedded) as relay:
        resp = await relay.chat(max_tokens=10**20)  # the store is up: never 503 store_unavailable
        assert resp.code in (200, 400, 429), (resp.code, resp.body[:300])
        assert (await relay.chat()).code == 200
        await relay.assert_exact()


async def test_a_top_up_the_store_cannot_count_is_refused_not_a_500(embedded, io_loop):
    async with leased_relay(embedded) as relay:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        prefix = (await relay.store.key_doc(hash_key(TEST_KEY)))["prefix"]
        codes = []
        for quota in (2**63, 2**64, INT64_MAX, INT64_MAX):  # too big to store; then too big to add up
            r = await relay.http.fetch(f"{relay.url}/admin/keys", method="POST", raise_error=False, headers=admin,
                                       body=json.dumps({"quota": quota, "note": "x"}))
            t = await relay.http.fetch(f"{relay.url}/admin/keys/{TEST_KEY}/topup", method="POST",
                                       raise_error=False, headers=admin, body=json.dumps({"quota": quota}))
            codes.append((quota, r.code, t.code))
            for resp in (r, t):
                assert resp.code < 500, (quota, resp.code, resp.body[:300], prefix)
                if resp.code >= 400:
                    assert_openai_error(resp)
        print(f"\ntop-ups: {codes}")
        assert (await relay.chat()).code == 200
        await relay.assert_exact()


# --- upstreams that report more than they delivered -------------------------------------------

@pytest.mark.parametrize("usage", [
    pytest.param({"prompt_tokens": 2**63, "completion_tokens": 10, "total_tokens": 2**63 + 10}, id="prompt-2^63"),
    pytest.param({"prompt_tokens": 8, "completion_tokens": 2**64, "total_tokens": 2**64 + 8}, id="completion-2^64"),
    pytest.param({"prompt_tokens": 10**30, "completion_tokens": 10**30}, id="both-1e30"),
    pytest.param({"prompt_tokens": 8, "completion_tokens": 2**59}, id="completion-2^59-cost-overflows"),
])
async def test_an_upstream_reporting_huge_usage_does_not_poison_the_group_commit(usage, embedded, io_loop):
    async with leased_relay(embedded) as relay:
        for key in (TEST_KEY, OTHER_KEY):
            assert (await relay.chat(key)).code == 200
        relay.fake.state.behaviour.usage_override = usage
        codes = [(await relay.chat(stream=stream)).code for stream in (False, True)]
        emb = await relay.http.fetch(relay.url + "/v1/embeddings", method="POST", raise_error=False,
                                     headers={"Authorization": f"Bearer {TEST_KEY}"},
                                     body=json.dumps({"model": "text-embedding-ada-002", "input": "Hi"}))
        relay.check(emb, TEST_KEY, what="embeddings")
        relay.fake.state.behaviour.usage_override = None
        print(f"\nusage {usage}: chat {codes}, embeddings {emb.code}")
        for i in range(4):  # both keys go on being served and charged
            await relay.chat(TEST_KEY, stream=i % 2 == 0)
            await relay.chat(OTHER_KEY, stream=i % 2 == 1)
        await relay.settles(TEST_KEY, OTHER_KEY)
        for e in await relay.store.ledger_entries():
            assert 0 <= e["cost"] <= INT64_MAX
        await relay.assert_exact()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("usage", [
    pytest.param({"prompt_tokens": 8, "completion_tokens": 2**31, "total_tokens": 2**31 + 8}, id="completion-2^31"),
    pytest.param({"prompt_tokens": 8, "completion_tokens": 5000}, id="completion-5000-of-max-10"),
])
async def test_usage_reporting_more_than_was_delivered_is_not_charged_beyond_the_reservation(
        usage, stream, embedded, io_loop):
    """max_tokens is 10 and 10 tokens arrive: an upstream cannot have produced more, whatever
    its ``usage`` says, and the key must not pay for more than the request reserved. (Only the
    completion side has such a bound: a prompt can legitimately cost more than relay's estimate,
    images for one, so an inflated ``prompt_tokens`` is not judged here.)"""
    async with leased_relay(embedded, {TEST_KEY: 100_000}) as relay:
        relay.fake.state.behaviour.usage_override = usage
        resp = await relay.chat(stream=stream, stream_options={"include_usage": True} if stream else None)
        assert resp.code == 200
        relay.fake.state.behaviour.usage_override = None
        await relay.settles(TEST_KEY)
        [entry] = await relay.store.ledger_entries()
        docs = await relay.assert_exact()
        print(f"\nusage {usage}: charged {entry['cost']} units ({entry['prompt_tokens']} + "
              f"{entry['completion_tokens']} tokens); balance {docs[0]['balance']}")
        charged = (f"charged {entry['cost']} units ({entry['prompt_tokens']} + {entry['completion_tokens']} tokens) "
                   f"for 10 tokens delivered of a request that reserved {COST}; balance {docs[0]['balance']}")
        assert entry["completion_tokens"] <= 10, f"more completion tokens than max_tokens allows: {charged}"
        assert entry["cost"] <= COST, charged
        assert docs[0]["balance"] >= 0


@pytest.mark.parametrize("usage", [
    pytest.param({"prompt_tokens": True, "completion_tokens": True, "total_tokens": 2}, id="booleans"),
    pytest.param({"prompt_tokens": 8.0, "completion_tokens": 10.0}, id="floats"),
    pytest.param({"prompt_tokens": "8", "completion_tokens": "10"}, id="strings"),
    pytest.param({"prompt_tokens": -8, "completion_tokens": -10}, id="negative"),
    pytest.param({"total_tokens": 18}, id="missing"),
    pytest.param({"prompt_tokens": 8, "total_tokens": 18}, id="completion-missing"),
])
async def test_usage_that_is_not_a_count_is_not_taken_for_one(usage, embedded, io_loop):
    """Relay counts the delivered reply itself instead: 8 + 10 tokens, 560 units."""
    async with leased_relay(embedded) as relay:
        relay.fake.state.behaviour.usage_override = usage
        for stream in (False, True):
            assert (await relay.chat(stream=stream)).code == 200
        await relay.settles(TEST_KEY)
        entries = await relay.store.ledger_entries()
        await relay.assert_exact()
        for e in entries:
            assert (e["prompt_tokens"], e["completion_tokens"], e["cost"]) == (8, 10, COST), \
                f"charged {e['cost']} units for {e['prompt_tokens']!r} + {e['completion_tokens']!r} tokens"
            kinds = (type(e["prompt_tokens"]), type(e["completion_tokens"]))
            assert kinds == (int, int), f"the ledger holds {kinds} token counts"


# --- clients and upstreams that stop mid-stream -------------------------------------------------

def _read_events_then_hang_up(port: int, events: int) -> bytes:
    body = json.dumps({"model": "gpt-4", "stream": True, "messages": HI, "max_tokens": 10}).encode()
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        got = b""
        while got.count(b"data: ") < events:
            data = s.recv(4096)
            if not data:
                break
            got += data
    return got


async def test_clients_hanging_up_mid_stream_pay_for_what_they_received_and_nothing_more(embedded, io_loop):
    async with leased_relay(embedded) as relay:
        relay.fake.state.behaviour.chunk_delay = 0.05
        port = int(relay.url.rsplit(":", 1)[1])
        loop = asyncio.get_running_loop()
        # Threads of their own: relay's name lookups (aiohttp, the driver) need the loop's default executor.
        with ThreadPoolExecutor(6) as clients:
            seen = await asyncio.gather(*(loop.run_in_executor(clients, _read_events_then_hang_up, port, k)
                                          for k in (2, 3, 4, 5, 6, 7)))
        ids = {}
        for got in seen:
            head = got.split(b"\r\n\r\n", 1)[0].decode()
            rid = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                       if line.lower().startswith("x-request-id:"))
            ids[rid] = got.count(b'"content":"') - 1  # the role chunk carries empty content
        relay.ok[hash_key(TEST_KEY)] |= set(ids)
        await relay.settles(TEST_KEY)
        await eventually(lambda: all(r["aborted"] for r in relay.fake.requests), timeout=3,
                         message="every upstream request was cancelled")
        entries = {e["_id"]: e for e in await relay.store.ledger_entries()}
        for rid, content_seen in ids.items():
            e = entries[rid]
            assert content_seen <= e["completion_tokens"] < 10, (content_seen, e["completion_tokens"])
            assert e["cost"] == PROMPT_COST + 40 * e["completion_tokens"]
        await relay.assert_exact()


async def test_an_upstream_failing_mid_stream_is_charged_for_what_was_delivered_once(embedded, io_loop):
    async with leased_relay(embedded) as relay:
        relay.fake.state.behaviour.truncate_after_chunks = 3
        relay.fake.state.behaviour.chunk_delay = 0.02  # the chunks reach relay before the connection drops
        cut = await asyncio.gather(*(relay.chat(stream=True) for _ in range(5)))
        assert all(r.code == 200 and b"[DONE]" not in r.body for r in cut)
        relay.fake.state.behaviour.truncate_after_chunks = None
        relay.fake.state.behaviour.status = 500  # before the first byte: nothing delivered, nothing charged
        failed = await asyncio.gather(*(relay.chat(stream=i % 2 == 0, upstream_failed=True) for i in range(4)))
        assert [r.code for r in failed] == [502] * 4
        relay.fake.state.behaviour.status = None
        await relay.settles(TEST_KEY)
        entries = await relay.store.ledger_entries()
        assert sorted((e["completion_tokens"], e["cost"]) for e in entries) == [(3, PROMPT_COST + 3 * 40)] * 5
        await relay.assert_exact()
