"""PyMongo's async client vs motor on the embedded store: latency of relay's store operations.

Starts an embedded server in a temporary directory and times, sequentially, the key lookup
(authentication), a reservation and a settlement, for each driver.

    python bench/store_clients.py [--n 300]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from relay.metering.ledger import LedgerEntry, utc_now
from relay.store.connect import CLIENTS, close_client, open_store
from relay.store.embedded import EmbeddedServer


async def measure(uri: str, kind: str, n: int) -> dict[str, float]:
    store = await open_store(uri, kind)
    _, doc = await store.create_key(10**12)
    h = doc["_id"]
    times: dict[str, list[float]] = {"find_key": [], "reserve": [], "settle": []}
    for i in range(n):
        t0 = time.perf_counter()
        await store.find_key(h)
        t1 = time.perf_counter()
        held = await store.reserve(h, f"{kind}-{i}", 10, 100)
        t2 = time.perf_counter()
        await store.settle(LedgerEntry(f"{kind}-{i}", h, "gpt-4", "u", 8, 10, 50, 200, 1.0, 1.0, False,
                                       utc_now()), held)
        t3 = time.perf_counter()
        times["find_key"].append(t1 - t0)
        times["reserve"].append(t2 - t1)
        times["settle"].append(t3 - t2)
        if i % 50 == 49:
            await store.flush_ledger({h})
    await close_client(store.client)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


async def main(n: int, uri: str) -> None:
    print(f"{'client':8} {'find_key p50':>13} {'reserve p50':>12} {'settle p50':>11}   (ms, {n} sequential requests)")
    for round_ in range(2):  # alternate so drift hits both
        for kind in CLIENTS:
            r = await measure(uri, kind, n)
            print(f"{kind:8} {r['find_key']:13.3f} {r['reserve']:12.3f} {r['settle']:11.3f}   round {round_ + 1}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    server = EmbeddedServer(tempfile.mkdtemp(prefix="relay-store-bench-"))
    uri = server.start()
    try:
        asyncio.run(main(args.n, uri))
    finally:
        server.stop()
