"""JSON from outside relay, parsed with a bound on its nesting depth. Pure.

Python's parser and encoder and relay's token counting recurse once per level, so a body
nested 100k deep would end in RecursionError (a 500); this refuses it as bad input instead.
"""
from __future__ import annotations

from typing import Any

from relay import fast_json

# Real OpenAI bodies are shallow: the envelope of a tool's JSON schema is ~6 levels and each
# nested object schema adds 2 ("properties", then the object), so even 20 levels of schema
# stay under 50. 64 keeps a margin above that and stays far below the ~1000 frames that
# parsing, re-serialising (json.dumps) and token counting of `input` share.
MAX_DEPTH = 64

_CONTAINERS = frozenset({dict, list})  # all json.loads makes that nests


class TooDeep(ValueError):
    """Nested deeper than allowed (also when the parser itself ran out of stack)."""


def loads(data: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    try:
        value = fast_json.loads(data)
    except RecursionError:
        raise TooDeep(f"nested deeper than {max_depth} levels") from None
    if deeper_than(value, max_depth):
        raise TooDeep(f"nested deeper than {max_depth} levels")
    return value


def deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels (a scalar is level 0).

    Walked level by level, without recursion. A long array of scalars (token ids, numbers)
    is passed over with one C-level look at its items' types."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(limit):
        if not level:
            return False
        inner: list[Any] = []
        add = inner.append
        for container in level:
            if type(container) is dict:
                items = container.values()
            elif len(container) > 8 and _CONTAINERS.isdisjoint(map(type, container)):
                continue
            else:
                items = container
            for item in items:
                if type(item) in _CONTAINERS:
                    add(item)
        level = inner
    return bool(level)
