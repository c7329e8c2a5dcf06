"""What a key's policy costs relay per request, measured in-process (no HTTP, no upstream):
the checks a limited key's request goes through (address, expiry, model, and the rate limiter's
admit, headers and finish) against a key without a policy, on the embedded store.

    python bench/policy_checks.py [--n 20000] [--rate 2000]

Requests are paced at ``--rate`` a second (below the key's limits, as a busy key's traffic), so
the limiter takes its chunks from the store and gives units back as it would in relay. Prints,
per request: the wall time of the checks themselves (the store round trips a request waited for
included), this process's CPU over the whole run divided by the requests (the limiter's
background work and the driver's included; the pacing loop's own cost is the "no policy" row),
and store round trips per thousand requests.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from relay.limits import LimitBook  # noqa: E402
from relay.metering.ledger import utc_now  # noqa: E402
from relay.policy import policy_of  # noqa: E402
from relay.store.base import KeyRecord  # noqa: E402
from relay.store.connect import close_client, open_store  # noqa: E402
from relay.store.embedded import EmbeddedServer  # noqa: E402

POLICY = {"models": ["gpt-4o*", "gpt-3.5-turbo"], "allow_cidrs": ["10.0.0.0/8", "127.0.0.0/8", "2001:db8::/32"],
          "expires_at": utc_now().replace(year=2999), "rpm": 10**9, "tpm": 10**12, "max_concurrency": 10**6}


async def per_request(book: LimitBook, key: KeyRecord, n: int, rate: float) -> tuple[float, float]:
    """Seconds per request for ``key``: wall time in the checks, and this process's CPU."""
    spent, step, cpu = 0.0, 1.0 / rate, time.process_time()
    next_at = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        policy = key.policy
        if policy is not None:  # exactly what relay does on the hot path (auth, handlers/base.py, proxy.py)
            if policy.expired(time.time()) or not policy.allows_address("127.0.0.1") or \
                    not policy.allows_model("gpt-4o-mini"):
                raise AssertionError("refused")
            if policy.limited:
                ticket = await book.admit(key, 1032)
                book.headers(key.key_hash)
                book.finish(ticket, 18)
        spent += time.perf_counter() - t0
        next_at += step
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    return spent / n, (time.process_time() - cpu) / n


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(tmp)
        store = await open_store(server.start())
        try:
            book = LimitBook(store)
            upkeep = asyncio.ensure_future(book.run())
            plain = KeyRecord("h-plain", "ak-plain00", "active")
            limited = KeyRecord("h-limited", "ak-limited", "active", policy=policy_of(POLICY))
            for key in (plain, limited):  # warm-up
                await per_request(book, key, 500, args.rate)
            rows = []
            for key in (plain, limited):
                trips = store.round_trips
                wall, cpu = await per_request(book, key, args.n, args.rate)
                rows.append((key.prefix, wall * 1e6, cpu * 1e6, (store.round_trips - trips) * 1000 / args.n))
            upkeep.cancel()
            await book.close()
            print(f"{args.n} requests at {args.rate:.0f}/s, the store embedded (pymongo async)")
            print(f"{'key':20} {'checks µs':>10} {'CPU µs':>8} {'round trips / 1,000':>20}")
            for name, wall, cpu, trips in rows:
                print(f"{'no policy' if name == 'ak-plain00' else 'every policy field':20} {wall:10.1f} {cpu:8.1f} "
                      f"{trips:20.1f}")
            print(f"added CPU per request by the policy: {rows[1][2] - rows[0][2]:.1f} µs")
        finally:
            await close_client(store.client)
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=2000.0)
    asyncio.run(main(parser.parse_args()))
