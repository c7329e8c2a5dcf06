"""How one attempt or probe at an upstream ended, judged in one place. Pure.

The router and the health checker both classify with these; health acts on the outcome.
"""
from __future__ import annotations

import enum
import re
from datetime import UTC
from email.utils import parsedate_to_datetime

from relay import bounded_json


class Outcome(enum.StrEnum):
    OK = "ok"
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    SERVER_ERROR = "5xx"
    RATE_LIMITED = "429"
    AUTH = "auth"                  # 401/403, invalid_api_key, account_deactivated
    NO_CREDIT = "quota"            # the upstream key's own insufficient_quota
    CLIENT_ERROR = "client_error"  # the request's fault: says nothing about the upstream


OK, CONNECT_ERROR, TIMEOUT, SERVER_ERROR = Outcome.OK, Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.SERVER_ERROR
RATE_LIMITED, AUTH, NO_CREDIT = Outcome.RATE_LIMITED, Outcome.AUTH, Outcome.NO_CREDIT
CLIENT_ERROR = Outcome.CLIENT_ERROR

OUTLIER_OUTCOMES = frozenset({CONNECT_ERROR, TIMEOUT, SERVER_ERROR})  # the upstream's fault
KEY_OUTCOMES = frozenset({RATE_LIMITED, AUTH, NO_CREDIT})             # one key's fault
RETRYABLE_OUTCOMES = OUTLIER_OUTCOMES | KEY_OUTCOMES

_KEY_DISABLING_CODES = {"invalid_api_key": AUTH, "account_deactivated": AUTH, "insufficient_quota": NO_CREDIT}

# A day: longer than any cooldown relay applies (health caps it at max_cooldown_s), and
# small enough that every later sum with a clock stays an ordinary float.
MAX_RETRY_AFTER_S = 86_400.0
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?")  # RFC 9110 says digits; some send "1.5"


def classify_status(status: int, error_code: str | None = None) -> Outcome:
    """An upstream HTTP status (and its OpenAI error code, if any) as an outcome."""
    if error_code in _KEY_DISABLING_CODES:
        return _KEY_DISABLING_CODES[error_code]
    if status < 400:
        return OK
    if status in (401, 403):
        return AUTH
    if status == 429:
        return RATE_LIMITED
    if status >= 500:
        return SERVER_ERROR
    return CLIENT_ERROR


def classify_failure(outcome: str) -> Outcome:
    """A transport failure's outcome: connect errors and timeouts as such, anything else 5xx-like."""
    return Outcome(outcome) if outcome in OUTLIER_OUTCOMES else SERVER_ERROR


def classify_probe(status: int, body: bytes) -> Outcome:
    """A health probe (``GET /models``): a client error there means the endpoint does not work."""
    outcome = classify_status(status, error_code_of(body) if status >= 400 else None)
    return SERVER_ERROR if outcome == CLIENT_ERROR else outcome


def error_code_of(body: bytes) -> str | None:
    try:
        err = bounded_json.loads(body).get("error")  # an upstream's body: as hostile as a client's
        code = err.get("code") if isinstance(err, dict) else None
        return code if isinstance(code, str) else None
    except (ValueError, AttributeError):
        return None


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """An upstream's ``Retry-After`` as seconds from ``now`` (wall clock), capped; None when
    absent or unusable ("inf", "nan", "-5", "1e309", garbage), so the default cooldown applies.

    Both forms of RFC 9110: delta-seconds, or an HTTP-date (one in the past means now)."""
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds: float | None = float(value)  # digits only: never negative or nan; a huge one is inf, capped below
    else:
        seconds = _seconds_until_date(value, now)
    return None if seconds is None else min(seconds, MAX_RETRY_AFTER_S)


def _seconds_until_date(value: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC without a claim about local time
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
