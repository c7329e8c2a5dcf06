"""What every part of the config parser shares: the error that names a key path, and checks. Pure."""
from __future__ import annotations

from collections.abc import Set
from typing import Any

ANY_MODEL = "*"  # a model name that stands for every model (in pricing: the default price)

class ConfigError(ValueError):
    """A config problem at a key path, e.g. ``upstreams[1].base_url: not an http(s) URL``."""

    def __init__(self, path: str, reason: str, source: str | None = None):
        self.path, self.reason, self.source = path, reason, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {reason}" if path else f"{where}{reason}")


def mapping(value: Any, path: str, allowed: Set[str], required: Set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, f"must be a mapping, got {kind(value)}")
    for key in value:
        if key not in allowed:
            raise ConfigError(join(path, str(key)), f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for key in sorted(required):
        if key not in value:
            raise ConfigError(join(path, key), "required")
    return value


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(type(v), type(v).__name__)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
