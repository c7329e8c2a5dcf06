"""Bytes at any offset of a base64 payload, decoding only the characters that hold them.

Media headers are read this way: a 20 MB image costs a few hundred characters, not a decode."""
from __future__ import annotations

import binascii
from typing import Callable

Reader = Callable[[int, int], bytes]  # (offset, length) -> up to length bytes; short or b"" past the end


def data_url_payload(url: str) -> str | None:
    """The base64 part of "data:<mime>;base64,<payload>", or None for anything else."""
    if not url.startswith("data:"):
        return None
    comma = url.find(",", 5, 512)  # the header is short; never scan a huge payload for it
    if comma < 0 or not url[5:comma].endswith(";base64"):
        return None
    payload = url[comma + 1:]
    if "\n" in payload[:200] or "\r" in payload[:200] or " " in payload[:200]:
        payload = "".join(payload.split())  # MIME-wrapped lines shift every offset; rare, so copy
    return payload


def decoded_size(payload: str) -> int:
    padding = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0
    return max(len(payload) * 3 // 4 - padding, 0)


def reader(payload: str) -> Reader:
    def read(offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0:
            return b""
        first = offset // 3 * 4
        end = -(-(offset + length) // 3) * 4
        chunk = payload[first:end]
        chunk += "=" * (-len(chunk) % 4)  # an unpadded tail
        try:
            raw = binascii.a2b_base64(chunk)
        except ValueError:  # binascii.Error, or a non-ASCII character
            return b""
        skip = offset - first // 4 * 3
        return raw[skip:skip + length]
    return read


def bytes_reader(data: bytes) -> Reader:
    return lambda offset, length: data[offset:offset + length] if offset >= 0 and length > 0 else b""
