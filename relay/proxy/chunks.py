"""A request body kept as the chunks it arrived in: read at any offset, or with one span
replaced, without ever joining it (an upload is held once, not twice). Pure."""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence


class Chunks:
    def __init__(self, parts: Sequence[bytes]) -> None:
        self.parts = tuple(p for p in parts if p)
        self.starts: list[int] = []
        size = 0
        for part in self.parts:
            self.starts.append(size)
            size += len(part)
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (short or b"" past the end): a ``metering.b64.Reader``."""
        if offset < 0 or length <= 0 or offset >= self.size:
            return b""
        i = bisect_right(self.starts, offset) - 1
        out: list[bytes] = []
        want, at = length, offset - self.starts[i]
        while want > 0 and i < len(self.parts):
            piece = self.parts[i][at:at + want]
            out.append(piece)
            want -= len(piece)
            i, at = i + 1, 0
        return b"".join(out)

    def splice(self, start: int, end: int, replacement: bytes) -> tuple[bytes, ...]:
        """The body with bytes [start, end) replaced: the untouched chunks are the same objects,
        only the two that hold the ends are cut (so a renamed model costs a few bytes, not a copy)."""
        if not 0 <= start <= end <= self.size:
            raise ValueError("span outside the body")
        before: list[bytes] = []
        after: list[bytes] = []
        for part, first in zip(self.parts, self.starts, strict=True):
            last = first + len(part)
            if last <= start:
                before.append(part)
            elif first >= end:
                after.append(part)
            else:
                if first < start:
                    before.append(part[:start - first])
                if last > end:
                    after.append(part[end - first:])
        return (*before, replacement, *after) if replacement else (*before, *after)
