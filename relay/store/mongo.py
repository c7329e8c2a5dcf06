"""The store: keys, holds, leases, the ledger and daily usage in MongoDB (PyMongo async or motor).

Conservation, per key: granted = balance + reserved + used, and used = Σ ledger costs (with
the entries still in the key's outbox). Every money movement is one atomic update of the
key's own document, filtered on the hold or lease version it changes, so it happens at most
once and needs no transaction (a standalone MongoDB works) and concurrent requests on one
key never conflict. Each concern lives in its own module, combined here.
"""
from __future__ import annotations

from relay.store.recovery import RecoveryMixin
from relay.store.responses import ResponsesMixin
from relay.store.usage import UsageMixin


class MongoStore(RecoveryMixin, UsageMixin, ResponsesMixin):
    """Keys (store.keys), holds and the outbox (store.holds), leases (store.leases), usage
    queries (store.usage), crash recovery (store.recovery) and the owners of stored responses
    (store.responses), on one connection (store.core)."""
