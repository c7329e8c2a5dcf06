"""The conservation check every money test ends with."""
from relay.store.mongo import MongoStore


async def assert_conserved(store: MongoStore, settled: bool = True) -> list[dict]:
    """granted = balance + reserved + Σ ledger, per key; with ``settled``, nothing is still held.

    Checked twice: with entries still in the keys' outboxes, and after the flush that moves
    them to the ledger collection (as the background flusher and the sweeper do).
    """
    await conserved_now(store, settled)
    await store.flush_ledger()
    docs = await conserved_now(store, settled)
    assert all(d["pending"] == [] for d in docs)
    for doc in docs:
        counted = sum(d["cost"] for d in doc.get("days", {}).values())
        assert counted == await store.ledger_total(doc["_id"]), "the daily counters match the ledger"
    return docs


async def conserved_now(store: MongoStore, settled: bool) -> list[dict]:
    docs = await store.keys.find({}).to_list(length=None)
    for doc in docs:
        ledger = await store.ledger_total(doc["_id"])
        ids = [e["_id"] for e in await store.ledger_entries(doc["_id"])]
        assert len(ids) == len(set(ids)), (doc["prefix"], "an entry is in the ledger twice")
        grants = await store.grants.find({"key_hash": doc["_id"]}).to_list(length=None)
        assert doc["granted"] == sum(g["amount"] for g in grants), doc["prefix"]
        leased = sum(lease["amount"] for lease in doc.get("leases", {}).values())
        assert doc["reserved"] == sum(h["amount"] for h in doc["holds"]) + leased, doc["prefix"]
        assert doc["used"] == ledger, (doc["prefix"], doc["used"], ledger)
        assert doc["granted"] == doc["balance"] + doc["reserved"] + ledger, \
            (doc["prefix"], doc["granted"], doc["balance"], doc["reserved"], ledger)
        if settled:
            assert doc["reserved"] == 0 and doc["holds"] == [], (doc["prefix"], doc["holds"])
    return docs


async def settled(store: MongoStore, services=None, timeout: float = 10.0) -> None:
    """Wait until no key holds a reservation or an unflushed ledger entry.

    Settlement runs after the response is sent, and the flusher moves entries shortly after.
    With ``services`` (a relay in this process), also until its requests have settled in
    memory; then what they owe is written (leases: committed, slices handed back), so that
    the store reads as if each request had been charged on its own.
    """
    import asyncio
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if services is not None:
        while services.quota.busy():
            assert loop.time() < deadline, "requests still hold units"
            await asyncio.sleep(0.02)
        await services.quota.write_all()
    busy = {"$or": [{"holds.0": {"$exists": True}}, {"pending.0": {"$exists": True}}]}
    while await store.keys.count_documents(busy):
        assert loop.time() < deadline, "reservations still held"
        await asyncio.sleep(0.02)
