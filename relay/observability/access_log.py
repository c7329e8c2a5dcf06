"""One access line per request: ids, key prefix, model, upstream, status, latency, flag.

Never message content, never a full key. The flag says why a request failed, as Envoy's
response flags do: no_endpoint, upstream_timeout, upstream_5xx, quota_exhausted,
client_disconnected, ...
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import logging
import re
import time
from typing import Any, Protocol

from relay.errors import RelayError
from relay.redact import redact_keys, redact_path

access_log = logging.getLogger("relay.access")


class Flag(enum.StrEnum):
    """Why a request did not end as asked (the ones set by name; errors add their own)."""

    NONE = "-"
    BODY_TOO_LARGE = "body_too_large"
    UPSTREAM_4XX = "upstream_4xx"
    CLIENT_DISCONNECTED = "client_disconnected"
    UPSTREAM_STREAM_BROKEN = "upstream_stream_broken"
    UPSTREAM_STREAM_TRUNCATED = "upstream_stream_truncated"
    UPSTREAM_EVENT_TOO_LARGE = "upstream_event_too_large"
    NO_ENDPOINT = "no_endpoint"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    QUOTA_EXHAUSTED = "quota_exhausted"
    BAD_KEY = "bad_key"
    KEY_DISABLED = "key_disabled"
    STORE_UNAVAILABLE = "store_unavailable"


_FLAG_BY_CODE = {
    "no_available_endpoint": Flag.NO_ENDPOINT,
    "upstream_timeout": Flag.UPSTREAM_TIMEOUT,
    "insufficient_quota": Flag.QUOTA_EXHAUSTED,
    "invalid_api_key": Flag.BAD_KEY,
    "key_disabled": Flag.KEY_DISABLED,
    "store_unavailable": Flag.STORE_UNAVAILABLE,
}


def flag_for(err: RelayError) -> str:
    outcome = getattr(err, "outcome", None)
    if outcome and outcome != "error":
        return f"upstream_{outcome}"
    return _FLAG_BY_CODE.get(err.code or "", err.code or err.type)


# Bounds on the fields a client controls: enough to recognise a value, too little to flood a log.
MODEL_CHARS, PATH_CHARS, METHOD_CHARS, ADDRESS_CHARS = 64, 256, 16, 64

# Printable ASCII but space and backslash: fields stay space-separated and escapes unambiguous.
_UNSAFE = re.compile(r"[^\x21-\x5b\x5d-\x7e]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(value: str, limit: int) -> str:
    """A client's string as one field of one log line: control characters, spaces and
    non-ASCII escaped (a newline cannot forge a line), at most ``limit`` characters plus
    ``...(+N)`` when N characters were cut."""
    if len(value) <= limit and not _UNSAFE.search(value):
        return value
    out: list[str] = []
    used = 0
    for i, ch in enumerate(value):
        piece = _escape(ch) if _UNSAFE.match(ch) else ch
        if used + len(piece) > limit:
            return "".join(out) + f"...(+{len(value) - i})"
        out.append(piece)
        used += len(piece)
    return "".join(out)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class Request(Protocol):
    @property
    def method(self) -> str | None: ...

    @property
    def path(self) -> str: ...

    @property
    def remote_ip(self) -> str | None: ...


class Logged(Protocol):
    """What an access line is made of: a request handler, or one turn of a WebSocket."""

    @property
    def request(self) -> Request: ...

    def get_status(self) -> int: ...


def log_request(handler: Logged) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    status = handler.get_status()
    latency_ms = (time.perf_counter() - getattr(handler, "started", time.perf_counter())) * 1000
    method = printable(handler.request.method or "-", METHOD_CHARS)
    path = printable(redact_path(handler.request.path), PATH_CHARS)
    address = printable(getattr(handler, "client_ip", handler.request.remote_ip) or "-", ADDRESS_CHARS)
    model = printable(redact_keys(getattr(handler, "model", "-")), MODEL_CHARS)
    request_id = getattr(handler, "request_id", "-")
    line = (f"{request_id} {method} {path} {address} key={getattr(handler, 'key_prefix', '-')} model={model} "
            f"upstream={getattr(handler, 'upstream_name', '-')} status={status:d} "
            f"latency_ms={latency_ms:.1f} flag={getattr(handler, 'flag', '-')}")
    if not DIRECT.write(line):
        access_log.info("%s", line)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"  # relay's (relay/cli.py)

# Access lines are written in batches, as nginx's ``access_log ... buffer= flush=`` does: a line
# waits at most FLUSH_S (and a batch holds at most FLUSH_LINES), so that a request costs no
# write of its own; a process killed with SIGKILL loses at most that much of its access log.
FLUSH_S = 0.05
FLUSH_LINES = 256


class DirectLine:
    """The access line written straight to the stream of the one handler ``relay serve`` sets up,
    byte for byte what ``logging`` would write there.

    Through ``logging`` the line cost a tenth of relay's CPU per proxied chat (a ``LogRecord``,
    its dict, ``formatTime`` with ``strftime`` and the handler chain; bench/proxy_compare.py with
    py-spy). Whenever logging is set up otherwise (another handler, a filter, a formatter, a
    level on the way: tests' ``caplog``, an embedding application), ``write`` says no and the
    line goes through ``logging``."""

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""
        self._pending: list[str] = []
        self._to: logging.StreamHandler[Any] | None = None
        self._flush_due: asyncio.TimerHandle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        atexit.register(self.flush)

    def _handler(self) -> logging.StreamHandler[Any] | None:
        root = logging.getLogger()
        if access_log.handlers or access_log.filters or not access_log.propagate or len(root.handlers) != 1:
            return None
        parent = access_log.parent
        while parent is not None and parent is not root:
            if parent.handlers or parent.filters or not parent.propagate:
                return None
            parent = parent.parent
        handler = root.handlers[0]
        if (type(handler) is not logging.StreamHandler or handler.filters or root.filters
                or handler.level > logging.INFO or handler.formatter is None
                or type(handler.formatter) is not logging.Formatter
                or handler.formatter._fmt != LOG_FORMAT or handler.formatter.datefmt is not None):
            return None
        return handler

    def write(self, message: str) -> bool:
        handler = self._handler()
        if handler is None:
            return False
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        text = f"{self._stamp},{int((now - second) * 1000):03d} INFO relay.access {message}\n"
        if handler is not self._to:
            self.flush()
            self._to = handler
        self._pending.append(text)
        if len(self._pending) >= FLUSH_LINES:
            self.flush()
        elif self._flush_due is None or self._flush_loop is None or self._flush_loop.is_closed():
            # (A loop that closed with a flush due never ran it: the lines go now, or with this loop.)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: nothing would flush later
                self.flush()
            else:
                self._flush_due, self._flush_loop = loop.call_later(FLUSH_S, self.flush), loop
        return True

    def flush(self) -> None:
        """Write the lines waiting, in one write (at most ``FLUSH_S`` after the first, and at exit)."""
        if self._flush_due is not None:
            self._flush_due.cancel()
            self._flush_due = None
        handler, lines = self._to, self._pending
        if handler is None or not lines:
            return
        self._pending = []
        with handler.lock or contextlib.nullcontext():
            try:
                handler.stream.write("".join(lines))
                handler.flush()
            except Exception:
                handler.handleError(access_log.makeRecord(access_log.name, logging.INFO, "", 0,
                                                          lines[0].rstrip("\n"), (), None))


DIRECT = DirectLine()
