"""The admin API under /admin/: keys created, shown, topped up, disabled, enabled.

Authorized by ``Authorization: Bearer $RELAY_ADMIN_TOKEN`` (compared in constant time);
with no token configured the admin API is off.
"""
from __future__ import annotations

import hmac

from relay.errors import AdminUnauthorized, InvalidRequest, RelayError
from relay.handlers.base import RelayHandler
from relay.keys import bearer_token
from relay.store.mongo import key_view


class KeyNotFound(RelayError):
    status, type, code = 404, "invalid_request_error", "key_not_found"


class AdminHandler(RelayHandler):
    def prepare(self) -> None:
        if self.request.method == "OPTIONS":
            return
        expected = self.services.admin_token
        if not expected:
            raise AdminUnauthorized("The admin API is disabled: set RELAY_ADMIN_TOKEN to enable it.",
                                    code="admin_disabled")
        given = bearer_token(self.request.headers.get("Authorization")) or ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise AdminUnauthorized("Missing or wrong admin token.")
        self.set_header("Cache-Control", "no-store")

    async def lookup(self, key_or_prefix: str) -> dict:
        try:
            return await self.services.store.resolve(key_or_prefix)
        except LookupError:
            raise KeyNotFound("No key matches that key or prefix.") from None

    def whole_number(self, body: dict, name: str, minimum: int) -> int:
        value = body.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise InvalidRequest(f"'{name}' must be a whole number >= {minimum}.", param=name)
        return value


class KeysHandler(AdminHandler):
    async def post(self) -> None:
        body = self.json_body()
        quota = self.whole_number(body, "quota", 0)
        note = body.get("note", "")
        if not isinstance(note, str) or len(note) > 500:
            raise InvalidRequest("'note' must be a string of at most 500 characters.", param="note")
        key, doc = await self.services.store.create_key(quota, note)
        self.write_json({"key": key, **key_view(doc)}, status=201)

    async def get(self) -> None:
        self.write_json({"keys": [key_view(d) for d in await self.services.store.list_keys()]})


class KeyHandler(AdminHandler):
    async def get(self, key_or_prefix: str) -> None:
        self.write_json(key_view(await self.lookup(key_or_prefix)))


class KeyActionHandler(AdminHandler):
    async def post(self, key_or_prefix: str, action: str) -> None:
        doc = await self.lookup(key_or_prefix)
        store = self.services.store
        if action == "topup":
            doc = await store.topup(doc["_id"], self.whole_number(self.json_body(), "quota", 1))
        else:
            doc = await store.set_status(doc["_id"], "disabled" if action == "disable" else "active")
        self.services.auth.forget(doc["_id"])
        self.write_json(key_view(doc))
