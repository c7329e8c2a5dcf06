"""Top-up codes: generation, format check, hashing, the operator's view. Pure.

A code is ``rc-`` plus 32 URL-safe random characters (192 bits), sold once and redeemed once
onto a relay key. Like keys, codes are stored only as a SHA-256 hash (no dictionary to attack
at that entropy) and shown once, when created.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from typing import Any

PREFIX = "rc-"
CODE_RE = re.compile(r"rc-[A-Za-z0-9_-]{32}")
DISPLAY_PREFIX_LEN = 10  # "rc-" + 7 characters
MAX_COUNT = 1000         # codes (or keys) made by one create


def generate_code() -> str:
    return PREFIX + secrets.token_urlsafe(24)


def is_well_formed(code: str) -> bool:
    return CODE_RE.fullmatch(code) is not None


def hash_code(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def display_prefix(code: str) -> str:
    return code[:DISPLAY_PREFIX_LEN]


def code_state(doc: dict[str, Any]) -> str:
    """``active`` (can be redeemed), ``redeemed`` or ``disabled``."""
    if doc.get("redeemed_by"):
        return "redeemed"
    return "disabled" if doc.get("status") == "disabled" else "active"


def code_view(doc: dict[str, Any]) -> dict[str, Any]:
    """What an operator sees of a code: never the code or its hash, nor the redeeming key's."""
    return {"prefix": doc["prefix"], "status": code_state(doc), "quota": doc["quota"], "note": doc.get("note", ""),
            "created_at": _iso(doc.get("created_at")), "redeemed_at": _iso(doc.get("redeemed_at")),
            "redeemed_by": doc.get("key_prefix")}


def _iso(at: dt.datetime | None) -> str | None:
    return at.replace(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z") if at else None
