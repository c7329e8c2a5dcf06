"""Process supervision: worker shutdown, the exit watchdog, and what a process does when it
cannot go on (its embedded store gone for good)."""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.store.connect import StoreLocation

log = logging.getLogger("relay")


def exit_without_store() -> None:
    """The embedded store cannot be brought back (called from its watcher thread).

    Exit 1 at once, as a crash would, so that systemd restarts relay with a fresh store: a
    graceful drain could write nothing. Workers follow their supervisor (PR_SET_PDEATHSIG);
    the journal and the sweeper cover what was in flight."""
    log.critical("relay exits with code 1: its embedded store is gone and could not be restarted")
    logging.shutdown()
    os._exit(1)


def exit_watchdog(after_s: float) -> None:
    """A stop signal always ends the process: if the graceful shutdown (drain, final store
    writes, asyncio's own clean-up of tasks) has not finished within ``after_s``, exit hard.
    What was not written is what a crash leaves: the journal and the sweeper cover it."""
    def fire() -> None:
        log.error("shutdown did not finish within %.0f s; exiting now", after_s)
        logging.shutdown()
        os._exit(1)
    timer = threading.Timer(after_s, fire)
    timer.daemon = True
    timer.start()


def freeze_start_up_objects(encodings: Iterable[str]) -> None:
    """Keep the collector off what lives as long as the process.

    A full collection walks every tracked object: modules, the driver, the app, ~60k of them,
    10 ms on this machine, a stall in whichever request is in flight (it was relay's p99 at
    concurrency 1). Frozen, they are never walked again; collections see only what requests
    allocate. The tables of ``encodings`` load first (a first request would otherwise wait
    ~0.3 s for o200k's), so that they are among them."""
    from relay.metering.encodings import get_encoding
    for name in encodings:
        get_encoding(name)
    gc.collect()
    gc.freeze()
    release_free_memory()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system: loading the tokenizers' tables leaves
    their temporary Python copies freed but held by malloc (7 MB of RSS on this machine)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim, or nothing that can


def stop_workers(location: StoreLocation, timeout_s: float) -> None:
    """SIGTERM every worker (each drains gracefully) and wait for them, not for the store."""
    store_pid = location.embedded.proc.pid if location.embedded and location.embedded.proc else None
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as fh:
            workers = [int(p) for p in fh.read().split() if int(p) != store_pid]
    except OSError:
        workers = []
    for pid in workers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    for pid in workers:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break
            time.sleep(0.05)

