"""Top-up codes in the store: created, listed, disabled, and redeemed onto a key exactly once.

A redemption moves money across two documents (the code's and the key's) without a
transaction, in steps that are each a single-document atomic update and each idempotent:

1. **claim** the code: ``{_id, status: active, redeemed_by: null}`` → ``redeemed_by`` = the key,
   ``applied: false``. At most one claim matches, whichever process or request sends it: this
   decides which key the code credits, and that every other attempt is ``code_used``.
2. **credit** the key: ``$inc`` granted and balance by the code's quota and ``$push`` the code's
   id onto the key's ``redeemed`` list, filtered on that id *not* being in the list yet. The
   marker is written in the same update as the money, so the credit applies at most once,
   however often this step is repeated.
3. **record** the grant in ``grants`` with ``_id`` ``code-<id>`` (a repeat inserts nothing).
4. mark the code ``applied``.

A crash (or a lost store) between the steps leaves a code claimed but not applied; the sweep
(``finish_redemptions``, every 10 s in each relay) repeats steps 2 to 4 for such codes, and
the marker makes the repeat a no-op where the credit had already landed. A claim whose credit
cannot apply (the key would pass ``MAX_UNITS`` granted, or is gone) is released again, so the
code stays redeemable. The markers stay on the key (64 characters per code redeemed): removing
one would let a late repeat of step 2 credit the code twice.
"""
from __future__ import annotations

import datetime as dt
import logging

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from relay.codes import DISPLAY_PREFIX_LEN, MAX_COUNT, code_state, display_prefix, generate_code, hash_code
from relay.errors import CodeInvalid, CodeUsed, InvalidRequest
from relay.metering.bounds import MAX_UNITS
from relay.store.core import Document, _op
from relay.store.keys import MIN_PREFIX_LEN, KeysMixin

log = logging.getLogger("relay.store")

FINISH_AFTER = dt.timedelta(seconds=30)  # a claim older than this without its credit is finished by the sweep


class CodesMixin(KeysMixin):
    @_op("create_codes")
    async def create_codes(self, quota: int, count: int, note: str = "") -> list[str]:
        """``count`` new codes worth ``quota`` units each; the codes themselves are returned
        here only (the store keeps their hashes)."""
        if not 0 < quota <= MAX_UNITS:
            raise InvalidRequest(f"quota must be between 1 and {MAX_UNITS}", param="quota")
        if not 0 < count <= MAX_COUNT:
            raise InvalidRequest(f"count must be between 1 and {MAX_COUNT}", param="count")
        now = self.now()
        codes = [generate_code() for _ in range(count)]
        await self.codes.insert_many([
            {"_id": hash_code(c), "prefix": display_prefix(c), "quota": quota, "note": note, "status": "active",
             "created_at": now, "redeemed_by": None, "key_prefix": None, "redeemed_at": None, "applied": False}
            for c in codes])
        return codes

    @_op("list_codes")
    async def list_codes(self, limit: int = 1000) -> list[Document]:
        return await self.codes.find({}).sort("created_at", 1).to_list(length=limit)

    @_op("resolve_code")
    async def resolve_code(self, code_or_prefix: str) -> Document:
        """A code's document by the code itself or a unique prefix of it (6 to 10 characters,
        as keys are named)."""
        given = code_or_prefix
        if len(given) > DISPLAY_PREFIX_LEN:
            doc = await self.codes.find_one({"_id": hash_code(given)})
            if doc:
                return doc
            raise LookupError("no such code")
        if len(given) < MIN_PREFIX_LEN:
            raise InvalidRequest(f"give at least {MIN_PREFIX_LEN} characters of the code ({given!r} has "
                                 f"{len(given)}).")
        docs = await self.codes.find({"prefix": {"$gte": given, "$lt": given + "~"}}).to_list(length=2)
        if len(docs) > 1:
            raise InvalidRequest(f"ambiguous: more than one code starts with {given!r}; give more of it.")
        if docs:
            return docs[0]
        raise LookupError("no such code")

    @_op("disable_code")
    async def disable_code(self, code_id: str) -> Document:
        """Disable a code not yet redeemed (a redeemed one is a 400: its money moved already)."""
        doc = await self.codes.find_one_and_update({"_id": code_id, "redeemed_by": None},
                                                   {"$set": {"status": "disabled"}},
                                                   return_document=ReturnDocument.AFTER)
        if doc is not None:
            return doc
        doc = await self.codes.find_one({"_id": code_id})
        if doc is None:
            raise LookupError("no such code")
        raise InvalidRequest(f"code {doc['prefix']} was redeemed already; it cannot be disabled.")

    @_op("redeem")
    async def redeem(self, key_hash: str, key_prefix: str, code: str) -> tuple[Document, int]:
        """Credit ``code`` onto the key, once: (the key's document after, the units credited).

        CodeInvalid for an unknown or disabled code, CodeUsed for one redeemed already (by
        this key or another), InvalidRequest when the key cannot take that much more."""
        code_id = hash_code(code)
        room = await self.keys.find_one({"_id": key_hash}, {"granted": 1})
        if room is None:
            raise LookupError("no such key")
        claimed = await self.codes.find_one_and_update(
            {"_id": code_id, "status": "active", "redeemed_by": None, "quota": {"$lte": MAX_UNITS - room["granted"]}},
            {"$set": {"redeemed_by": key_hash, "key_prefix": key_prefix, "redeemed_at": self.now(),
                      "applied": False}},
            return_document=ReturnDocument.AFTER)
        if claimed is None:
            doc = await self.codes.find_one({"_id": code_id})
            state = code_state(doc) if doc is not None else "unknown"
            if state == "redeemed":
                raise CodeUsed("This top-up code has already been used" + (
                    " on this key: its balance includes it." if doc and doc["redeemed_by"] == key_hash else "."),
                    param="code")
            if doc is not None and state == "active":  # unclaimed, so its quota is what did not fit
                raise InvalidRequest(f"This key cannot take {doc['quota']} more units: a key may be granted at "
                                     f"most {MAX_UNITS} in all.", param="code")
            raise CodeInvalid("This top-up code is not valid: check it, or ask the seller.", param="code")
        return await self._apply_code(claimed), claimed["quota"]

    async def _apply_code(self, code: Document) -> Document:
        """Steps 2 to 4 of a redemption (see the module's docstring): repeatable at will."""
        code_id, key_hash, quota = code["_id"], code["redeemed_by"], code["quota"]
        doc = await self.keys.find_one_and_update(
            {"_id": key_hash, "redeemed": {"$ne": code_id}, "granted": {"$lte": MAX_UNITS - quota}},
            {"$inc": {"granted": quota, "balance": quota}, "$push": {"redeemed": code_id}},
            projection={"redeemed": 0}, return_document=ReturnDocument.AFTER)
        if doc is None:
            doc = await self.keys.find_one({"_id": key_hash, "redeemed": code_id}, {"redeemed": 0})
            if doc is None:  # not credited, and it cannot be (the key is gone, or would pass MAX_UNITS)
                await self.codes.update_one(
                    {"_id": code_id, "redeemed_by": key_hash, "applied": False},
                    {"$set": {"redeemed_by": None, "key_prefix": None, "redeemed_at": None}})
                raise InvalidRequest(f"This key cannot take {quota} more units: a key may be granted at most "
                                     f"{MAX_UNITS} in all.", param="code")
        try:
            await self.grants.insert_one({"_id": f"code-{code_id}", "key_hash": key_hash, "amount": quota,
                                          "kind": "code", "code_prefix": code["prefix"], "at": code["redeemed_at"]})
        except DuplicateKeyError:
            pass  # recorded by an earlier attempt
        await self.codes.update_one({"_id": code_id}, {"$set": {"applied": True}})
        return doc

    @_op("finish_redemptions", bounded=False)
    async def finish_redemptions(self, older_than: dt.timedelta = FINISH_AFTER) -> int:
        """Finish redemptions that stopped between their claim and their last step (a crash, a
        lost store); returns how many were finished. Claims younger than ``older_than`` are
        left to the request that made them (finishing them too would be harmless)."""
        stale = await self.codes.find({"applied": False, "redeemed_by": {"$ne": None},
                                       "redeemed_at": {"$lte": self.now() - older_than}}).to_list(length=None)
        finished = 0
        for code in stale:
            try:
                await self._apply_code(code)
                finished += 1
                log.warning("finished the redemption of code %s onto key %s", code["prefix"], code["key_prefix"])
            except InvalidRequest:
                log.error("the redemption of code %s onto key %s cannot apply (the key is gone or full); the "
                          "code is redeemable again", code["prefix"], code["key_prefix"])
        return finished
