"""Live pool editing: watch upstreams.yaml, validate the new file whole, swap the pool atomically.

A change is noticed by polling the file's identity (inode, size, mtime) every second, so an
editor's or a config tool's replace-by-rename is seen too; SIGHUP and ``POST /admin/reload``
reload at once. An invalid file changes nothing: the reason (file, key path) is logged and
kept for ``/admin/upstreams`` and the metrics, and the old pool keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from relay.balancer.pool import Pool
from relay.config import Config, ConfigError, load_config
from relay.metering.encodings import encodings_for_models, get_encoding, loaded_encodings
from relay.proxy.router import Router

log = logging.getLogger("relay.reload")
POLL_EVERY_S = 1.0


@dataclass
class ReloadResult:
    ok: bool
    changed: bool
    error: str | None = None


class Reloader:
    def __init__(self, path: str | None, router: Router, env: Mapping[str, str] = os.environ,
                 on_result: Callable[[ReloadResult], None] | None = None):
        self.path = path
        self.router = router
        self.env = env
        self.on_result = on_result
        self.last_error: str | None = None
        self.last_reload_at: float | None = None
        self._identity = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def reload(self) -> ReloadResult:
        if not self.path:
            return self._done(ReloadResult(False, False, "relay runs on the embedded example: no file to reload"))
        self._identity = self._stat()
        try:
            config = load_config(self.path, self.env)
        except ConfigError as exc:
            log.error("config reload rejected, keeping the current pool: %s", exc)
            return self._done(ReloadResult(False, False, str(exc)))
        if config == self.router.pool.config:
            return self._done(ReloadResult(True, False))
        self.router.swap(Pool.from_config(config, previous=self.router.pool))
        load_tables(config)
        self.last_reload_at = time.time()
        log.warning("config reloaded from %s: %d upstream(s), %d endpoint(s)", self.path, len(config.upstreams),
                    sum(len(u.keys) for u in config.upstreams))
        return self._done(ReloadResult(True, True))

    def _done(self, result: ReloadResult) -> ReloadResult:
        self.last_error = result.error
        if self.on_result:
            self.on_result(result)
        return result

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_EVERY_S)
            if self.path and self._stat() != self._identity and self._stat() is not None:
                self.reload()

    @property
    def config(self) -> Config:
        return self.router.pool.config


def load_tables(config: Config) -> None:
    """The token tables the file's models need and this process has not loaded, each in a
    thread: the loop serves meanwhile (a request that needs one first waits for it)."""
    missing = encodings_for_models(config.named_models(), config.quota.encodings) - loaded_encodings()
    if not missing:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # reloaded outside the loop (a test): load here
        for name in sorted(missing):
            get_encoding(name)
        return
    for name in sorted(missing):
        loop.run_in_executor(None, get_encoding, name).add_done_callback(_loaded)


def _loaded(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("a token table failed to load (%s); requests that need it will retry",
                  type(future.exception()).__name__)
