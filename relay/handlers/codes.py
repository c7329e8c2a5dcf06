"""Top-up codes over HTTP: redeemed by a key holder (``POST /v1/redeem``, ``/redeem``; the
usage page's top-up box), created, listed and disabled by the operator (``/admin/codes``)."""
from __future__ import annotations

from typing import Any

from relay.codes import MAX_COUNT, code_view, is_well_formed
from relay.errors import CodeInvalid, CodeUsed, InvalidApiKey, InvalidRequest, RelayError
from relay.handlers.admin import AdminHandler, note_of
from relay.handlers.base import AuthenticatedHandler
from relay.keys import key_view
from relay.observability import recorder


class CodeNotFound(RelayError):
    status, type, code = 404, "invalid_request_error", "code_not_found"


class RedeemHandler(AuthenticatedHandler):
    """``{"code": "rc-..."}`` with the key as bearer: the code's quota is granted to the key, once."""

    route = "redeem"

    async def post(self) -> None:
        code = self.json_body().get("code")
        if not isinstance(code, str):
            raise InvalidRequest("'code' must be a string: the top-up code, 'rc-...'.", param="code")
        code = code.strip()
        services = self.services
        try:
            if not is_well_formed(code):
                raise CodeInvalid("This is not a top-up code: they look like 'rc-' followed by 32 characters.",
                                  param="code")
            doc, amount = await services.store.redeem(self.key.key_hash, self.key.prefix, code)
        except LookupError:  # gone from the store since it was authenticated (cached up to its TTL)
            raise InvalidApiKey("Incorrect API key provided: this key is not known to relay.") from None
        except (CodeInvalid, CodeUsed):
            await self.refuse_guess(services.code_throttle, "Too many wrong top-up codes from your address; "
                                                            "slow down and check the code.")
            raise
        services.quota.balance_changed(self.key.key_hash)
        recorder.on_code_redeemed()
        self.set_header("Cache-Control", "no-store")
        self.write_json({"object": "redemption", "prefix": doc["prefix"], "quota": amount,
                         "granted": doc["granted"], "balance": doc["balance"]})


class AdminCodesHandler(AdminHandler):
    async def post(self) -> None:
        body = self.json_body()
        quota = self.whole_number(body, "quota", 1)
        count = body.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
            raise InvalidRequest(f"'count' must be a whole number from 1 to {MAX_COUNT}.", param="count")
        note = note_of(body)
        new_keys = body.get("new_keys", False)
        if not isinstance(new_keys, bool):
            raise InvalidRequest("'new_keys' must be true or false.", param="new_keys")
        store = self.services.store
        if new_keys:  # the shop sells keys: funded keys instead of codes
            keys = [await store.create_key(quota, note) for _ in range(count)]
            self.write_json({"keys": [{"key": key, **key_view(doc)} for key, doc in keys]}, status=201)
            return
        self.write_json({"codes": await store.create_codes(quota, count, note), "quota": quota, "note": note},
                        status=201)

    async def get(self) -> None:
        self.write_json({"codes": [code_view(d) for d in await self.services.store.list_codes()]})


class AdminCodeHandler(AdminHandler):
    async def lookup_code(self, code_or_prefix: str) -> dict[str, Any]:
        try:
            return await self.services.store.resolve_code(code_or_prefix)
        except LookupError:
            raise CodeNotFound("No code matches that code or prefix.") from None

    async def get(self, code_or_prefix: str) -> None:
        self.write_json(code_view(await self.lookup_code(code_or_prefix)))

    async def post(self, code_or_prefix: str, action: str) -> None:  # .../disable
        doc = await self.lookup_code(code_or_prefix)
        self.write_json(code_view(await self.services.store.disable_code(doc["_id"])))
