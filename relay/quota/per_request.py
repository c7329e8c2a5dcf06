"""Per-request quota (``leases: false``): each request's hold is one update of the key's
document before it is forwarded and one after; what fails after the response is journaled."""
from __future__ import annotations

import logging
from collections.abc import Callable

from relay.metering.ledger import LedgerEntry
from relay.metering.quote import Quote
from relay.quota.charge import Charge, Quota
from relay.quota.journal import SettlementQueue
from relay.store.mongo import MongoStore

log = logging.getLogger("relay.charging")


class PerRequestQuota(Quota):
    def __init__(self, store: MongoStore, queue: SettlementQueue,
                 on_settled: Callable[[LedgerEntry], None] | None = None):
        super().__init__(on_settled)
        self.store = store
        self.queue = queue

    async def _hold(self, key_hash: str, request_id: str, quote: Quote) -> int:
        if self.on_store_wait is not None:
            self.on_store_wait()
        return await self.store.reserve(key_hash, request_id, quote.minimum, quote.full)

    async def _charge(self, charge: Charge, entry: LedgerEntry) -> bool:
        try:
            if await self.store.settle(entry, charge.held):
                return True
            log.warning("settlement of %s found no reservation (swept?)", charge.request_id)
        except Exception as exc:
            log.error("settlement of %s failed (%s); queued for retry", charge.request_id, type(exc).__name__)
            self.queue.put_settle(entry, charge.held)
        return False

    async def _return(self, charge: Charge) -> None:
        try:
            await self.store.refund(charge.key_hash, charge.request_id, charge.held)
        except Exception as exc:
            log.error("refund of %s failed (%s); queued for retry", charge.request_id, type(exc).__name__)
            self.queue.put_refund(charge.key_hash, charge.request_id, charge.held)

    def balance_changed(self, key_hash: str) -> None:
        pass  # every reservation reads the balance in the store

    async def run(self) -> None:
        await self.queue.run()

    def busy(self) -> bool:
        return bool(self.queue)

    async def write_all(self) -> None:
        if self.queue:
            await self.queue.drain()

    async def close(self) -> None:
        await self.write_all()
