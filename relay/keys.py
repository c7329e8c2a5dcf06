"""Relay keys: generation, format check, hashing. Pure.

A key is ``ak-`` plus 40 URL-safe random characters (240 bits). With that much entropy a
single SHA-256 is a sound storage hash (no dictionary to attack); a slow KDF would only
put milliseconds on every request.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from typing import Any

PREFIX = "ak-"
KEY_RE = re.compile(r"ak-[A-Za-z0-9_-]{32,128}")
DISPLAY_PREFIX_LEN = 10  # "ak-" + 7 characters


def generate_key() -> str:
    return PREFIX + secrets.token_urlsafe(30)


def is_well_formed(key: str) -> bool:
    return KEY_RE.fullmatch(key) is not None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LEN]


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def available(doc: dict[str, Any]) -> int:
    """What a key holder has left: granted minus used, never below 0.

    ``balance`` is what no process holds; right after a request it is short by the slice a
    relay process leased (``reserved``, handed back when idle), and after an overdraw it is
    negative. Neither is the holder's money: requests in flight count once they settle. The
    billing endpoints report the same two numbers (granted, used)."""
    return max(int(doc["granted"]) - int(doc["used"]), 0)


def key_view(doc: dict[str, Any]) -> dict[str, Any]:
    """What an operator sees of a key: never its hash or the key itself."""
    return {"prefix": doc["prefix"], "note": doc.get("note", ""), "status": doc["status"],
            "granted": doc["granted"], "used": doc["used"], "available": available(doc),
            "reserved": doc["reserved"], "balance": doc["balance"], "created_at": _iso(doc.get("created_at"))}


def reserved_parts(doc: dict[str, Any]) -> tuple[int, int]:
    """``reserved`` split: (held as lease slices by relay processes, held by requests in flight)."""
    leases = doc.get("leases") or {}
    sliced = sum(int(lease.get("amount", 0)) for lease in leases.values() if isinstance(lease, dict))
    return sliced, int(doc["reserved"]) - sliced


def _iso(at: dt.datetime | None) -> str | None:
    return at.replace(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z") if at else None

