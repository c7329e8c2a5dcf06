"""Bytes at any offset of a base64 payload, decoding only the characters that hold them.

Media headers are read this way: a 20 MB image costs a few hundred characters, not a decode."""
from __future__ import annotations

import binascii
from collections.abc import Callable

Reader = Callable[[int, int], bytes]  # (offset, length) -> up to length bytes; short or b"" past the end


def data_url_payload(url: str) -> tuple[str, int] | None:
    """(text, start) of the base64 part of "data:<mime>;base64,<payload>", None for anything else.

    The payload is not sliced out: a copy of a 20 MB string would cost more than everything else."""
    if not url.startswith("data:"):
        return None
    comma = url.find(",", 5, 512)  # the header is short; never scan a huge payload for it
    if comma < 0 or not url[5:comma].endswith(";base64"):
        return None
    start = comma + 1
    head = url[start:start + 200]
    if "\n" in head or "\r" in head or " " in head:
        return "".join(url[start:].split()), 0  # MIME-wrapped lines shift every offset; rare, so copy
    return url, start


def decoded_size(text: str, start: int = 0) -> int:
    padding = 2 if text.endswith("==") else 1 if text.endswith("=") else 0
    return max((len(text) - start) * 3 // 4 - padding, 0)


def reader(text: str, start: int = 0) -> Reader:
    def read(offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0:
            return b""
        first = offset // 3 * 4
        end = -(-(offset + length) // 3) * 4
        chunk = text[start + first:start + end]
        chunk += "=" * (-len(chunk) % 4)  # an unpadded tail
        try:
            raw = binascii.a2b_base64(chunk)
        except ValueError:  # binascii.Error, or a non-ASCII character
            return b""
        skip = offset - first // 4 * 3
        return raw[skip:skip + length]
    return read
