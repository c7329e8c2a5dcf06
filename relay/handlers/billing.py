"""OpenAI's billing endpoints, as ChatGPT-Next-Web and similar clients read them.

Amounts are quota units (one unit = one gpt-3.5-turbo input token): ``hard_limit_usd`` is
the units granted; ``total_usage`` is hundredths of a unit, because OpenAI reports cents
and those clients divide by 100 before showing "used X of Y".
"""
from __future__ import annotations

import datetime as dt

from relay.errors import InvalidRequest
from relay.handlers.base import AuthenticatedHandler

MAX_RANGE_DAYS = 100


class SubscriptionHandler(AuthenticatedHandler):
    route = "billing"
    async def get(self) -> None:
        doc = await self.services.store.key_doc(self.key.key_hash)
        granted = doc["granted"] if doc else 0
        self.set_header("Cache-Control", "no-store")
        self.write_json({
            "object": "billing_subscription", "has_payment_method": True,
            "soft_limit_usd": granted, "hard_limit_usd": granted, "system_hard_limit_usd": granted,
            "access_until": 0, "plan": {"title": "relay prepaid", "id": "relay-prepaid"},
        })


def _date(value: str | None, name: str) -> dt.date:
    if not value:
        raise InvalidRequest(f"Missing query parameter '{name}' (YYYY-MM-DD).", param=name)
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a date as YYYY-MM-DD.", param=name) from None


class UsageHandler(AuthenticatedHandler):
    route = "billing"
    async def get(self) -> None:
        start = _date(self.get_query_argument("start_date", None), "start_date")
        end = _date(self.get_query_argument("end_date", None), "end_date")  # exclusive, as OpenAI's
        if end <= start:
            raise InvalidRequest("'end_date' must be after 'start_date'.", param="end_date")
        if (end - start).days > MAX_RANGE_DAYS:
            raise InvalidRequest(f"The date range may span at most {MAX_RANGE_DAYS} days.", param="end_date")
        days = await self.services.store.usage_days(self.key.key_hash, start.isoformat(),
                                                    (end - dt.timedelta(days=1)).isoformat())
        daily = [{"timestamp": dt.datetime.fromisoformat(d["day"]).replace(tzinfo=dt.UTC).timestamp(),
                  "line_items": [{"name": "relay", "cost": d["cost"] * 100}]} for d in days]
        self.set_header("Cache-Control", "no-store")
        self.write_json({"object": "list", "total_usage": sum(d["cost"] for d in days) * 100,
                         "daily_costs": daily})
