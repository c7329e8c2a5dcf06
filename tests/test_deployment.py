"""Two relay hosts and one store host as a real deployment (tests/netlab.py): network
namespaces on two bridges, the client reaching relay A as the primary name and B as the
backup, B's clock 7 hours ahead. Needs root; skipped with the reason otherwise.

Printed with ``-s``: the numbers docs/deployment.md quotes.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import re
import shutil
import signal
import statistics
import time
import urllib.parse
from collections.abc import Iterator

import pytest
import yaml
from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from relay.metering.ledger import utc_now
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
    assert os.path.exists(netlab.FAKETIME_LIB), "Debian's faketime package is required (.ci/run installs it)"
    deployment = netlab.Deployment(tmp_path_factory.mktemp("lab"), skew_b=SKEW_B)
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
    print(f"\nB's clock is {skew_s / 3600:+.2f} h from A's (libfaketime, FAKETIME={lab.skew_b})")
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
    return [d["_id"] for d in await store.ledger_entries(hash_key(key))]


PROMPT = 160  # what the prompt of COST's chat costs (8 tokens at 20): what a request must be able to hold
CLIENTS = 4   # per host


@pytest.mark.timeout(seconds=180)
async def test_one_key_spent_from_both_hosts_at_once_serves_its_budget(lab, store):
    """Both hosts spend one key at once, four clients each, until the key refuses them.

    What docs/quota.md promises: a host refuses a request only when its own slice and the
    unleased balance together cannot pay the request's prompt (the other host may still hold
    a little, and spends it itself); one whose prompt they can pay is served, holding what is
    left, and may overdraw by at most its own excess (COST - PROMPT). So when both have
    refused, less than two prompts' worth is unserved (one fragment per host) — with every
    request costing COST and the budget a multiple of it, nothing — and only requests in
    flight at the end (four per host at most) can have overdrawn. Once the slices are handed
    back, both hosts keep refusing. Every answer is billed once, at its full cost."""
    budget = 300
    key = await new_key(store, COST * budget, "both hosts")
    agent = lab.agent
    first = await asyncio.gather(*(agent.acall(op="chat", url=lab.url(n), key=key, concurrency=CLIENTS,
                                               stop_after_refusals=20, timeout=30, seconds=120)
                                   for n in ("primary", "backup")))
    phase1 = [r for part in first for r in part["results"]]
    assert set(codes(phase1)) <= {200, 429}, sorted(set(codes(phase1)))
    served = codes(phase1).count(200)
    overdrawn = served * COST - budget * COST

    async def handed_back() -> bool:
        doc = await store.key_doc(hash_key(key))
        return doc["reserved"] == 0

    await eventually(handed_back, timeout=20, interval=0.2, message="idle slices handed back")
    for name in ("primary", "backup"):
        r = await agent.acall(op="chat", url=lab.url(name), key=key, n=3)
        assert codes(r["results"]) == [429] * 3, "nothing was left unserved"
    print(f"\none key from both hosts, {CLIENTS} clients each: {served} requests of {COST} units served for a "
          f"budget of {budget} (A {codes(first[0]['results']).count(200)}, B {codes(first[1]['results']).count(200)}; "
          f"{codes(phase1).count(429)} refusals); overdrawn by {overdrawn} units (partial holds at the end)")
    assert 0 <= overdrawn <= 2 * CLIENTS * (COST - PROMPT), "the budget is spent, overdrawn only as documented"
    answered = [r[3] for r in phase1 if r[1] == 200]
    ids = await ledger_ids(store, key)
    assert sorted(ids) == sorted(answered), "every answer billed, exactly once"
    doc = await store.key_doc(hash_key(key))
    assert (doc["balance"], doc["used"], doc["reserved"]) == (-overdrawn, COST * served, 0)
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


STEP_DOWN_S = 10


@pytest.mark.timeout(seconds=120)
async def test_a_primary_step_down_is_a_short_store_outage(lab, store):
    """What an election looks like from relay, as far as one node can show it: the store steps
    down (``replSetStepDown``, forced) for 10 s under traffic to both hosts. Reads still work,
    writes fail at once with "not primary" (the driver's one retry of a retryable write meets
    the same node). Each relay treats it as an outage: requests its slices cover are served,
    the others get a fast 503, and its breaker closes only once a write (its heartbeat) works
    again. Then every answer is billed once; nobody's lease is swept (10 s < 30 s)."""
    key = await new_key(store, COST * 100_000, "step-down")
    agent = lab.agent
    seconds = 5 + STEP_DOWN_S + 10
    traffic = [asyncio.ensure_future(agent.acall(seconds + 60, op="chat", url=lab.url(name), key=key, rate=5,
                                                 seconds=seconds, timeout=30)) for name in ("primary", "backup")]
    await asyncio.sleep(5)
    await store.client.admin.command("replSetStepDown", STEP_DOWN_S, force=True)
    down_at = time.monotonic()
    results = [r["results"] for r in await asyncio.gather(*traffic)]
    both = results[0] + results[1]
    window = [r for r in both if down_at <= r[0] < down_at + STEP_DOWN_S]
    refused = [r[2] / 1000 for r in both if r[1] == 503]
    after = [r for r in both if r[0] >= down_at + STEP_DOWN_S + 2]
    print(f"\nstore stepped down for {STEP_DOWN_S} s: {len(window)} requests in the window, "
          f"{codes(window).count(200)} served from slices, {len(refused)} refused with 503 (slowest "
          f"{max(refused, default=0) * 1000:.0f} ms); all {len(after)} from 2 s after it served")
    assert set(codes(both)) <= {200, 503}
    assert max(refused, default=0) < 1.0, "refused at once: a stepped-down node answers, it does not hang"
    assert set(codes(after)) == {200}
    await quiet_and_conserved(store, [key])
    answered = [r[3] for r in both if r[1] == 200]
    assert sorted(await ledger_ids(store, key)) == sorted(answered), "every answer billed, once"


def restrict(expr: str, instance: str) -> str:
    """``expr`` with every relay_* selector limited to one scrape target."""
    def one(m: re.Match[str]) -> str:
        inner = m.group(3)
        return f'{m.group(1)}{{instance="{instance}"{"," + inner if inner else ""}}}'
    return re.sub(r"\b(relay_[a-z0-9_]+)(\{([^}]*)\})?", one, expr)


def values(result: list[dict]) -> dict[frozenset, float]:
    return {frozenset(r["metric"].items()): float(r["value"][1]) for r in result}


@pytest.mark.timeout(seconds=180)
async def test_prometheus_scrapes_both_hosts_and_the_dashboard_aggregates_them(lab, store):
    """The real Prometheus (Debian's), on the monitoring host, scrapes A and B on the back
    network. Every request the client sent to either host is counted once, and each dashboard
    query over both hosts is what the two hosts' own numbers make: a sum is their sum, a
    minimum their minimum, a ratio or a quantile lies between theirs."""
    from tests.test_prometheus import MONITORING, dashboard_exprs
    assert shutil.which("prometheus"), "Debian's prometheus package is required (.ci/run installs it)"
    mon, hosts = lab.host("mon"), {name: lab.host(name) for name in ("a", "b")}
    targets = {name: f"{h.back}:{netlab.RELAY_PORT}" for name, h in hosts.items()}
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config.pop("rule_files", None)
    config["scrape_configs"][0]["static_configs"] = [{"targets": list(targets.values())}]
    (lab.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = lab.lab.run("mon", "prometheus", [
        "prometheus", f"--config.file={lab.workdir / 'prometheus.yml'}", f"--storage.tsdb.path={lab.workdir / 'tsdb'}",
        f"--web.listen-address={mon.back}:{netlab.PROMETHEUS_PORT}"])
    base = f"http://127.0.0.1:{lab.lab.forward('mon', str(mon.back), netlab.PROMETHEUS_PORT)}"
    c = AsyncHTTPClient(force_instance=True)

    async def query(expr: str, at: float | None = None) -> list[dict]:
        q = urllib.parse.urlencode({"query": expr, **({"time": f"{at:.3f}"} if at else {})})
        body = json.loads((await c.fetch(f"{base}/api/v1/query?{q}", raise_error=False)).body)
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    async def ready() -> bool:
        try:
            return (await c.fetch(base + "/-/ready", raise_error=False)).code == 200
        except Exception:  # not listening yet: the forward closes the connection it could not make
            return False

    counted = 'sum by (instance) (relay_requests_total{route=~"chat|embeddings"})'
    try:
        await eventually(ready, timeout=60, interval=0.2, message="prometheus is ready")

        async def both_up() -> bool:
            up = values(await query('up{job="relay"}'))
            return len(up) == 2 and set(up.values()) == {1.0}

        await eventually(both_up, timeout=30, interval=0.2, message="both hosts scraped")
        await asyncio.sleep(2.5)  # a quiet scrape or two: the counts before
        before = {dict(k)["instance"]: v for k, v in values(await query(counted)).items()}
        key = await new_key(store, COST * 1000, "prometheus")
        poor = await new_key(store, 100, "prometheus, poor")  # less than a prompt costs (160): 429
        sent = {"a": ("primary", 30, 5), "b": ("backup", 20, 5)}
        for url, chats, refused in sent.values():
            r = await lab.agent.acall(op="chat", url=lab.url(url), key=key, n=chats, concurrency=2)
            assert set(codes(r["results"])) == {200}
            r = await lab.agent.acall(op="chat", url=lab.url(url), key=poor, n=refused)
            assert set(codes(r["results"])) == {429}
        expected = {targets[n]: before.get(targets[n], 0) + chats + refused for n, (_, chats, refused) in sent.items()}

        async def all_counted() -> bool:
            now = {dict(k)["instance"]: v for k, v in values(await query(counted)).items()}
            assert all(now.get(i, 0) <= expected[i] for i in expected), (now, expected)  # never more than sent
            return now == expected

        await eventually(all_counted, timeout=15, interval=0.25, message="every request counted, on its host")
        total = values(await query('sum(relay_requests_total{route=~"chat|embeddings"})'))
        assert list(total.values()) == [sum(expected.values())]


        async def rated() -> bool:  # a rate needs two samples of a series: scraped again since
            seen = values(await query('count_over_time(relay_requests_total{route=~"chat|embeddings"}[30s])'))
            return len(seen) >= 3 and min(seen.values()) >= 3

        await eventually(rated, timeout=15, interval=0.25, message="the counts scraped a few times")
        at = time.time() - 0.5
        both = []
        for expr in dashboard_exprs():
            combined = values(await query(expr, at))
            own = {name: values(await query(restrict(expr, target), at)) for name, target in targets.items()}
            assert all("instance" not in dict(k) for k in combined), f"not aggregated over hosts: {expr}"
            labels = set(combined) | set().union(*own.values())
            assert set(combined) == labels, f"{expr}: series of one host missing from the whole"
            for k in labels:
                c_v, mine = combined[k], [o[k] for o in own.values() if k in o and not math.isnan(o[k])]
                if math.isnan(c_v) or not mine:
                    continue
                if expr.startswith("histogram_quantile") or " / " in expr:
                    assert min(mine) - 1e-9 <= c_v <= max(mine) + 1e-9, (expr, dict(k), c_v, mine)
                elif expr.startswith("min by"):
                    assert c_v == pytest.approx(min(mine)), (expr, dict(k), c_v, mine)
                else:
                    assert expr.startswith("sum"), f"a dashboard query of a kind this test does not know: {expr}"
                    assert c_v == pytest.approx(sum(mine), rel=1e-9), (expr, dict(k), c_v, mine)
            if all(own.values()):
                both.append(expr)
        print(f"\nPrometheus scraped both hosts: {sum(expected.values()) - sum(before.values()):.0f} requests counted, "
              f"{len(both)} of {len(dashboard_exprs())} dashboard queries with data from both hosts, each the "
              f"aggregate of the two")
        assert any("relay_requests_total" in e for e in both) and any("relay_quota_units_charged" in e for e in both)
        await quiet_and_conserved(store, [key, poor])
    finally:
        prom.stop()
        c.close()


CUT_AT_S, CUT_FOR_S, AFTER_S = 5.0, 45.0, 15.0
RATE_A, RATE_B = 5.0, 2.0
REFUSAL_BOUND_S = 3.5  # the store call that finds the outage waits CALL_TIMEOUT_S (2.5 s); nobody queues behind it


@pytest.mark.timeout(seconds=240)
async def test_relay_a_cut_from_the_store_for_45_s_under_traffic(lab, store):
    """A's cable to the back network is pulled at the switch for 45 s (a silent partition: A
    hears nothing from the store and gets no error, only timeouts) while the client keeps
    sending to both names. A follows the outage policy: requests its slice covers are served,
    the rest get a fast 503; B serves throughout and, once A has been silent for 30 s of its
    own elapsed time (its clock is 7 h ahead), returns A's slice. After the link returns A
    bills what it served meanwhile against the swept slice: every answer in the ledger, once."""
    key = await new_key(store, COST * 100_000, "cut")
    agent = lab.agent
    seconds = CUT_AT_S + CUT_FOR_S + AFTER_S
    traffic = [asyncio.ensure_future(agent.acall(seconds + 60, op="chat", url=lab.url(name), key=key, rate=rate,
                                                 seconds=seconds, timeout=30))
               for name, rate in (("primary", RATE_A), ("backup", RATE_B))]
    await asyncio.sleep(CUT_AT_S)  # the traffic's own pace: the cut's time is read, not assumed
    lab.lab.cut("a", "back")
    cut_at, cut_wall = time.monotonic(), utc_now()
    try:
        await asyncio.sleep(CUT_FOR_S)
    finally:
        lab.lab.heal("a", "back")
    healed_at = time.monotonic()
    a_results, b_results = [r["results"] for r in await asyncio.gather(*traffic)]

    during = [r for r in a_results if cut_at <= r[0] < healed_at]
    refused = [r[2] / 1000 for r in a_results if r[1] == 503]
    late = [r for r in a_results if r[0] >= healed_at + REFUSAL_BOUND_S]
    print(f"\nA cut from the store for {CUT_FOR_S:.0f} s, {RATE_A:.0f} req/s to A and {RATE_B:.0f} to B: "
          f"A answered {len(a_results)}: {codes(a_results).count(200)} with 200 "
          f"({codes(during).count(200)} during the cut, from its slice), {len(refused)} with 503 "
          f"(slowest {max(refused, default=0):.2f} s); B answered {len(b_results)}, "
          f"{codes(b_results).count(200)} with 200")
    assert set(codes(a_results)) <= {200, 503}, sorted(set(codes(a_results)))
    assert set(codes(b_results)) == {200}, "B serves throughout"
    assert codes(during).count(200) >= 1, "A's slice keeps serving"
    assert refused and max(refused) < REFUSAL_BOUND_S, "refusals are fast: nobody queues behind the store"
    assert all(cut_at - 1 <= r[0] < healed_at + REFUSAL_BOUND_S for r in a_results if r[1] == 503), "only in the cut"
    assert set(codes(late)) == {200}, "A serves again once the link is back"

    await eventually(lambda: "was swept" in lab.relays["a"].log(tail=None), timeout=20, interval=0.2,
                     message="A found its slice swept and billed it late")
    await quiet_and_conserved(store, [])
    doc = await store.key_doc(hash_key(key))
    swept = tombstones(doc)
    assert [t["owner"] for t in swept] == [lab.instance("a")], "B returned A's slice, and only A's"
    swept_after = (swept[0]["at"] - cut_wall).total_seconds()
    print(f"A's slice was swept {swept_after:.1f} s into the cut (by B, whose clock is 7 h ahead)")
    assert 20 <= swept_after <= CUT_FOR_S, "swept once A was silent 30 s by the sweeper's elapsed time, not before"
    answered = [r[3] for r in a_results + b_results if r[1] == 200]
    ids = await ledger_ids(store, key)
    assert sorted(ids) == sorted(answered), "every answer billed exactly once, those served during the cut too"



SWEPT_WITHIN_S = 60.0      # the bound; docs/quota.md: within 40 s
KILL_AFTER_S, FAILOVER_FOR_S, FAILOVER_RATE = 3.0, 10.0, 10.0
UNBILLED_WINDOW_S = 0.5    # what kill -9 may leave unbilled: the answers of the last group commits (0.1 s each)


@pytest.mark.timeout(seconds=180)
async def test_relay_a_killed_the_client_switches_to_b_and_b_returns_a_slices(lab, store):
    """kill -9 of relay A while the OpenAI Python client sends ten chats a second to the
    primary name: the request that finds A gone is asked again of the backup name at once and
    answered by B; B's sweeper returns A's slice within 60 s. Nothing is charged twice; what A
    settled in its last group commits before it died may go unbilled (docs/quota.md)."""
    key = await new_key(store, COST * 100_000, "kill")
    a_id = lab.instance("a")

    async def a_holds() -> bool:
        doc = await store.key_doc(hash_key(key))
        return any(lease.get("owner") == a_id and lease["amount"] > 0 for lease in doc.get("leases", {}).values())

    run = asyncio.ensure_future(lab.agent.acall(FAILOVER_FOR_S + 60, op="failover", primary=lab.url("primary"),
                                                backup=lab.url("backup"), key=key, seconds=FAILOVER_FOR_S,
                                                rate=FAILOVER_RATE))
    await eventually(a_holds, timeout=10, interval=0.1, message="A serves the key from a slice")
    await asyncio.sleep(KILL_AFTER_S)
    lab.relays["a"].stop(signal.SIGKILL)
    killed_at = time.monotonic()
    results = (await run)["results"]

    failed = [r for r in results if r[2] != 200]
    assert len(failed) == 1 and failed[0][1:3] == ["primary", "APIConnectionError"], failed
    i = results.index(failed[0])
    switched = results[i + 1]
    assert switched[1] == "backup" and switched[2] == 200
    at_once = switched[0] + switched[3] - failed[0][0]
    assert all(r[1] == "primary" for r in results[:i]) and all(r[1] == "backup" for r in results[i + 1:])

    async def a_returned() -> bool:
        return not await a_holds()

    await eventually(a_returned, timeout=SWEPT_WITHIN_S, interval=0.25, message="B returns A's slice")
    returned_after = time.monotonic() - killed_at
    await quiet_and_conserved(store, [])
    ids = set(await ledger_ids(store, key))
    answered = {r[4]: r for r in results if r[2] == 200}
    unbilled = [r for rid, r in answered.items() if rid not in ids]
    print(f"\nA killed: the client's request failed on the primary after {failed[0][3] * 1000:.0f} ms and was "
          f"answered by the backup {at_once * 1000:.0f} ms after it was first sent; {len(results) - i - 1} answers "
          f"from B after, {i} from A before; B returned A's slice {returned_after:.1f} s after the kill; "
          f"{len(unbilled)} of A's answers unbilled (its last group commit)")
    assert at_once < 1.0, "the backup answers at once"
    assert ids <= set(answered), "nothing billed that was not answered; each once (the ledger is by request id)"
    assert all(r[1] == "primary" and killed_at - UNBILLED_WINDOW_S <= r[0] + r[3] <= killed_at for r in unbilled), \
        "only A's answers of its last moments can go unbilled"
    assert returned_after <= SWEPT_WITHIN_S


def test_the_lab_leaves_nothing_behind(lab):
    """Last: the deployment taken down; no namespace, bridge, interface, hosts file, process or
    forward is left (the bridges and interfaces live only inside the lab's namespaces)."""
    names = [h.ns for h in lab.lab.hosts.values()] + [lab.lab.switch]
    pids = [p.pid for p in lab.lab.procs]
    lab.close()
    assert lab.lab.leftovers() == []
    assert not set(names) & set(netlab.namespaces())
    assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                   for pid in pids), "every process of the lab has ended"
