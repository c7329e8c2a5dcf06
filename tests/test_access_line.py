"""The access line written straight to the stream is what logging would have written there."""
import asyncio
import contextlib
import io
import logging
import re
import time
from collections.abc import Iterator
from types import SimpleNamespace

from relay.observability.access_log import DIRECT, LOG_FORMAT, log_request

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


class Handler(SimpleNamespace):
    def get_status(self) -> int:
        return self.status


def served() -> Handler:
    return Handler(status=200, started=time.perf_counter(), request_id="r-1", key_prefix="ak-abcd",
                   model="gpt-4o\nforged", upstream_name="main", flag="-", client_ip="10.0.0.1",
                   request=SimpleNamespace(method="POST", path="/v1/chat/completions", remote_ip="127.0.0.1"))


def logged_as_relay_serve(extra_filter: bool = False) -> tuple[str, str, bool]:
    """(what was written, what logging writes for the same message, whether the line went
    straight to the stream) with relay's setup."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    direct, through_logging = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(direct)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    if extra_filter:
        handler.addFilter(lambda record: True)
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        straight = DIRECT._handler() is handler
        log_request(served())
        message = direct.getvalue().split(" relay.access ", 1)[1].rstrip("\n")
        reference = logging.StreamHandler(through_logging)
        reference.setFormatter(logging.Formatter(LOG_FORMAT))
        reference.handle(logging.getLogger("relay.access").makeRecord("relay.access", logging.INFO, "", 0,
                                                                      message, (), None))
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    return direct.getvalue(), through_logging.getvalue(), straight


def test_the_direct_line_is_byte_for_byte_logging_s_but_for_the_moment():
    direct, reference, straight = logged_as_relay_serve()
    assert straight
    assert DIRECT._handler() is None, "under pytest the root logger has more handlers: the line goes via logging"
    d, r = STAMP.match(direct), STAMP.match(reference)
    assert d and r, (direct, reference)
    assert direct[d.end():] == reference[r.end():]
    assert direct[d.end():].startswith("INFO relay.access r-1 POST /v1/chat/completions 10.0.0.1 key=ak-abcd "
                                       "model=gpt-4o\\nforged upstream=main status=200 latency_ms=")
    assert direct.endswith(" flag=-\n") and direct.count("\n") == 1
    moment = time.mktime(time.strptime(d.group(1), "%Y-%m-%d %H:%M:%S")) + int(d.group(2)) / 1000
    assert abs(moment - time.time()) < 2


def test_any_other_logging_setup_gets_the_line_through_logging(caplog):
    caplog.set_level("INFO", logger="relay.access")
    direct, _, straight = logged_as_relay_serve(extra_filter=True)  # a filter on the handler: logging decides
    assert not straight
    assert direct.startswith(time.strftime("%Y-")) and " INFO relay.access r-1 POST " in direct
    log_request(served())  # pytest's own handlers: the line reaches caplog
    assert [r.getMessage().split()[0] for r in caplog.records if r.name == "relay.access"][-1] == "r-1"


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@contextlib.contextmanager
def logging_as_relay_serve_into(stream: io.StringIO) -> Iterator[None]:
    """The root logger set up as ``relay serve`` sets it, writing to ``stream``; restored after,
    with any access lines still waiting written first."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        DIRECT.flush()
        root.handlers[:] = saved
        root.setLevel(level)


async def test_inside_the_loop_lines_are_written_in_one_batch_soon_after_and_at_exit():
    from relay.observability import access_log as al
    stream = CountingStream()
    with logging_as_relay_serve_into(stream):
        for _ in range(3):
            log_request(served())
        assert stream.writes == 0, "nothing written while the batch is young"
        await asyncio.sleep(al.FLUSH_S * 3)
        assert stream.writes == 1 and stream.getvalue().count(" relay.access r-1 POST ") == 3
        for _ in range(al.FLUSH_LINES):
            log_request(served())
        assert stream.writes == 2, "a full batch is written at once"
        log_request(served())
        DIRECT.flush()  # what exit does (atexit), before the timer
        assert stream.writes == 3 and stream.getvalue().count("\n") == 3 + al.FLUSH_LINES + 1
        assert all(STAMP.match(line) for line in stream.getvalue().splitlines())


def test_lines_left_by_a_loop_that_closed_go_out_with_the_next_loop():
    from relay.observability import access_log as al
    stream = CountingStream()

    async def one_line(wait: float) -> None:
        log_request(served())
        await asyncio.sleep(wait)

    with logging_as_relay_serve_into(stream):
        asyncio.run(one_line(0))  # the loop closes with the line's flush still due
        assert stream.writes == 0
        asyncio.run(one_line(al.FLUSH_S * 3))
        assert stream.writes == 1 and stream.getvalue().count(" relay.access r-1 POST ") == 2
