"""Keep secrets out of anything that leaves relay: masking for display, scrubbing of bodies."""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# OpenAI echoes a partly masked key in some errors ("Incorrect API key provided: sk-ab***yz").
_KEY_LIKE = re.compile(rb"\b(?:sk|ak)-[A-Za-z0-9_*.\-]{3,}")


def scrub(body: bytes, secrets: tuple[str, ...] = ()) -> bytes:
    """Remove every upstream or relay key, whole or partly masked, from an upstream's body."""
    for secret in secrets:
        if secret:
            body = body.replace(secret.encode(), b"[redacted]")
    return _KEY_LIKE.sub(b"[redacted]", body)


def mask_key(key: str) -> str:
    """``sk-...abcd``: enough for an operator to tell keys apart, too little to use."""
    return f"{key[:3]}...{key[-4:]}" if len(key) > 12 else "***"


_KEY_IN_PATH = re.compile(r"((?:ak|sk|rc)-[A-Za-z0-9_-]{7})[A-Za-z0-9_-]+")


def redact_path(path: str) -> str:
    """A URL path for a log line: a key or top-up code in it (admin routes take one) keeps only
    its prefix."""
    return _KEY_IN_PATH.sub(r"\1...", path) if "k-" in path or "rc-" in path else path


_KEY_IN_TEXT = re.compile(r"\b((?:ak|sk|rc)-[A-Za-z0-9_-]{7})[A-Za-z0-9_*.\-]+")


def redact_keys(text: str) -> str:
    """Free text for a log line (a client's model name): a key or code in it keeps only its prefix."""
    return _KEY_IN_TEXT.sub(r"\1...", text) if "k-" in text or "rc-" in text else text


def mask_userinfo(url: str) -> str:
    """A URL for display: any ``user:password@`` becomes ``***@``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
