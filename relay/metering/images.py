"""Prompt tokens of an image part: OpenAI's tile or patch rule on the size in its header.

Only a data URL's first bytes are decoded; an http(s) URL is never fetched and, like an unreadable
image, counts the most an image can cost the model at that detail."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction
from math import ceil
from typing import Any

from relay.metering.b64 import Reader, data_url_payload, reader
from relay.metering.encodings import base_model

MAX_SIDE = 2048       # high detail first fits the image in 2048 x 2048 ...
SHORT_SIDE = 768      # ... then shrinks (never enlarges) it so the short side is at most 768 ...
TILE = 512            # ... and counts 512-px tiles, at most 2 x 4 of them.
MAX_TILES = 8
PATCH = 32            # patch models count 32-px patches, capped at 1536.
MAX_PATCHES = 1536
JPEG_MAX_SEGMENTS = 64


@dataclass(frozen=True)
class Tiles:
    base: int       # what detail "low" costs, and every image's fixed part
    per_tile: int


@dataclass(frozen=True)
class Patches:
    multiplier: Fraction  # tokens per patch


# Published per-model constants, longest name first so that gpt-4o-mini is not read as gpt-4o.
# Patch multipliers are the documented ones; users measure gpt-5-mini/nano lower (1.2/1.5), so
# these are upper bounds there. Unlisted models get gpt-4o's tiles, reported to be at least what
# o1, o3 and gpt-5 charge.
PROFILES: tuple[tuple[str, Tiles | Patches], ...] = tuple(sorted((
    ("gpt-4o-mini", Tiles(2833, 5667)),
    ("gpt-4.1-mini", Patches(Fraction("1.62"))),
    ("gpt-4.1-nano", Patches(Fraction("2.46"))),
    ("gpt-5-mini", Patches(Fraction("1.62"))),
    ("gpt-5-nano", Patches(Fraction("2.46"))),
    ("o4-mini", Patches(Fraction("1.72"))),
), key=lambda item: -len(item[0])))
DEFAULT_PROFILE = Tiles(85, 170)


def profile_for(model: str) -> Tiles | Patches:
    name = base_model(model) if isinstance(model, str) else ""
    for prefix, profile in PROFILES:
        if name.startswith(prefix):
            return profile
    return DEFAULT_PROFILE


def image_tokens(model: str, url: Any, detail: Any = "auto") -> int:
    """Tokens of one image given by URL (data: or http) at a detail of low, high or auto."""
    profile = profile_for(model)
    size = image_size(url) if isinstance(url, str) else None
    if isinstance(profile, Patches):
        # Whether "low" shrinks a patch model's image is not published: count it as high.
        patches = patch_count(*size) if size else MAX_PATCHES
        return ceil(patches * profile.multiplier)
    if detail == "low":
        return profile.base
    tiles = tile_count(*size) if size else MAX_TILES
    return profile.base + profile.per_tile * tiles


def tile_count(width: int, height: int) -> int:
    w, h = Fraction(width), Fraction(height)
    if max(w, h) > MAX_SIDE:
        scale = MAX_SIDE / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > SHORT_SIDE:
        scale = SHORT_SIDE / min(w, h)
        w, h = w * scale, h * scale
    return ceil(w / TILE) * ceil(h / TILE)


def patch_count(width: int, height: int) -> int:
    # Above the cap the image is shrunk to fit it; the cap itself is then the upper bound.
    return min(ceil(width / PATCH) * ceil(height / PATCH), MAX_PATCHES)


def image_size(url: str) -> tuple[int, int] | None:
    """(width, height) from a base64 data URL's header bytes, or None if it cannot be read."""
    payload = data_url_payload(url)
    if payload is None:
        return None
    size = size_from_header(reader(*payload))
    if size and 0 < size[0] <= 1 << 20 and 0 < size[1] <= 1 << 20:
        return size
    return None


def size_from_header(read: Reader) -> tuple[int, int] | None:
    head = read(0, 32)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return _unpack(">II", head, 16)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _unpack("<HH", head, 6)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_size(head)
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(read)
    return None


def _unpack(fmt: str, data: bytes, offset: int) -> tuple[int, int] | None:
    try:
        return struct.unpack_from(fmt, data, offset)
    except struct.error:
        return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        size = _unpack("<HH", head, 26)
        return (size[0] & 0x3FFF, size[1] & 0x3FFF) if size else None
    if chunk == b"VP8L" and head[20:21] == b"\x2f":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM


def _jpeg_size(read: Reader) -> tuple[int, int] | None:
    # Walk the segments by their lengths: EXIF thumbnails and ICC profiles before the frame
    # header can be tens of kilobytes, and are skipped without being decoded.
    offset = 2
    for _ in range(JPEG_MAX_SEGMENTS):
        head = read(offset, 9)
        if len(head) < 4 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in _NO_LENGTH:
            offset += 2
            continue
        if marker in _SOF:
            size = _unpack(">HH", head, 5)
            return (size[1], size[0]) if size else None
        offset += 2 + int.from_bytes(head[2:4], "big")
    return None
