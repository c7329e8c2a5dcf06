"""The ledger entry: one per settled request, never content; and the day it counts on. Pure."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)  # ~200 bytes, not ~1.3 KB: a group commit can hold thousands
class LedgerEntry:
    request_id: str
    key_hash: str
    model: str
    upstream: str
    prompt_tokens: int
    completion_tokens: int
    cost: int
    status: int
    latency_ms: float
    ttfb_ms: float
    stream: bool
    at: dt.datetime
    # What the tokens were, where it matters for the price (each a part of the counts above),
    # and what the client asked for: the model by its own name, the API.
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    image_tokens: int = 0
    audio_tokens: int = 0
    images: int = 0
    seconds: int = 0
    characters: int = 0
    requested_model: str = ""
    api: str = "chat"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def day_of(at: dt.datetime) -> str:
    return at.strftime("%Y-%m-%d")


_ENTRY_FIELDS = tuple(f for f in LedgerEntry.__dataclass_fields__ if f != "request_id")


def ledger_doc(entry: LedgerEntry, lease: str | None = None, lseq: int | None = None) -> dict[str, Any]:
    """A ledger entry as stored: its request id is the document's _id; entries settled under a
    lease carry the lease and the batch (``lseq``) that charges them."""
    # Not dataclasses.asdict: it deep-copies every field, 15 µs an entry, paid inside the event
    # loop for every entry of every group commit.
    doc: dict[str, Any] = {"_id": entry.request_id}
    for name in _ENTRY_FIELDS:
        doc[name] = getattr(entry, name)
    if lease is not None:
        doc["lease"], doc["lseq"] = lease, lseq
    return doc


def day_counts(entries: list[LedgerEntry]) -> dict[str, int]:
    """``$inc`` fields that count these entries into the key's per-day usage (``days``)."""
    inc: dict[str, int] = {}
    for e in entries:
        day = f"days.{day_of(e.at)}"
        for field, value in (("cost", e.cost), ("requests", 1), ("prompt_tokens", e.prompt_tokens),
                             ("completion_tokens", e.completion_tokens)):
            inc[f"{day}.{field}"] = inc.get(f"{day}.{field}", 0) + value
    return inc
