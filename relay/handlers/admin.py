"""The admin API under /admin/: keys created, shown, topped up, disabled, enabled, their policy
changed (top-up codes: handlers/codes.py).

Authorized by ``Authorization: Bearer $RELAY_ADMIN_TOKEN`` (compared in constant time, wrong
ones throttled per address like bad relay keys); with no token configured the admin API is off.
"""
from __future__ import annotations

import hmac
from typing import Any

from relay.errors import AdminUnauthorized, InvalidRequest, RelayError
from relay.handlers.base import RelayHandler
from relay.keys import bearer_token, key_view
from relay.policy import FIELDS, policy_changes
from relay.redact import mask_key, mask_userinfo


class KeyNotFound(RelayError):
    status, type, code = 404, "invalid_request_error", "key_not_found"


class AdminHandler(RelayHandler):
    route = "admin"
    async def prepare(self) -> None:
        if self.request.method == "OPTIONS":
            return
        expected = self.services.admin_token
        if not expected:
            raise AdminUnauthorized("The admin API is disabled: set RELAY_ADMIN_TOKEN to enable it.",
                                    code="admin_disabled")
        given = bearer_token(self.request.headers.get("Authorization")) or ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            await self.refuse_guess(self.services.admin_throttle,
                                    "Too many wrong admin tokens from your address; slow down.")
            raise AdminUnauthorized("Missing or wrong admin token.")
        self.set_header("Cache-Control", "no-store")

    async def lookup(self, key_or_prefix: str) -> dict[str, Any]:
        try:
            return await self.services.store.resolve(key_or_prefix)
        except LookupError:
            raise KeyNotFound("No key matches that key or prefix.") from None

    def whole_number(self, body: dict[str, Any], name: str, minimum: int) -> int:
        value = body.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise InvalidRequest(f"'{name}' must be a whole number >= {minimum}.", param=name)
        return value


def note_of(body: dict[str, Any]) -> str:
    note = body.get("note", "")
    if not isinstance(note, str) or len(note) > 500:
        raise InvalidRequest("'note' must be a string of at most 500 characters.", param="note")
    return note


class KeysHandler(AdminHandler):
    async def post(self) -> None:
        body = self.json_body()
        quota = self.whole_number(body, "quota", 0)
        note = note_of(body)
        policy, _ = policy_changes(body)  # the policy fields given (null ones are simply unset)
        key, doc = await self.services.store.create_key(quota, note, policy=policy)
        self.write_json({"key": key, **key_view(doc)}, status=201)

    async def get(self) -> None:
        self.write_json({"keys": [key_view(d) for d in await self.services.store.list_keys()]})


class KeyHandler(AdminHandler):
    async def get(self, key_or_prefix: str) -> None:
        self.write_json(key_view(await self.lookup(key_or_prefix)))

    async def patch(self, key_or_prefix: str) -> None:
        """The key's policy: each field given is set, or cleared when null (relay/policy.py)."""
        body = self.json_body()
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise InvalidRequest(f"Unknown field '{unknown[0]}': a key's policy has {', '.join(FIELDS)}.",
                                 param=unknown[0])
        doc = await self.lookup(key_or_prefix)
        doc = await self.services.store.set_policy(doc["_id"], *policy_changes(body))
        self.services.auth.forget(doc["_id"])  # this process applies it at once; the others within 2 s
        self.write_json(key_view(doc))


class KeyActionHandler(AdminHandler):
    async def post(self, key_or_prefix: str, action: str) -> None:
        doc = await self.lookup(key_or_prefix)
        store = self.services.store
        if action == "topup":
            doc = await store.topup(doc["_id"], self.whole_number(self.json_body(), "quota", 1))
            self.services.quota.balance_changed(doc["_id"])
        else:
            doc = await store.set_status(doc["_id"], "disabled" if action == "disable" else "active")
        self.services.auth.forget(doc["_id"])
        self.write_json(key_view(doc))


class UpstreamsHandler(AdminHandler):
    """Every upstream and endpoint with its tier, weight, state, load, latency and errors."""

    def get(self) -> None:
        services = self.services
        router = services.router
        pool, now = router.pool, router.clock()
        upstreams = []
        for u in pool.config.upstreams:
            eps = [e for e in pool.endpoints if e.upstream is u]
            up_health = eps[0].upstream_health if eps else None
            endpoints = []
            for e in eps:
                st = e.state(pool.config, now)
                endpoints.append({
                    "key_id": e.key_id, "key": mask_key(e.key), "state": st.state,
                    "seconds_left": round(st.until - now, 1) if st.until > now else None,
                    "disabled_reason": e.health.disabled_reason, "in_flight": e.health.in_flight,
                    "latency_ms": round(e.health.latency_ewma_ms, 1) if e.health.latency_ewma_ms else None,
                    "requests": e.health.requests, "errors": e.health.errors,
                    "probe_failures": e.health.probe_failures})
            upstreams.append({
                "name": u.name, "base_url": mask_userinfo(u.base_url), "tier": u.priority, "weight": u.weight,
                "models": list(u.models) if u.models else "*",
                "apis": sorted(u.apis) if u.apis else "*",
                "ejected_seconds_left": round(up_health.ejected_until - now, 1)
                if up_health and up_health.ejected(now) else None,
                "times_ejected": up_health.times_ejected if up_health else 0, "endpoints": endpoints})
        reloader = services.reloader
        self.write_json({"upstreams": upstreams, "config": {
            "path": reloader.path, "last_reload_error": reloader.last_error,
            "last_reload_at": reloader.last_reload_at}})


class ReloadHandler(AdminHandler):
    def post(self) -> None:
        result = self.services.reloader.reload()
        if not result.ok:
            raise InvalidRequest(f"config not reloaded: {result.error}", code="invalid_config")
        self.write_json({"reloaded": result.changed})
