"""The ledger entry: one per settled request, never content; the documents that hold entries
(pages of a group commit, or one entry alone); and the day an entry counts on. Pure."""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument


# Slotted: ~200 bytes, not ~1.3 KB (and ~550 more once encoded): a group commit can hold thousands.
@dataclass(frozen=True, slots=True)
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
    # The entry as a page stores it, encoded once by ``encoded()``: when it is settled, on the
    # request's own time, instead of a hundred or more at once in the group commit, whose
    # building and encoding (~5 µs an entry) held relay's loop ~0.5 ms at a time, ten times a
    # second, in the way of the request then in flight.
    _bson: RawBSONDocument | None = field(default=None, init=False, compare=False, repr=False)

    def encoded(self) -> RawBSONDocument:
        """``ledger_doc(self)`` in BSON (the same document once decoded)."""
        raw = self._bson
        if raw is None:
            raw = RawBSONDocument(bson.encode(ledger_doc(self)))
            object.__setattr__(self, "_bson", raw)  # a cache: the entry's value does not change
        return raw


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def day_of(at: dt.datetime) -> str:
    return at.date().isoformat()  # "%Y-%m-%d" without strftime's format parsing


ENTRY_FIELDS = tuple(f for f in LedgerEntry.__dataclass_fields__ if f != "_bson")  # what an entry is
_ENTRY_FIELDS = ENTRY_FIELDS[1:]  # all but request_id, stored as _id


def ledger_doc(entry: LedgerEntry) -> dict[str, Any]:
    """A ledger entry as stored, alone or in a page: its request id is its _id."""
    # Not dataclasses.asdict: it deep-copies every field, 15 µs an entry, paid inside the event
    # loop for every entry of every group commit.
    doc: dict[str, Any] = {"_id": entry.request_id}
    for name in _ENTRY_FIELDS:
        doc[name] = getattr(entry, name)
    return doc


def ledger_page(entries: list[LedgerEntry], lease: str, lseq: int, part: int) -> dict[str, Any]:
    """One key's entries of one lease batch in one ledger document, newest time as ``at``.

    A document per entry cost the embedded store 0.23 ms of CPU for the document and 0.07 to
    0.15 ms more for each index (0.37 ms an entry with the ledger's three); a page of 256
    costs it 0.017 ms an entry. The id names the batch, the part and the entries' ids (a
    digest), so a repeated commit (the same batch, see ``LeasesMixin.commit_lease``) inserts
    nothing twice, and a page of other entries never passes for one already there."""
    digest = hashlib.blake2b("\n".join(e.request_id for e in entries).encode(), digest_size=8).hexdigest()
    return {"_id": f"{lease}:{lseq}:{part}:{digest}", "key_hash": entries[0].key_hash,
            "at": max(e.at for e in entries), "lease": lease, "lseq": lseq, "entries": [e.encoded() for e in entries]}


def entries_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries a ledger document holds: a page's, or the document itself (an entry settled
    through a key's outbox, and every entry stored before pages)."""
    entries: list[dict[str, Any]] | None = doc.get("entries")
    return [doc] if entries is None else entries


def day_counts(entries: list[LedgerEntry]) -> dict[str, int]:
    """``$inc`` fields that count these entries into the key's per-day usage (``days``)."""
    # Runs in the group commit over every entry of the batch: sums in locals, the day's name
    # made once per run of entries on one day (a batch is a tenth of a second).
    by_day: dict[str, list[int]] = {}

    def add(day: dt.date, sums: tuple[int, int, int, int]) -> None:
        name = day.isoformat()  # "%Y-%m-%d" without strftime's format parsing
        known = by_day.get(name)
        by_day[name] = [a + b for a, b in zip(known, sums, strict=True)] if known else list(sums)

    current: dt.date | None = None
    cost = requests = prompt = completion = 0
    for e in entries:
        day = e.at.date()
        if day != current:
            if current is not None:
                add(current, (cost, requests, prompt, completion))
            current, cost, requests, prompt, completion = day, 0, 0, 0, 0
        cost += e.cost
        requests += 1
        prompt += e.prompt_tokens
        completion += e.completion_tokens
    if current is not None:
        add(current, (cost, requests, prompt, completion))
    inc: dict[str, int] = {}
    for name, sums in by_day.items():
        for field_name, value in zip(("cost", "requests", "prompt_tokens", "completion_tokens"), sums, strict=True):
            inc[f"days.{name}.{field_name}"] = value
    return inc
