"""Run relay with its event loop's callbacks timed; used by bench/loop_bursts.py, never by relay.

    python bench/loop_tracer.py OUT_PATH MIN_MS relay-arguments...

relay runs on asyncio's own loop instead of uvloop's (whose callbacks cannot be wrapped), with
``asyncio.events.Handle._run`` timed: every callback that takes at least MIN_MS is recorded
with its start and the name of what ran (a task's coroutine, or the callback's own name), and
every proxied request's own time (its duration minus its wait for upstreams, as the
``relay_overhead_seconds`` histogram has it) with its start and duration. SIGUSR1 writes both to OUT_PATH
(replacing it) and starts the records afresh.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from asyncio import events
from typing import Any

CALLBACKS: list[tuple[float, float, str]] = []  # (start, seconds, name)
REQUESTS: list[tuple[float, float, float]] = []  # (start, own seconds, total seconds)


def name_of(handle: events.Handle) -> str:
    callback = handle._callback  # type: ignore[attr-defined]
    owner = getattr(callback, "__self__", None)
    if owner is not None and hasattr(owner, "get_coro"):  # a task's step or wake-up
        coro = owner.get_coro()
        return getattr(coro, "__qualname__", type(coro).__name__)
    return getattr(callback, "__qualname__", type(callback).__name__)


def install(out_path: str, min_seconds: float) -> None:
    run = events.Handle._run
    clock = time.perf_counter

    def timed(handle: events.Handle) -> None:
        started = clock()
        run(handle)
        took = clock() - started
        if took >= min_seconds:
            CALLBACKS.append((started, took, name_of(handle)))

    events.Handle._run = timed  # type: ignore[method-assign]

    from relay.observability import recorder  # before relay.app reads recorder.on_request_end
    ended = recorder.on_request_end

    def on_request_end(handler: Any) -> None:
        ended(handler)
        wait = getattr(handler, "upstream_wait", None)
        if wait is not None:
            total = clock() - handler.started
            REQUESTS.append((handler.started, total - wait, total))

    recorder.on_request_end = on_request_end  # type: ignore[assignment]

    def dump(*_: object) -> None:
        with open(out_path + ".tmp", "w") as fh:
            for start, took, name in CALLBACKS:
                fh.write(f"C {start:.6f} {took:.6f} {name}\n")
            for start, own, total in REQUESTS:
                fh.write(f"R {start:.6f} {own:.6f} {total:.6f}\n")
        os.replace(out_path + ".tmp", out_path)
        CALLBACKS.clear()
        REQUESTS.clear()

    signal.signal(signal.SIGUSR1, dump)

    import uvloop
    uvloop.new_event_loop = asyncio.new_event_loop  # type: ignore[assignment]


if __name__ == "__main__":
    install(sys.argv[1], float(sys.argv[2]) / 1000)
    from relay.cli import main
    sys.exit(main(sys.argv[3:]))
