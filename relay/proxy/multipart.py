"""A streaming multipart/form-data parser: fed the body as it arrives, it keeps only the small
fields it is asked for and where every part lies in the body (files are never copied). Pure.

It is strict where an upstream could read a body differently (a repeated field, RFC 2231
``name*``, folded headers, an unknown transfer encoding): such a body is refused, so that the
model and sizes relay prices are the ones the upstream serves.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024   # one part's header block
MAX_PARTS = 256
MAX_PADDING = 64               # spaces and tabs allowed after a boundary line (RFC 2046 transport padding)

# RFC 2046: 1 to 70 characters of digits, letters and '()+_,-./:=? (a space, but not last).
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf";\s*({_TOKEN})\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^;\s\"]*)\s*")
_QUOTED_PAIR = re.compile(r"\\(.)")

PREAMBLE, AFTER_DELIMITER, HEADERS, BODY, EPILOGUE = range(5)


class MultipartError(ValueError):
    """The body is not multipart/form-data relay can read the same way an upstream would."""


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    start: int               # offset of its first content byte in the body
    end: int = -1            # one past its last (-1 while it arrives)
    value: bytes | None = None  # the content, for the fields the caller asked to keep

    @property
    def size(self) -> int:
        return self.end - self.start

    def text(self) -> str:
        try:
            return (self.value or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise MultipartError(f"the field {self.name!r} is not UTF-8 text") from None


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type."""
    kind, _, rest = (content_type or "").partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise MultipartError("the request body must be multipart/form-data")
    params = _params(";" + rest)
    boundary = params.get("boundary")
    if boundary is None or not _BOUNDARY.fullmatch(boundary):
        raise MultipartError("the multipart/form-data Content-Type has no valid boundary")
    return boundary.encode("ascii")


class MultipartParser:
    """``feed`` each chunk as it arrives, then ``close``: the parts, in order.

    Only an unfinished delimiter (at most the boundary's length) and an unfinished header block
    are held between chunks; kept fields are capped at ``keep_limit`` bytes each."""

    def __init__(self, boundary: bytes, keep: Collection[str] = (), keep_limit: int = 64 * 1024) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._keep, self._keep_limit = frozenset(keep), keep_limit
        # The body is read as if it began with CRLF, so that the first boundary line is a
        # delimiter like the others (it may come first, without a preamble before it).
        self._buf, self._i, self._pos = b"\r\n", 0, -2  # ``_pos``: the body offset of ``_buf[0]``
        self._state = PREAMBLE
        self._kept: list[bytes] = []
        self._kept_size = 0
        self.parts: list[Part] = []
        self.first_part_at = -1  # offset of the first part's header block

    @property
    def done(self) -> bool:
        return self._state == EPILOGUE

    def feed(self, chunk: bytes) -> None:
        if self._state == EPILOGUE or not chunk:
            return  # what follows the closing delimiter is ignored, as RFC 2046 says
        self._pos += self._i
        self._buf = self._buf[self._i:] + chunk
        self._i = 0
        while self._step():
            pass

    def close(self) -> list[Part]:
        if self._state != EPILOGUE:
            raise MultipartError("the multipart body ended before its closing boundary")
        return self.parts

    def _step(self) -> bool:
        """Consume what can be decided now; False when more bytes are needed (or the body ended)."""
        buf, i = self._buf, self._i
        if self._state in (PREAMBLE, BODY):
            found = buf.find(self._delimiter, i)
            stop = found if found >= 0 else max(len(buf) - len(self._delimiter) + 1, i)
            if self._state == BODY:
                self._content(buf, i, stop)
            if found < 0:
                self._i = stop
                return False
            if self._state == BODY:
                self._end_part(self._pos + found)
            self._i = found + len(self._delimiter)
            self._state = AFTER_DELIMITER
            return True
        if self._state == AFTER_DELIMITER:
            if len(buf) - i < 2:
                return False
            if buf[i:i + 2] == b"--":
                self._state, self._buf, self._i = EPILOGUE, b"", 0
                return False
            eol = buf.find(b"\r\n", i, i + MAX_PADDING + 2)
            if eol < 0:
                if len(buf) - i > MAX_PADDING + 1:
                    raise MultipartError("a multipart boundary line is malformed")
                return False
            if buf[i:eol].strip(b" \t"):
                raise MultipartError("a multipart boundary line is malformed")
            self._i = eol + 2
            self._state = HEADERS
            if self.first_part_at < 0:
                self.first_part_at = self._pos + self._i
            return True
        if self._state == HEADERS:
            if buf[i:i + 2] == b"\r\n":
                raise MultipartError("a multipart part has no headers")
            end = buf.find(b"\r\n\r\n", i)
            if end < 0:
                if len(buf) - i > MAX_HEADER_BYTES:
                    raise MultipartError("a multipart part's headers are too long")
                return False
            self._start_part(buf[i:end], self._pos + end + 4)
            self._i = end + 4
            self._state = BODY
            return True
        return False

    def _start_part(self, block: bytes, start: int) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise MultipartError(f"the multipart body has more than {MAX_PARTS} parts")
        headers = _headers(block)
        disposition = headers.get("content-disposition")
        kind, _, rest = (disposition or "").partition(";")
        if kind.strip().lower() != "form-data":
            raise MultipartError("every multipart part needs Content-Disposition: form-data")
        params = _params(";" + rest)
        if "name*" in params:
            raise MultipartError("multipart field names in RFC 2231 form (name*=) are not supported")
        name = params.get("name")
        if not name:
            raise MultipartError("a multipart part has no field name")
        encoding = headers.get("content-transfer-encoding", "binary").strip().lower()
        if encoding not in ("binary", "8bit", "7bit"):
            raise MultipartError(f"the multipart field {name!r} has an unsupported transfer encoding")
        if name in self._keep and any(p.name == name for p in self.parts):
            raise MultipartError(f"the field {name!r} appears more than once")
        self.parts.append(Part(name, params.get("filename"), headers.get("content-type"), start))
        self._kept, self._kept_size = [], 0

    def _content(self, buf: bytes, start: int, stop: int) -> None:
        part = self.parts[-1]
        if part.name not in self._keep or stop <= start:
            return
        self._kept_size += stop - start
        if self._kept_size > self._keep_limit:
            raise MultipartError(f"the field {part.name!r} is longer than {self._keep_limit} bytes")
        self._kept.append(buf[start:stop])

    def _end_part(self, end: int) -> None:
        part = self.parts[-1]
        part.end = end
        if part.name in self._keep:
            part.value = b"".join(self._kept)
        self._kept = []


def _headers(block: bytes) -> dict[str, str]:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise MultipartError("a multipart part's headers are not UTF-8") from None
    headers: dict[str, str] = {}
    for line in text.split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise MultipartError("a multipart part has a malformed header line")
        key = name.lower()
        if key in headers:
            raise MultipartError(f"a multipart part repeats its {name} header")
        headers[key] = value.strip()
    return headers


def _params(text: str) -> dict[str, str]:
    """``; key=value; key="quoted"`` into a dict (keys lower-cased); a repeated key is an error."""
    params: dict[str, str] = {}
    at = 0
    text = text.rstrip()
    while text[at:].strip(" \t;"):
        m = _PARAM.match(text, at)
        if not m:
            raise MultipartError("a multipart header has malformed parameters")
        key, value = m.group(1).lower(), m.group(2)
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
        if key in params:
            raise MultipartError(f"a multipart header repeats its {key} parameter")
        params[key] = value
        at = m.end()
    return params
