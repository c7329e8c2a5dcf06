"""The embedded store: a MongoDB-compatible server (SecantusDB) as a child process.

For a single machine. It runs through its command line, not imported: it is GPL-2.0, and
in-process it would compete with the event loop for the interpreter. One server per data
directory: the process that starts it holds ``store.lock`` and writes ``store.json`` with
its port, so ``relay keys`` (or a second relay) reaches the running server instead of
opening the directory twice.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

LOCK_FILE = "store.lock"
INFO_FILE = "store.json"
PR_SET_PDEATHSIG = 1


class StoreAlreadyRunning(RuntimeError):
    pass


def _uri(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # A relay killed with -9 must not leave the server holding the data directory.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _server_command(port: int, storage: str) -> list[str]:
    exe = shutil.which("secantusd-py")
    base = [exe] if exe else [sys.executable, "-c", "import sys; from secantus.cli import main; sys.exit(main())"]
    return base + ["--host", "127.0.0.1", "--port", str(port), "--storage-path", storage,
                   "--sync-on-commit", "--log-level", "WARNING"]


def running_uri(data_dir: str) -> str | None:
    """The URI of the server another process runs on ``data_dir``, or None."""
    lock_path = os.path.join(data_dir, LOCK_FILE)
    if not os.path.exists(lock_path):
        return None
    with open(lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: a server runs
        else:
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None
    try:
        with open(os.path.join(data_dir, INFO_FILE)) as fh:
            return _uri(json.load(fh)["port"])
    except (OSError, ValueError, KeyError):
        return None


class EmbeddedServer:
    def __init__(self, data_dir: str):
        self.data_dir = os.path.abspath(data_dir)
        self.proc: subprocess.Popen | None = None
        self._lock = None
        self.uri = ""

    def start(self, timeout: float = 30.0) -> str:
        os.makedirs(self.data_dir, exist_ok=True)
        self._lock = open(os.path.join(self.data_dir, LOCK_FILE), "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise StoreAlreadyRunning(self.data_dir) from None
        self._kill_orphan()
        port = _free_port()
        log_path = os.path.join(self.data_dir, "store.log")
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(_server_command(port, os.path.join(self.data_dir, "db")),
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent, start_new_session=True)
        with open(os.path.join(self.data_dir, INFO_FILE), "w") as fh:
            json.dump({"port": port, "pid": self.proc.pid}, fh)
        self.uri = _uri(port)
        self._wait_ready(port, timeout, log_path)
        return self.uri

    def _kill_orphan(self) -> None:
        """A server left behind by a relay that could not stop it still holds the files."""
        try:
            with open(os.path.join(self.data_dir, INFO_FILE)) as fh:
                pid = json.load(fh)["pid"]
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"secantus" not in fh.read():
                    return
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.05)
        except (OSError, ValueError, KeyError):
            pass

    def _wait_ready(self, port: int, timeout: float, log_path: str) -> None:
        from pymongo import MongoClient
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the embedded store exited (code {self.proc.returncode}); see {log_path}")
            try:
                with MongoClient(self.uri, serverSelectionTimeoutMS=300) as client:
                    client.admin.command("ping")
                return
            except Exception:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the embedded store did not answer a ping within {timeout:.0f}s; see {log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._lock is not None:
            try:
                os.unlink(os.path.join(self.data_dir, INFO_FILE))
            except OSError:
                pass
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
