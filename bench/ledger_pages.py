"""The embedded store's CPU per ledger entry: a document per entry (with 0 to 3 of the ledger's
indexes) against entries in pages, as a lease's group commit writes them.

Starts one embedded server per layout in a temporary directory, writes ``--n`` entries through
relay's own store code in batches of ``--batch`` (one group commit's worth), and reads the
server's CPU time from /proc before and after.

    python bench/ledger_pages.py [--n 20000] [--batch 256]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid

from relay.metering.ledger import LedgerEntry, ledger_doc, ledger_page, utc_now
from relay.store.connect import close_client, make_client
from relay.store.embedded import EmbeddedServer
from relay.store.mongo import MongoStore

INDEXES = ([("key_hash", 1), ("at", -1)], [("at", -1)], [("lease", 1), ("lseq", 1)])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def entries(key_hash: str, n: int) -> list[LedgerEntry]:
    return [LedgerEntry(f"req-{uuid.uuid4().hex}", key_hash, "gpt-4o-mini", "primary", 12, 40, 93, 200, 180.0,
                        90.0, False, utc_now(), requested_model="gpt-4o-mini") for _ in range(n)]


async def measure(layout: str, indexes: int, n: int, batch: int) -> tuple[float, float]:
    """Server CPU and wall time per entry, in microseconds."""
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(os.path.join(tmp, "store"))
        uri = server.start()
        try:
            store = MongoStore(make_client(uri), "bench")
            # Not ensure_indexes(): the rows vary how many of the ledger's indexes there are.
            for keys in INDEXES[:indexes]:
                await store.ledger.create_index(keys)
            key_hash = "0" * 64
            work = [entries(key_hash, batch) for _ in range(n // batch)]
            assert server.proc is not None
            cpu0, wall0 = cpu_seconds(server.proc.pid), time.perf_counter()
            for seq, chunk in enumerate(work):
                if layout == "pages":
                    await store.ledger.insert_one(ledger_page(chunk, "lease-bench-1", seq, 0))
                else:
                    await store.ledger.insert_many([ledger_doc(e) for e in chunk], ordered=False)
            cpu, wall = cpu_seconds(server.proc.pid) - cpu0, time.perf_counter() - wall0
            count = len(work) * batch
            assert len(await store.ledger_entries(key_hash)) == count
            await close_client(store.client)
        finally:
            server.stop()
    return cpu / count * 1e6, wall / count * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="entries per layout")
    parser.add_argument("--batch", type=int, default=256, help="entries per group commit")
    args = parser.parse_args()
    print(f"{args.n} entries in batches of {args.batch}, server CPU and wall time per entry")
    print(f"{'layout':<28} {'cpu µs':>8} {'wall µs':>8}")
    rows = [("a document each", i) for i in range(4)] + [("pages", 3)]
    results = {}
    for layout, indexes in rows:
        name = f"{layout}, {indexes} index(es)"
        results[name] = await measure("pages" if layout == "pages" else "docs", indexes, args.n, args.batch)
        print(f"{name:<28} {results[name][0]:8.1f} {results[name][1]:8.1f}", flush=True)
    per_doc, paged = results["a document each, 3 index(es)"][0], results["pages, 3 index(es)"][0]
    print(f"pages use {paged / per_doc:.3f}x the store's CPU of a document per entry (the ledger's three indexes)")


if __name__ == "__main__":
    asyncio.run(main())
