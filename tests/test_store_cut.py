"""A relay host cut off from the store for 45 s under traffic, with leases (the shipped mode).

Relay A reaches the store through a proxy that loses every byte for the cut; relay B (the
other host) reaches it directly and sweeps A's slice once A looks dead. Printed with ``-s``:
the numbers the closing note of the money-safety issue quotes.
"""
import asyncio
import json
import uuid

import pytest
from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from relay.store.connect import close_client, open_store
from tests.conservation import assert_conserved
from tests.faultproxy import FaultProxy
from tests.helpers import TEST_KEY, add_key, one_upstream_config, start_fake
from tests.processes import RelayProcess, db_uri

CUT_AT_S, CUT_FOR_S, AFTER_S, RATE = 5.0, 45.0, 15.0, 5.0
ANSWER_WITHIN_S = 30.0
REFUSAL_BOUND_S = 3.5  # the store call that finds the outage waits CALL_TIMEOUT_S (2.5 s); nobody queues behind it


@pytest.mark.timeout(seconds=240)
async def test_a_relay_cut_from_the_store_bills_every_answer_exactly_once(embedded, tmp_path, io_loop):
    proxy = await FaultProxy(int(embedded.split(":")[2].split("/")[0])).start()
    db = "cut" + uuid.uuid4().hex[:6]
    direct_uri = db_uri(embedded, db)
    store = await open_store(direct_uri)
    await add_key(store, quota=10**9)
    fake = start_fake()
    config = one_upstream_config(fake.base_url)
    a = await RelayProcess(config, tmp_path, "--mongodb-uri",
                           db_uri(f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true", db),
                           "--data-dir", str(tmp_path / "a")).start()
    b = await RelayProcess(config, tmp_path, "--mongodb-uri", direct_uri, "--data-dir", str(tmp_path / "b")).start()
    c = AsyncHTTPClient(force_instance=True, max_clients=500)
    loop = asyncio.get_running_loop()
    results: list[tuple[float, int, float, str | None]] = []

    async def one(sent_at: float) -> None:
        try:
            r = await c.fetch(a.url + "/v1/chat/completions", method="POST", raise_error=False,
                              request_timeout=ANSWER_WITHIN_S, headers={"Authorization": f"Bearer {TEST_KEY}"},
                              body=json.dumps({"model": "gpt-4", "max_tokens": 10,
                                               "messages": [{"role": "user", "content": "Hi"}]}))
            code, rid = r.code, r.headers.get("X-Request-Id")
        except Exception:  # no answer within ANSWER_WITHIN_S
            code, rid = 599, None
        results.append((sent_at, code, loop.time() - start - sent_at, rid))

    start = loop.time()
    tasks, leases_after = [], []
    while (elapsed := loop.time() - start) < CUT_AT_S + CUT_FOR_S + AFTER_S:
        if not proxy.down and CUT_AT_S <= elapsed < CUT_AT_S + CUT_FOR_S:
            proxy.cut(hang=True)
        elif proxy.down and elapsed >= CUT_AT_S + CUT_FOR_S:
            proxy.restore()
        if elapsed >= CUT_AT_S + CUT_FOR_S + 5:
            doc = await store.key_doc(hash_key(TEST_KEY))
            leases_after.append(sum(1 for lease in doc["leases"].values() if lease["amount"] > 0))
        tasks.append(asyncio.ensure_future(one(elapsed)))
        await asyncio.sleep(1 / RATE)
    await asyncio.gather(*tasks)
    await a.stop()
    await b.stop()
    await store.flush_ledger()
    ledger = {d["_id"] for d in await store.ledger_entries(hash_key(TEST_KEY))}
    answered = {rid for _, code, _, rid in results if code == 200}
    refused = [latency for _, code, latency, _ in results if code == 503]
    unanswered = [r for r in results if r[1] == 599]
    during = [r for r in results if CUT_AT_S <= r[0] < CUT_AT_S + CUT_FOR_S]
    doc = await store.key_doc(hash_key(TEST_KEY))
    print(f"\nstore cut of {CUT_FOR_S:.0f} s at {RATE:.0f} req/s: {len(results)} requests, "
          f"{len(answered)} answered 200 ({sum(1 for r in during if r[1] == 200)} during the cut), "
          f"{len(refused)} refused 503 (slowest {max(refused, default=0):.2f} s), {len(unanswered)} unanswered "
          f"within {ANSWER_WITHIN_S:.0f} s; answered 200 but not in the ledger: {len(answered - ledger)}; "
          f"in the ledger twice or unanswered: {len(ledger - answered)}; leases on the key: {len(doc['leases'])}, "
          f"holding units after healing: max {max(leases_after, default=0)} at once")
    assert not unanswered, "every request is answered"
    assert max(refused, default=0) < REFUSAL_BOUND_S, "refusals are fast: nobody queues behind the store"
    assert answered == ledger, "every answer billed, exactly once, including those settled after the sweep"
    assert max(leases_after, default=0) <= 2 and len(doc["leases"]) <= 4, "no stranded slices"
    await assert_conserved(store)
    await close_client(store.client)
    await proxy.stop()
    fake.stop()
    c.close()
