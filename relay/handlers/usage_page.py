"""The key holder's page: balance, usage, recent requests and response speed.

The page is static (HTML, CSS, JS served by relay, no CDN, no inline script); its data comes
from ``/usage/api/summary``, authorized by the key itself as a bearer header, so the key
never travels in a URL and never lands in a log.
"""
from __future__ import annotations

import datetime as dt
import statistics
import time
from fractions import Fraction
from importlib import resources
from typing import Any

import tornado.web

from relay.config import Config
from relay.errors import InvalidApiKey
from relay.handlers.base import AuthenticatedHandler, RelayHandler
from relay.keys import available
from relay.metering.ledger import day_of, utc_now
from relay.metering.pricing import cost
from relay.metering.usage import Usage

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
STATIC = {"usage.js": "application/javascript; charset=utf-8", "usage.css": "text/css; charset=utf-8"}
TYPICAL_MESSAGE = Usage(prompt_tokens=500, completion_tokens=500)  # "one message", for the estimate
RECENT_COUNTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "image_tokens",
                 "audio_tokens", "images", "seconds", "characters")
PRICE_MODELS = ("gpt-3.5-turbo", "gpt-4")  # priced on the page, then the models of recent requests
PRICES_SHOWN = 6
SPEED_WINDOW = dt.timedelta(hours=1)
SPEED_CACHE_S = 10.0


def _web_file(name: str) -> bytes:
    return resources.files("relay").joinpath(f"web/{name}").read_bytes()


class _PageHandler(RelayHandler):
    """What the page and its static files share: the page's headers."""

    route = "usage"

    def set_default_headers(self) -> None:
        super().set_default_headers()
        for name, value in PAGE_HEADERS.items():
            self.set_header(name, value)


class UsagePageHandler(_PageHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish(_web_file("usage.html"))

    def post(self) -> None:
        # The form is handled by the page's script; without it a browser would post the key
        # here. Drop it and go back: never echo it, never log it.
        self.redirect("/usage", status=303)


class UsageRootHandler(UsagePageHandler):
    """``/`` serves the page on the configured usage host, and is a 404 elsewhere."""

    def get(self) -> None:
        usage_host = self.services.config.site.usage_host
        if not usage_host or self.request.host.lower() != usage_host:
            raise tornado.web.HTTPError(404)
        super().get()


class UsageStaticHandler(_PageHandler):
    def get(self, name: str) -> None:
        if name not in STATIC:
            raise tornado.web.HTTPError(404)
        self.set_header("Content-Type", STATIC[name])
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(_web_file(name))


class UsageSummaryHandler(AuthenticatedHandler):
    """Everything the page shows, for the key in the Authorization header only."""

    route = "usage"

    async def get(self) -> None:
        services = self.services
        store, config = services.store, services.config
        doc = await store.key_doc(self.key.key_hash)
        if doc is None:  # gone from the store since the key was authenticated (cached up to its TTL)
            raise InvalidApiKey("Incorrect API key provided: this key is not known to relay.")
        today = utc_now().date()
        first = today - dt.timedelta(days=29)
        counted = {d["day"]: d for d in await store.usage_days(self.key.key_hash, first.isoformat(), today.isoformat())}
        days = []
        for i in range(30):
            day = (first + dt.timedelta(days=i)).isoformat()
            d = counted.get(day, {})
            days.append({"day": day, "cost": d.get("cost", 0), "requests": d.get("requests", 0)})
        recent = [_recent(e) for e in await store.recent_ledger(self.key.key_hash, 20)]
        site = config.site
        left = available(doc)
        self.set_header("Cache-Control", "no-store")
        self.write_json({
            "prefix": doc["prefix"], "status": doc["status"], "granted": doc["granted"], "used": doc["used"],
            "available": left, "reserved": doc["reserved"], "balance": doc["balance"],
            "messages": {"gpt-3.5-turbo": _messages(config, "gpt-3.5-turbo", left),
                         "gpt-4": _messages(config, "gpt-4", left)},
            "prices": _prices(config, [*PRICE_MODELS, *(r["model"] for r in recent)]),
            "days": days, "today": day_of(utc_now()), "recent": recent, "speed": await self._speed_by_model(),
            "site": {"primary_host": site.primary_host, "backup_host": site.backup_host, "scheme": site.scheme,
                     "shop_url": site.shop_url},
        })

    async def _speed_by_model(self) -> list[dict[str, Any]]:
        """Relay's measured time to first byte per model over the last hour, every key's requests."""
        cached_at, rows = self.services.speed_cache
        if time.monotonic() - cached_at < SPEED_CACHE_S:
            return rows
        by_model: dict[str, list[float]] = {}
        for t in await self.services.store.recent_timings(utc_now() - SPEED_WINDOW):
            if t.get("stream") and t.get("ttfb_ms"):
                by_model.setdefault(t["model"], []).append(t["ttfb_ms"])
        rows = [{"model": m, "ttft_p50_ms": round(statistics.median(v), 1), "requests": len(v)}
                for m, v in sorted(by_model.items())]
        self.services.speed_cache = (time.monotonic(), rows)
        return rows


def _recent(e: dict[str, Any]) -> dict[str, Any]:
    """One ledger entry as the page shows it (entries from before a field existed read 0)."""
    return {"at": e["at"].replace(tzinfo=dt.UTC).isoformat(), "model": e.get("requested_model") or e["model"],
            "served_model": e["model"], "api": e.get("api", "chat"), "cost": e["cost"],
            "latency_ms": e["latency_ms"], "ttfb_ms": e["ttfb_ms"], "stream": e["stream"], "status": e["status"],
            **{field: e.get(field, 0) for field in RECENT_COUNTS}}


def _prices(config: Config, models: list[str]) -> list[dict[str, Any]]:
    """Units per 1,000 input and output tokens of these models (the first PRICES_SHOWN with a price)."""
    rows: list[dict[str, Any]] = []
    for model in dict.fromkeys(models):
        served = config.map_model(model)
        price = config.price_of(served)
        if price is not None and len(rows) < PRICES_SHOWN:
            rows.append({"model": model, "served_model": served, "input": _per_1k(price.input),
                         "output": _per_1k(price.output)})
    return rows


def _per_1k(per_token: Fraction) -> float:
    return round(float(per_token * 1000), 2)


def _messages(config: Config, model: str, balance: int) -> int | None:
    price = config.price_of(config.map_model(model))
    if price is None or balance <= 0:
        return None if price is None else 0
    return balance // max(cost(price, TYPICAL_MESSAGE), 1)
