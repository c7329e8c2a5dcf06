"""Leased quota (``leases: true``, the default): requests reserve, settle and refund against
this process's slice of each key in memory; group commits carry the money to the store."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from relay.errors import StoreUnavailable
from relay.metering.ledger import LedgerEntry
from relay.metering.quote import Quote
from relay.quota.charge import Charge, Quota
from relay.quota.journal import SettlementQueue
from relay.quota.lease_book import COMMIT_EVERY_S, LeaseBook

log = logging.getLogger("relay.charging")


class LeasedQuota(Quota):
    def __init__(self, book: LeaseBook, on_settled: Callable[[LedgerEntry], None] | None = None,
                 leftover: SettlementQueue | None = None):
        super().__init__(on_settled)
        self.book = book
        self.leftover = leftover  # a journal from an earlier run without leases, still to replay

    async def _hold(self, key_hash: str, request_id: str, quote: Quote) -> int:
        self.book.on_store_wait = self.on_store_wait
        return await self.book.reserve(key_hash, request_id, quote.minimum, quote.full)

    async def _charge(self, charge: Charge, entry: LedgerEntry) -> bool:
        self.book.settle(charge.key_hash, charge.request_id, entry)  # committed with its group
        return True

    async def _return(self, charge: Charge) -> None:
        self.book.refund(charge.key_hash, charge.request_id)

    def balance_changed(self, key_hash: str) -> None:
        self.book.balance_changed(key_hash)

    async def run(self) -> None:
        if self.leftover is not None:
            await asyncio.gather(self._commit_loop(), self.leftover.run())
        await self._commit_loop()

    async def _commit_loop(self) -> None:
        """The group commit, every ``COMMIT_EVERY_S``; batches wait in memory while the store
        is unreachable (its probe says when it is back)."""
        store = self.book.store
        while True:
            await asyncio.sleep(COMMIT_EVERY_S)
            if not store.breaker.up:
                continue
            try:
                await self.book.commit_all()
            except StoreUnavailable:
                pass  # logged once by the store, when it was found unreachable
            except Exception:
                log.exception("lease commit failed; retrying")

    def busy(self) -> bool:
        return self.book.busy() or bool(self.leftover)

    async def write_all(self) -> None:
        await self.book.commit_all(hand_back=True)
        if self.leftover:
            await self.leftover.drain()

    async def close(self) -> None:
        await self.book.release_all()
        if self.leftover:
            await self.leftover.drain()
