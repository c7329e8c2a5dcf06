"""One request's money: reserve before forwarding, then settle exactly once or refund.

``Charger.reserve`` returns a ``Charge``; whatever happens next, the handler ends it with
``settle`` (the client received output) or ``refund`` (it received none). The store makes
both idempotent and atomic; this module decides which, and with what numbers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from relay.config import Price
from relay.errors import RelayError, StoreUnavailable
from relay.metering.bounds import MAX_TOKENS, clamp_tokens
from relay.metering.pricing import cost
from relay.metering.quote import Quote
from relay.lease import LeaseBook
from relay.settlement_queue import SettlementQueue
from relay.store.mongo import LedgerEntry, MongoStore, utc_now

log = logging.getLogger("relay.charging")


@dataclass
class Charge:
    key_hash: str
    request_id: str
    quote: Quote
    held: int
    stream: bool
    ended: bool = False
    cost: int = 0


class Charger:
    """Store outage policy: no reservation, no forwarding (503 ``store_unavailable``). Without
    leases a settlement or refund that fails after the response is queued, journaled and
    retried; with leases they happen in memory and the lease book's group commits retry."""

    def __init__(self, store: MongoStore, on_settled: Callable[[LedgerEntry], None] | None = None,
                 queue: SettlementQueue | None = None, book: LeaseBook | None = None):
        self.store = store
        self.on_settled = on_settled
        self.queue = queue if queue is not None else SettlementQueue(store)  # an empty queue is falsy
        self.book = book  # with leases, requests reserve, settle and refund in memory
        self.on_store_wait: Callable[[], None] | None = None  # without leases, every reservation

    async def reserve(self, key_hash: str, request_id: str, quote: Quote, stream: bool) -> Charge:
        try:
            if self.book is not None:
                held = await self.book.reserve(key_hash, request_id, quote.minimum, quote.full)
            else:
                if self.on_store_wait is not None:
                    self.on_store_wait()
                held = await self.store.reserve(key_hash, request_id, quote.minimum, quote.full)
        except (RelayError, LookupError):
            raise
        except Exception as exc:
            log.error("reservation of %s failed: store unavailable (%s)", request_id, type(exc).__name__)
            raise StoreUnavailable("The quota store is unavailable; nothing was charged. Retry shortly.") from None
        return Charge(key_hash, request_id, quote, held, stream)

    async def settle(self, charge: Charge, *, prompt_tokens: int, completion_tokens: int, status: int,
                     upstream: str, model: str, price: Price, latency_ms: float, ttfb_ms: float) -> None:
        """Charge at ``price``: the price of the model actually served, which an upstream's own
        model_map may have changed after the reservation was quoted."""
        if charge.ended:
            return
        charge.ended = True
        if not (0 <= prompt_tokens <= MAX_TOKENS and 0 <= completion_tokens <= MAX_TOKENS):
            log.warning("usage of %s out of range (%d prompt, %d completion tokens): clamped", charge.request_id,
                        prompt_tokens, completion_tokens)
            prompt_tokens, completion_tokens = clamp_tokens(prompt_tokens), clamp_tokens(completion_tokens)
        if charge.quote.limited and completion_tokens > charge.quote.allowance:
            # The client capped the reply: an upstream cannot have produced more than that.
            log.warning("upstream reported %d completion tokens for %s, capped by the client at %d: billed %d",
                        completion_tokens, charge.request_id, charge.quote.allowance, charge.quote.allowance)
            completion_tokens = charge.quote.allowance
        charge.cost = cost(price, prompt_tokens, completion_tokens)
        entry = LedgerEntry(
            request_id=charge.request_id, key_hash=charge.key_hash, model=model, upstream=upstream,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=charge.cost, status=status,
            latency_ms=round(latency_ms, 3), ttfb_ms=round(ttfb_ms, 3),
            stream=charge.stream, at=utc_now())
        if self.book is not None:
            self.book.settle(charge.key_hash, charge.request_id, entry)  # committed with its group
            if self.on_settled is not None:
                self.on_settled(entry)
            return
        try:
            if not await self.store.settle(entry, charge.held):
                log.warning("settlement of %s found no reservation (swept?)", charge.request_id)
            elif self.on_settled is not None:
                self.on_settled(entry)
        except Exception as exc:
            log.error("settlement of %s failed (%s); queued for retry", charge.request_id, type(exc).__name__)
            self.queue.put_settle(entry, charge.held)

    def busy(self) -> bool:
        """Reservations or settlements are still on their way (in memory or queued)."""
        return bool(self.queue) or (self.book is not None and self.book.busy())

    async def write_all(self) -> None:
        """Everything settled so far reaches the store now: batches committed, slices handed
        back (they are taken again on demand), queued settlements applied."""
        if self.book is not None:
            await self.book.commit_all(hand_back=True)
        if self.queue:
            await self.queue.drain()

    async def refund(self, charge: Charge) -> None:
        if charge.ended:
            return
        charge.ended = True
        if self.book is not None:
            self.book.refund(charge.key_hash, charge.request_id)
            return
        try:
            await self.store.refund(charge.key_hash, charge.request_id, charge.held)
        except Exception as exc:
            log.error("refund of %s failed (%s); queued for retry", charge.request_id, type(exc).__name__)
            self.queue.put_refund(charge.key_hash, charge.request_id, charge.held)
