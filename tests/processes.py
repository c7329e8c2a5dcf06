"""Relay and store as real processes, for the tests that cross process boundaries."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import unused_port


def db_uri(server_uri: str, db: str) -> str:
    """The embedded server's URI with a database name, so each test has its own."""
    base, _, query = server_uri.partition("/?")
    return f"{base}/{db}?{query}"


class RelayProcess:
    def __init__(self, config_text: str, workdir: Path, *store_args: str, env: dict | None = None):
        self.workdir = workdir
        self.config = workdir / f"upstreams-{id(self)}.yaml"
        self.config.write_text(config_text)
        self.store_args = list(store_args)
        self.env = {**os.environ, **(env or {})}
        self.port = unused_port()
        self.log_path = workdir / f"relay-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 40.0) -> RelayProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(self.config), "--port", str(self.port),
             *self.store_args], stdout=log, stderr=log, env=self.env, start_new_session=True)
        log.close()
        from tornado.httpclient import AsyncHTTPClient
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                await AsyncHTTPClient().fetch(self.url + "/healthz", request_timeout=1)
                return self
            except Exception:
                await asyncio.sleep(0.1)
        raise AssertionError(f"relay did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)  # only relay: its embedded store must follow it by itself
        for _ in range(300):
            if self.proc.poll() is not None:
                return
            await asyncio.sleep(0.05)
        os.killpg(self.proc.pid, signal.SIGKILL)


ROOT = Path(__file__).resolve().parent.parent


def relay_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``relay ARGS`` from this source tree, run from ``cwd`` (default: the tree's root)."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})}, cwd=cwd)
