"""One request's money: the reservation before it is forwarded, the bill for what it delivered.

A ``Quota`` (per request or leased, chosen once at start-up) reserves a ``Charge`` and ends it
exactly once: ``settle`` (the client received output) or ``refund`` (it received none).
"""
from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass

from relay.config import Price
from relay.errors import RelayError, StoreUnavailable
from relay.metering.ledger import LedgerEntry, utc_now
from relay.metering.pricing import cost
from relay.metering.quote import Quote
from relay.metering.usage import Usage

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


@dataclass(frozen=True)
class Delivery:
    """What a request delivered, as the upstream reported it (or relay counted it)."""

    usage: Usage
    status: int
    upstream: str
    model: str       # the model actually served, after every mapping
    price: Price     # its price: an upstream's own model_map may have changed it after the quote
    latency_ms: float
    ttfb_ms: float
    requested_model: str = ""  # the name the client sent
    api: str = "chat"


def bill(charge: Charge, d: Delivery) -> LedgerEntry:
    """The ledger entry for what was delivered: counts kept within bounds, a reply no longer
    than the client allowed, cost = ceil(Σ each part × its price), computed once."""
    usage = d.usage
    if not usage.within_bounds():
        log.warning("usage of %s out of range (%d prompt, %d completion tokens): clamped", charge.request_id,
                    usage.prompt_tokens, usage.completion_tokens)
        usage = usage.clamped()
    if charge.quote.limited and usage.completion_tokens > charge.quote.allowance:
        # The client capped the reply: an upstream cannot have produced more than that.
        log.warning("upstream reported %d completion tokens for %s, capped by the client at %d",
                    usage.completion_tokens, charge.request_id, charge.quote.allowance)
        usage = usage.with_completion(charge.quote.allowance)
    return LedgerEntry(
        request_id=charge.request_id, key_hash=charge.key_hash, model=d.model, upstream=d.upstream,
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, cost=cost(d.price, usage),
        status=d.status, latency_ms=round(d.latency_ms, 3), ttfb_ms=round(d.ttfb_ms, 3), stream=charge.stream,
        at=utc_now(), cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens,
        image_tokens=usage.image_tokens, audio_tokens=usage.audio_input_tokens + usage.audio_output_tokens,
        images=usage.images, seconds=usage.seconds, characters=usage.characters,
        requested_model=d.requested_model[:128], api=d.api)


class Quota(abc.ABC):
    """Store outage policy: no reservation, no forwarding (503 ``store_unavailable``)."""

    def __init__(self, on_settled: Callable[[LedgerEntry], None] | None = None):
        self.on_settled = on_settled
        self.on_store_wait: Callable[[], None] | None = None  # a reservation that waits for the store

    async def reserve(self, key_hash: str, request_id: str, quote: Quote, stream: bool) -> Charge:
        try:
            held = await self._hold(key_hash, request_id, quote)
        except (RelayError, LookupError):
            raise
        except Exception as exc:
            log.error("reservation of %s failed: store unavailable (%s)", request_id, type(exc).__name__)
            raise StoreUnavailable("The quota store is unavailable; nothing was charged. Retry shortly.") from None
        return Charge(key_hash, request_id, quote, held, stream)

    async def settle(self, charge: Charge, delivery: Delivery) -> None:
        if charge.ended:
            return
        charge.ended = True
        entry = bill(charge, delivery)
        charge.cost = entry.cost
        if await self._charge(charge, entry) and self.on_settled is not None:
            self.on_settled(entry)

    async def refund(self, charge: Charge) -> None:
        if not charge.ended:
            charge.ended = True
            await self._return(charge)

    @abc.abstractmethod
    def balance_changed(self, key_hash: str) -> None:
        """A top-up through this process: what it knows of the key's balance is stale."""

    @abc.abstractmethod
    async def _hold(self, key_hash: str, request_id: str, quote: Quote) -> int:
        """Units held for the request (all of ``quote.full``, or what is left above ``quote.minimum``)."""

    @abc.abstractmethod
    async def _charge(self, charge: Charge, entry: LedgerEntry) -> bool:
        """Charge the entry against the hold; False when it will not count (already swept)."""

    @abc.abstractmethod
    async def _return(self, charge: Charge) -> None:
        """Give the hold back whole."""

    @abc.abstractmethod
    async def run(self) -> None:
        """Background work while relay runs (commits, retries)."""

    @abc.abstractmethod
    def busy(self) -> bool:
        """Reservations or settlements are still on their way (in memory or queued)."""

    @abc.abstractmethod
    async def write_all(self) -> None:
        """Everything settled so far reaches the store now; what relay holds is handed back
        (and taken again on demand)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """At shutdown, after the last request: everything written, everything handed back."""
