"""The money: what a request reserves before it is forwarded, and its bill or refund after.

Two strategies behind one interface (``Quota``), chosen once at start-up: leased slices in
memory with group commits (the default), or one hold in the store per request.
"""
from __future__ import annotations

from collections.abc import Callable

from relay.metering.ledger import LedgerEntry
from relay.quota.charge import Charge, Delivery, Quota, bill
from relay.quota.journal import SettlementQueue
from relay.quota.lease_book import LeaseBook
from relay.quota.leased import LeasedQuota
from relay.quota.per_request import PerRequestQuota
from relay.store.mongo import MongoStore

__all__ = ["Charge", "Delivery", "LeaseBook", "LeasedQuota", "PerRequestQuota", "Quota", "bill", "build_quota"]


def build_quota(store: MongoStore, leases: bool, journal_path: str | None = None,
                on_settled: Callable[[LedgerEntry], None] | None = None) -> Quota:
    queue = SettlementQueue(store, journal_path)
    if leases:
        return LeasedQuota(LeaseBook(store), on_settled, leftover=queue if queue else None)
    return PerRequestQuota(store, queue, on_settled)
