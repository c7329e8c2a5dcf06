"""Two relay hosts and one store host as a real deployment (tests/netlab.py): network
namespaces on two bridges, the client reaching relay A as the primary name and B as the
backup, B's clock 7 hours ahead. Needs root; skipped with the reason otherwise.

Printed with ``-s``: the numbers docs/deployment.md quotes.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import statistics
from collections.abc import Iterator

import pytest

from relay.keys import hash_key
from relay.store.connect import close_client, open_store
from relay.store.leases import TOMBSTONE_SEQ
from relay.store.mongo import MongoStore
from tests import netlab
from tests.conservation import assert_conserved
from tests.helpers import eventually

SKEW_B = "+7h"  # past MAX_HOLD_AGE_S (6 h): a sweeper that trusted its own clock would sweep live leases
COST = 560      # a gpt-4 chat of the fake upstream with max_tokens 10 (8 prompt, 10 completion tokens)
APPLIED_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[netlab.Deployment]:
    reason = netlab.why_not()
    if reason:
        pytest.skip(f"the deployment tests build network namespaces: {reason}")
    skew = SKEW_B if __import__("os").path.exists(netlab.FAKETIME_LIB) else None
    deployment = netlab.Deployment(tmp_path_factory.mktemp("lab"), skew_b=skew)
    try:
        yield deployment.start()
    finally:
        deployment.close()
        left = deployment.lab.leftovers()
        assert not left, f"the lab left {left}"


@pytest.fixture
def store(lab, io_loop) -> Iterator[MongoStore]:
    """The store, from the test process (through a forward into the store host)."""
    s = io_loop.run_sync(lambda: open_store(f"mongodb://127.0.0.1:{lab.store_port}/relay?directConnection=true"))
    yield s
    io_loop.run_sync(lambda: close_client(s.client))


async def new_key(store: MongoStore, quota: int, note: str) -> str:
    key, _ = await store.create_key(quota, note)
    return key


async def quiet_and_conserved(store: MongoStore, not_swept: list[str], timeout: float = 20.0) -> None:
    """Once every slice is handed back (2 s idle), the books balance exactly. No lease of the
    keys in ``not_swept`` was swept: their relays stayed alive and reachable, and B's clock is
    7 h ahead (a sweeper that judged by its own clock would take every lease for 6 h old)."""
    async def handed_back() -> bool:
        return await store.keys.count_documents({"reserved": {"$ne": 0}}) == 0

    await eventually(handed_back, timeout=timeout, interval=0.2, message="every slice handed back")
    await assert_conserved(store)
    for key in not_swept:
        doc = await store.key_doc(hash_key(key))
        assert doc is not None and not tombstones(doc), f"a live relay's lease was swept: {doc['leases']}"


def tombstones(doc: dict) -> list[dict]:
    return [lease for lease in doc.get("leases", {}).values() if lease["seq"] == TOMBSTONE_SEQ]


async def test_the_deployment_is_made_of_hosts(lab, store):
    """The client reaches A and B by name; the store only from the back network; B's clock is skewed."""
    agent = lab.agent
    answers = {name: await agent.acall(op="fetch", url=lab.url(name) + "/healthz") for name in ("primary", "backup")}
    assert {n: a["status"] for n, a in answers.items()} == {"primary": 200, "backup": 200}
    assert all(json.loads(a["body"])["store"] == "up" for a in answers.values())
    assert not lab.lab.reachable("client", lab.store_address, netlab.STORE_PORT), "clients never see the store"
    assert lab.lab.reachable("a", lab.store_address, netlab.STORE_PORT)
    assert not lab.lab.reachable("store", "127.0.0.1", netlab.STORE_PORT), "the store listens on its address only"
    dates = {n: email.utils.parsedate_to_datetime(a["headers"]["Date"]) for n, a in answers.items()}
    skew_s = (dates["backup"] - dates["primary"]).total_seconds()
    print(f"\nB's clock is {skew_s / 3600:+.2f} h from A's (libfaketime: {lab.skew_b or 'not installed'})")
    if lab.skew_b:
        assert abs(skew_s - 7 * 3600) < 120, "B's clock really is 7 h ahead"


async def test_a_disable_on_a_stops_requests_on_b_within_a_second(lab, store):
    key = await new_key(store, COST * 1000, "disable")
    agent = lab.agent
    for name in ("backup", "primary"):  # both hosts know the key (cached) and hold a slice of it
        r = await agent.acall(op="chat", url=lab.url(name), key=key, n=3)
        assert [x[1] for x in r["results"]] == [200] * 3
    times = {}
    for action, on, other, code in (("disable", "primary", "backup", 401), ("enable", "backup", "primary", 200)):
        change = {"method": "POST", "url": f"{lab.url(on)}/admin/keys/{key[:10]}/{action}",
                  "headers": {"Authorization": f"Bearer {netlab.ADMIN_TOKEN}"}, "body": "{}"}
        r = await agent.acall(op="change_then_until", change=change, url=lab.url(other), key=key, code=code,
                              within=5)
        assert r["change"] == 200 and r["after_s"] is not None, r
        times[f"{action} on {on}, applied on {other}"] = r["after_s"]
    print("\n" + "; ".join(f"{k}: {v * 1000:.0f} ms" for k, v in times.items()))
    assert max(times.values()) < APPLIED_WITHIN_S
    await quiet_and_conserved(store, [key])


def codes(results: list) -> list[int]:
    return [r[1] for r in results]


async def ledger_ids(store: MongoStore, key: str) -> list[str]:
    await store.flush_ledger()
    return [d["_id"] for d in await store.ledger.find({"key_hash": hash_key(key)}, {"_id": 1}).to_list(None)]


@pytest.mark.timeout(seconds=180)
async def test_one_key_spent_from_both_hosts_at_once_serves_exactly_its_budget(lab, store):
    """Both hosts spend one key at once, four clients each, until the key refuses them. With
    leases a host refuses once its own slice and the unleased balance cannot pay a request,
    while the other host may still hold a little (docs/quota.md): so when both refuse, less
    than what two requests cost is left unserved (one fragment per refusing host: balance +
    A's slice < COST when A refused, balance + B's slice < COST when B did). Once idle slices
    are handed back (2 s) the rest is served: exactly the budget, each answer billed once."""
    budget = 300
    key = await new_key(store, COST * budget, "both hosts")
    agent = lab.agent
    first = await asyncio.gather(*(agent.acall(op="chat", url=lab.url(n), key=key, concurrency=4,
                                               stop_after_refusals=20, timeout=30, seconds=120)
                                   for n in ("primary", "backup")))
    phase1 = [r for part in first for r in part["results"]]
    assert set(codes(phase1)) <= {200, 429}, sorted(set(codes(phase1)))
    served1 = codes(phase1).count(200)
    left1 = budget - served1
    assert 0 <= left1 * COST < 2 * COST, f"{left1} requests' worth unserved when both hosts refused"

    async def handed_back() -> bool:
        doc = await store.key_doc(hash_key(key))
        return doc["reserved"] == 0

    await eventually(handed_back, timeout=20, interval=0.2, message="idle slices handed back")
    rest = []
    for name in ("primary", "backup"):
        r = await agent.acall(op="chat", url=lab.url(name), key=key, concurrency=1, stop_after_refusals=3, seconds=30)
        rest += r["results"]
    served = served1 + codes(rest).count(200)
    print(f"\none key from both hosts: {served1} of {budget} requests served before both refused "
          f"(A {codes(first[0]['results']).count(200)}, B {codes(first[1]['results']).count(200)}; "
          f"{codes(phase1).count(429)} refusals), {left1} more once the slices were handed back")
    assert served == budget, "exactly the budget"
    answered = [r[3] for r in phase1 + rest if r[1] == 200]
    ids = await ledger_ids(store, key)
    assert sorted(ids) == sorted(answered) and len(set(ids)) == len(ids), "every answer billed, exactly once"
    doc = await store.key_doc(hash_key(key))
    assert (doc["balance"], doc["used"], doc["reserved"]) == (0, COST * budget, 0)
    await quiet_and_conserved(store, [key])


DELAY_MS, JITTER_MS = 20.0, 5.0   # each way, every byte between a relay host and the store
LATENCY_MARGIN_MS = 0.3
BLOCKS, PER_BLOCK = 20, 20         # per condition, interleaved: a load change on the machine hits both alike


@pytest.mark.timeout(seconds=240)
async def test_a_slow_store_link_adds_no_latency_to_a_chat(lab, store):
    """20 ± 5 ms each way between the relay hosts and the store (RTT +30..50 ms) changes the
    median chat, at concurrency 1, by at most 0.3 ms: the hot path waits for no store round
    trip (the slice is in memory, commits and top-ups run beside it, the key lookup is cached).

    Undelayed and delayed blocks alternate, so that a change in the machine's load falls on
    both; the client, relay A and the upstream run at real-time priority meanwhile (see
    ``Lab.realtime``: without it this machine's other work makes the medians 6-14 ms and
    their difference wander by ±0.8 ms from run to run, either way)."""
    key = await new_key(store, COST * 10_000, "latency")
    agent = lab.agent
    url = lab.url("primary")

    async def store_call_ms() -> float:  # an admin lookup on A: one store round trip, at least
        r = await agent.acall(op="fetch", url=f"{url}/admin/keys/{key[:10]}",
                              headers={"Authorization": f"Bearer {netlab.ADMIN_TOKEN}"})
        assert r["status"] == 200
        return r["ms"]

    def delay(on: bool) -> None:
        for relay in ("a", "b"):
            lab.set_delay(relay, DELAY_MS if on else 0, JITTER_MS if on else 0)

    latencies: dict[bool, list[float]] = {False: [], True: []}
    store_ms: dict[bool, list[float]] = {False: [], True: []}
    with lab.lab.realtime("client", "relay-a", "upstream"):  # the hot path; not the store, nor its links
        warm = await agent.acall(op="chat", url=url, key=key, n=100)
        assert set(codes(warm["results"])) == {200}
        try:
            for block in range(2 * BLOCKS):
                on = block % 2 == 1
                delay(on)
                store_ms[on].append(await store_call_ms())
                r = await agent.acall(op="chat", url=url, key=key, n=PER_BLOCK)
                assert set(codes(r["results"])) == {200}
                latencies[on] += [x[2] for x in r["results"]]
        finally:
            delay(False)
    off, on = statistics.median(latencies[False]), statistics.median(latencies[True])
    q = {k: statistics.quantiles(v, n=10)[-1] for k, v in latencies.items()}
    print(f"\nchat at concurrency 1 on A, {len(latencies[False])} requests each: median {off:.3f} ms undelayed, "
          f"{on:.3f} ms with {DELAY_MS:.0f} ± {JITTER_MS:.0f} ms each way to the store (added {on - off:+.3f} ms; "
          f"p90 {q[False]:.3f} / {q[True]:.3f} ms); an admin lookup (a store round trip): median "
          f"{statistics.median(store_ms[False]):.1f} ms / {statistics.median(store_ms[True]):.1f} ms")
    assert min(store_ms[True]) >= 2 * (DELAY_MS - JITTER_MS), "the delay is real: the store is far away"
    assert on - off <= LATENCY_MARGIN_MS, f"the store is on the hot path: +{on - off:.3f} ms"
    await quiet_and_conserved(store, [key])
