"""JSON from outside relay parsed by orjson wherever it gives exactly what ``json.loads`` gives,
else by ``json.loads``. Pure.

orjson parses a chat stream's event in a third of the time (1.4 against 4.3 µs), and a stream
has dozens of events. It refuses some texts ``json.loads`` accepts (NaN and Infinity, numbers
beyond a double, lone surrogates, a byte order mark, surrogates encoded in UTF-8): those go to
``json.loads``, which accepts or refuses them as before. Its one silent difference is an
integer beyond 64 bits, which it makes a float (a token count an upstream inflated would no
longer be an integer): a text with 19 digits in a row goes to ``json.loads`` whole.
"""
from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_DIGITS_B = re.compile(rb"\d{19}")
_LONG_DIGITS_S = re.compile(r"\d{19}")


def loads(data: bytes | str) -> Any:
    """``json.loads(data)``: the same value, or the same error."""
    long_digits = _LONG_DIGITS_B if isinstance(data, bytes) else _LONG_DIGITS_S
    if long_digits.search(data) is None:  # type: ignore[arg-type]  # the pattern matches data's type
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)
