"""A relay key's policy: which models, until when, how fast, from where. Pure.

The policy travels with the key's document (``policy``: only the fields that are set), so
every relay reads it with the key itself (behind the 2 s key cache) and applies a change
within that time. An absent field means no restriction: every model, no expiry, no rate
limit, any address.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Any, TypeAlias

from relay.errors import InvalidRequest

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

FIELDS = ("models", "expires_at", "rpm", "tpm", "max_concurrency", "allow_cidrs")
LIMITS = {"rpm": 10**9, "tpm": 10**12, "max_concurrency": 10**6}  # the largest value each may take
MAX_PATTERNS = 64
MAX_PATTERN_CHARS = 128


@dataclass(frozen=True)
class Policy:
    models: tuple[str, ...] = ()              # allowed model patterns (fnmatch); empty: every model
    expires_at: dt.datetime | None = None     # naive UTC; None: never
    rpm: int | None = None                    # requests per minute
    tpm: int | None = None                    # tokens per minute (prompt + completion)
    max_concurrency: int | None = None        # requests in flight at once
    allow_cidrs: tuple[Network, ...] = ()     # client addresses; empty: any
    expires_ts: float | None = field(default=None, compare=False)  # expires_at, as a Unix time
    models_re: re.Pattern[str] | None = field(default=None, compare=False)  # the patterns, as one regex

    def __post_init__(self) -> None:
        if self.expires_at is not None:
            object.__setattr__(self, "expires_ts", self.expires_at.replace(tzinfo=dt.UTC).timestamp())
        if self.models:  # fnmatch's patterns (case-sensitive), matched in one go
            object.__setattr__(self, "models_re", re.compile("|".join(translate(p) for p in self.models)))

    @property
    def limited(self) -> bool:
        """Whether a rate limit applies (rpm, tpm or max_concurrency)."""
        return self.rpm is not None or self.tpm is not None or self.max_concurrency is not None

    def allows_model(self, model: str) -> bool:
        return self.models_re is None or self.models_re.match(model) is not None

    def expired(self, now: float) -> bool:
        """Whether the key has expired at ``now`` (a Unix time, ``time.time()``)."""
        return self.expires_ts is not None and now >= self.expires_ts

    def allows_address(self, address: str) -> bool:
        if not self.allow_cidrs:
            return True
        ip = _address(address)
        return ip is not None and any(ip in net for net in self.allow_cidrs)


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's address, parsed once (the same clients come back); an IPv4-mapped IPv6
    address (a dual-stack socket's view of an IPv4 client) as the IPv4 one."""
    try:
        ip = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def policy_of(doc: Mapping[str, Any] | None) -> Policy | None:
    """The policy as a key's document stores it (``doc["policy"]``); None when nothing is set."""
    if not doc:
        return None
    policy = Policy(models=tuple(doc.get("models") or ()), expires_at=doc.get("expires_at"), rpm=doc.get("rpm"),
                    tpm=doc.get("tpm"), max_concurrency=doc.get("max_concurrency"),
                    allow_cidrs=tuple(ipaddress.ip_network(c, strict=False) for c in doc.get("allow_cidrs") or ()))
    return None if policy == Policy() else policy


def policy_view(doc: Mapping[str, Any] | None) -> dict[str, Any]:
    """The policy for an operator (and the JSON views): only the fields that are set."""
    view: dict[str, Any] = {}
    for name in FIELDS:
        value = (doc or {}).get(name)
        if value is None:
            continue
        if isinstance(value, dt.datetime):
            value = value.replace(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z")
        view[name] = value
    return view


def policy_changes(body: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The policy fields in ``body`` (an admin request, or the command line's flags), checked:
    (fields to set, fields to clear). A field given as null is cleared (no restriction). Raises
    InvalidRequest naming the field at fault."""
    to_set: dict[str, Any] = {}
    to_clear: list[str] = []
    for name in FIELDS:
        if name not in body:
            continue
        value = body[name]
        if value is None:
            to_clear.append(name)
        else:
            to_set[name] = _checked(name, value)
    return to_set, to_clear


def _checked(name: str, value: Any) -> Any:
    if name in LIMITS:
        most = LIMITS[name]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
            raise InvalidRequest(f"'{name}' must be a whole number from 1 to {most}, or null for no limit.",
                                 param=name)
        return value
    if name == "expires_at":
        return parse_time(value)
    if name == "models":
        return _strings(name, value, lambda s: 0 < len(s) <= MAX_PATTERN_CHARS and s.strip() == s,
                        f"model patterns ('gpt-4o*') of 1 to {MAX_PATTERN_CHARS} characters")
    return [str(n) for n in _networks(value)]


def _strings(name: str, value: Any, ok: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > MAX_PATTERNS or \
            not all(isinstance(v, str) and ok(v) for v in value):
        raise InvalidRequest(f"'{name}' must be a list of 1 to {MAX_PATTERNS} {what}, or null for no restriction.",
                             param=name)
    return list(dict.fromkeys(value))


def _networks(value: Any) -> list[Network]:
    strings = _strings("allow_cidrs", value, lambda s: 0 < len(s) <= 64, "addresses or CIDR ranges ('10.0.0.0/8')")
    try:
        return list(dict.fromkeys(ipaddress.ip_network(s.strip(), strict=False) for s in strings))
    except ValueError as exc:
        raise InvalidRequest(f"'allow_cidrs' holds something that is not an address or range: {exc}",
                             param="allow_cidrs") from None


def parse_time(value: Any) -> dt.datetime:
    """An ISO 8601 date (midnight UTC) or date and time (UTC unless it names an offset), as
    naive UTC."""
    if not isinstance(value, str) or len(value) > 40:
        raise InvalidRequest("'expires_at' must be an ISO 8601 date or time ('2026-12-31', "
                             "'2026-12-31T18:00:00+08:00'), or null for no expiry.", param="expires_at")
    text = value.strip()
    try:
        at = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"'expires_at' is not an ISO 8601 date or time: {value!r}.",
                             param="expires_at") from None
    if at.tzinfo is not None:
        at = at.astimezone(dt.UTC).replace(tzinfo=None)
    if not dt.datetime(2000, 1, 1) <= at <= dt.datetime(9999, 1, 1):
        raise InvalidRequest("'expires_at' must be between the years 2000 and 9999.", param="expires_at")
    return at.replace(microsecond=(at.microsecond // 1000) * 1000)  # what BSON keeps: milliseconds


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    """``relay keys create`` and ``relay keys update``: one flag per policy field."""
    parser.add_argument("--models", metavar="PATTERNS", help="allowed models, comma-separated patterns "
                        "('gpt-4o*,gpt-3.5-turbo'); 'none': every model (the default)")
    parser.add_argument("--expires-at", metavar="WHEN", help="ISO 8601 date or time (UTC unless it says); "
                        "'none': never (the default)")
    parser.add_argument("--rpm", metavar="N", help="requests per minute; 'none': no limit")
    parser.add_argument("--tpm", metavar="N", help="tokens per minute (prompt + completion); 'none': no limit")
    parser.add_argument("--max-concurrency", metavar="N", help="requests in flight at once; 'none': no limit")
    parser.add_argument("--allow-cidrs", metavar="CIDRS", help="client addresses allowed, comma-separated "
                        "('203.0.113.0/24,2001:db8::/32'); 'none': any")


def cli_policy(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's policy flags (strings; ``none`` clears one) as ``policy_changes`` takes them."""
    body: dict[str, Any] = {}
    for name in FIELDS:
        raw = getattr(args, name, None)
        if raw is None:
            continue
        text = raw.strip()
        if text.lower() == "none":
            body[name] = None
        elif name in LIMITS:
            try:
                body[name] = int(text)
            except ValueError:
                raise InvalidRequest(f"--{name.replace('_', '-')} takes a whole number or 'none'.",
                                     param=name) from None
        elif name in ("models", "allow_cidrs"):
            body[name] = [part.strip() for part in text.split(",") if part.strip()]
        else:
            body[name] = text
    return body
