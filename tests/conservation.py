"""The conservation check every money test ends with."""
from relay.store.mongo import MongoStore


async def assert_conserved(store: MongoStore, settled: bool = True) -> list[dict]:
    """granted = balance + reserved + Σ ledger, per key; with ``settled``, nothing is still held."""
    docs = await store.keys.find({}).to_list(length=None)
    for doc in docs:
        ledger = await store.ledger_total(doc["_id"])
        grants = await store.grants.find({"key_hash": doc["_id"]}).to_list(length=None)
        assert doc["granted"] == sum(g["amount"] for g in grants), doc["prefix"]
        assert doc["reserved"] == sum(h["amount"] for h in doc["holds"]), doc["prefix"]
        assert doc["used"] == ledger, (doc["prefix"], doc["used"], ledger)
        assert doc["granted"] == doc["balance"] + doc["reserved"] + ledger, \
            (doc["prefix"], doc["granted"], doc["balance"], doc["reserved"], ledger)
        if settled:
            assert doc["reserved"] == 0 and doc["holds"] == [], (doc["prefix"], doc["holds"])
    return docs


async def settled(store: MongoStore, timeout: float = 10.0) -> None:
    """Wait until no key holds a reservation: settlement runs after the response is sent."""
    import asyncio
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await store.keys.count_documents({"holds.0": {"$exists": True}}):
        assert loop.time() < deadline, "reservations still held"
        await asyncio.sleep(0.02)
