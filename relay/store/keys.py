"""Relay keys in the store: created, found, topped up, disabled; the balance they are taken from."""
from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from pymongo import ReturnDocument

from relay.errors import InsufficientQuota, InvalidRequest, KeyDisabled, StoreUnavailable
from relay.keys import DISPLAY_PREFIX_LEN, display_prefix, generate_key, hash_key
from relay.metering.bounds import MAX_UNITS
from relay.store.base import KeyRecord
from relay.store.core import Document, StoreCore, _op

RESERVE_ATTEMPTS = 50
MIN_PREFIX_LEN = 6  # "ak-" and 3 characters: shorter ones match too many keys to be meant
AMBIGUOUS_LIST = 5  # prefixes named in an "ambiguous" answer


class KeysMixin(StoreCore):
    @_op("create_key")
    async def create_key(self, quota: int, note: str = "", key: str | None = None) -> tuple[str, Document]:
        """A new key holding ``quota`` units; ``key`` lets tests choose it, otherwise it is random."""
        if not 0 <= quota <= MAX_UNITS:
            raise InvalidRequest(f"quota must be between 0 and {MAX_UNITS}", param="quota")
        key = key or generate_key()
        now = self.now()
        doc: Document = {"_id": hash_key(key), "prefix": display_prefix(key), "note": note, "status": "active",
               "granted": quota, "balance": quota, "reserved": 0, "used": 0, "holds": [], "pending": [],
               "days": {}, "created_at": now}
        await self.keys.insert_one(doc)
        await self.grants.insert_one({"key_hash": doc["_id"], "amount": quota, "kind": "create", "at": now})
        return key, doc

    @_op("find_key")
    async def find_key(self, key_hash: str) -> KeyRecord | None:
        self.round_trips += 1
        doc = await self.keys.find_one({"_id": key_hash}, {"prefix": 1, "status": 1, "note": 1})
        if doc is None:
            return None
        return KeyRecord(doc["_id"], doc["prefix"], doc["status"], doc.get("note", ""))

    @_op("key_doc")
    async def key_doc(self, key_hash: str) -> Document | None:
        return await self.keys.find_one({"_id": key_hash})

    @_op("resolve")
    async def resolve(self, key_or_prefix: str) -> Document:
        """A key document by the full key, its hash, or a unique prefix of the key.

        A prefix has MIN_PREFIX_LEN to DISPLAY_PREFIX_LEN characters and is looked up among
        the stored display prefixes (a shorter one matches every prefix it starts). Several
        matches are an InvalidRequest naming how many; none a LookupError.
        """
        given = key_or_prefix
        if len(given) > DISPLAY_PREFIX_LEN:
            doc = await self.keys.find_one({"_id": hash_key(given)}) or await self.keys.find_one({"_id": given})
            if doc:
                return doc
            raise LookupError("no such key")
        # Key characters are ASCII below "~": every stored prefix that starts with the given one
        # sorts in [given, given + "~"), a range the prefix index serves.
        flt = {"prefix": {"$gte": given, "$lt": given + "~"}}
        docs = await self.keys.find(flt, {"prefix": 1}).sort("prefix", 1).to_list(length=AMBIGUOUS_LIST + 1)
        count = len(docs) if len(docs) <= AMBIGUOUS_LIST else await self.keys.count_documents(flt)
        if len(given) < MIN_PREFIX_LEN or count > 1:
            shown = ", ".join(d["prefix"] for d in docs[:AMBIGUOUS_LIST]) + (", ..." if count > AMBIGUOUS_LIST else "")
            if count > 1:
                raise InvalidRequest(f"ambiguous: {count} keys start with {given!r} ({shown}); give more "
                                     f"characters of the key (at least {MIN_PREFIX_LEN}).")
            raise InvalidRequest(f"give at least {MIN_PREFIX_LEN} characters of the key ({given!r} has {len(given)}).")
        if docs:
            doc = await self.keys.find_one({"_id": docs[0]["_id"]})
            if doc:
                return doc
        raise LookupError("no such key")

    @_op("topup")
    async def topup(self, key_hash: str, amount: int) -> Document:
        if not 0 < amount <= MAX_UNITS:
            raise InvalidRequest(f"a top-up must be between 1 and {MAX_UNITS}", param="quota")
        doc = await self._find_and_update({"_id": key_hash, "granted": {"$lte": MAX_UNITS - amount}},
                                          {"$inc": {"granted": amount, "balance": amount}})
        if doc is None:
            if await self.keys.find_one({"_id": key_hash}, {"_id": 1}) is None:
                raise LookupError("no such key")
            raise InvalidRequest(f"a key may be granted at most {MAX_UNITS} units in all", param="quota")
        await self.grants.insert_one({"key_hash": key_hash, "amount": amount, "kind": "topup", "at": self.now()})
        return doc

    @_op("set_status")
    async def set_status(self, key_hash: str, status: str) -> Document:
        doc = await self._find_and_update({"_id": key_hash}, {"$set": {"status": status}})
        if doc is None:
            raise LookupError("no such key")
        return doc

    @_op("list_keys")
    async def list_keys(self, limit: int = 1000) -> list[Document]:
        return await self.keys.find({}, {"holds": 0, "pending": 0, "days": 0}).sort("created_at", 1).to_list(
            length=limit)

    async def _find_and_update(self, flt: Document, update: Document) -> Document | None:
        return await self.keys.find_one_and_update(flt, update, return_document=ReturnDocument.AFTER)

    async def _take(self, key_hash: str, minimum: int, full: int, update_for: Callable[[int], Document]) -> int:
        amount = full
        for attempt in range(RESERVE_ATTEMPTS):  # compare-and-set on the balance when only a part is left
            if attempt > 1:
                await asyncio.sleep(random.uniform(0.001, 0.005))  # others settle and reserve meanwhile
            flt: Document = {"_id": key_hash, "status": "active"}
            if full > 0:  # one that costs nothing needs no balance, even an overdrawn one
                flt["balance"] = {"$gte": amount} if amount == full else amount
            self.round_trips += 1
            res = await self.keys.update_one(flt, update_for(amount))
            if res.modified_count == 1:
                return amount
            self.round_trips += 1
            doc = await self.keys.find_one({"_id": key_hash}, {"balance": 1, "status": 1})
            if doc is None:
                raise LookupError("no such key")
            if doc["status"] != "active":
                raise KeyDisabled("This relay key has been disabled.")
            balance = doc["balance"]
            if balance < max(minimum, 1) and not (minimum == 0 and full == 0):
                raise InsufficientQuota(
                    "You exceeded your current quota: this key's balance "
                    f"({max(balance, 0)} units) does not cover the prompt ({minimum} units). Top it up to continue.")
            amount = min(full, balance)
        raise StoreUnavailable("The quota could not be reserved under contention; retry.")
