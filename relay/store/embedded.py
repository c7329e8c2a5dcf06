"""The embedded store: a MongoDB-compatible server (SecantusDB) run and supervised as a child process.

One server per data directory, found by others through ``store.lock`` and ``store.json``.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TextIO

LOCK_FILE = "store.lock"
INFO_FILE = "store.json"
STORAGE_DIR = "db"  # the server's files, under the data directory
PR_SET_PDEATHSIG = 1

RESTART_FIRST_DELAY_S = 0.2  # doubling after each failed start, up to RESTART_MAX_DELAY_S
RESTART_MAX_DELAY_S = 5.0
MAX_FAILED_STARTS = 5  # in a row: then the server is given up on (see EmbeddedServer.on_give_up)
STABLE_AFTER_S = 10.0  # a server that dies sooner after answering counts as a failed start
RESTART_READY_S = 15.0  # how long a restarted server may take to answer
WAIT_FOR_SERVER_S = 10.0  # how long a held directory's server may stay silent (a restart) for others
# Test-only: a command (shell-split) run instead of secantusd-py, given the same arguments.
# The supervision tests use it to make restarts fail; it is not an operator setting.
TEST_COMMAND_ENV = "RELAY_EMBEDDED_CMD"

log = logging.getLogger("relay.store")


class StoreAlreadyRunning(RuntimeError):
    pass


class StoreUnreachable(RuntimeError):
    """The data directory is held by another process, but its server does not answer."""


class _StartFailed(Exception):
    pass


def _uri(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_bindable(port: int) -> bool:
    # SO_REUSEADDR as the server binds: the dead server's TIME_WAIT connections do not count.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# libc's prctl once resolved; False where there is none (not Linux/glibc).
_prctl: Callable[..., int] | Literal[False] | None = None


def _load_prctl() -> None:
    # Resolved in the parent: the child runs die_with_parent between fork and exec, where
    # a dlopen could deadlock on a loader lock another thread held at the fork.
    global _prctl
    if _prctl is None:
        try:
            _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
        except OSError:
            _prctl = False


def die_with_parent() -> None:
    # A relay killed with -9 must not leave the server holding the data directory.
    _load_prctl()
    if _prctl:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _server_command(port: int, storage: str) -> list[str]:
    override = os.environ.get(TEST_COMMAND_ENV)
    exe = shutil.which("secantusd-py")
    if override:
        base = shlex.split(override)
    else:
        base = [exe] if exe else [sys.executable, "-c", "import sys; from secantus.cli import main; sys.exit(main())"]
    return base + ["--host", "127.0.0.1", "--port", str(port), "--storage-path", storage,
                   "--sync-on-commit", "--log-level", "WARNING"]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _reap(proc: subprocess.Popen[bytes], block: bool = False) -> str | None:
    """How ``proc`` ended (reaping it), for the log; None while it runs."""
    if proc.returncode is not None:
        return _describe_exit(proc.returncode)
    try:
        pid, status = os.waitpid(proc.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        # With --workers, tornado's fork_processes loop reaps every child of the supervisor.
        return "exit status unknown (reaped by the --workers supervisor loop)"
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return _describe_exit(proc.returncode)


def _serves(pid: int, storage: str) -> bool:
    """Whether ``pid`` is a live SecantusDB server on ``storage`` (not a reused pid, not a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = fh.read().split(b"\0")
    except OSError:
        return False
    return any(b"secantus" in a for a in args) and storage.encode() in args


def _wait_gone(pid: int, storage: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _serves(pid, storage):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _read_info(data_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(data_dir, INFO_FILE)) as fh:
            info = json.load(fh)
        return info if isinstance(info.get("port"), int) else None
    except (OSError, ValueError, AttributeError):
        return None


def _lock_held(data_dir: str) -> bool:
    lock_path = os.path.join(data_dir, LOCK_FILE)
    if not os.path.exists(lock_path):
        return False
    with open(lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _answers(uri: str, timeout_ms: int = 300) -> bool:
    from pymongo import MongoClient
    client: MongoClient[dict[str, Any]]
    try:
        with MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms) as client:
            client.admin.command("ping")
        return True
    except Exception:
        return False


def holds_store(data_dir: str) -> bool:
    """Whether an embedded store ever ran on ``data_dir``: it has a server's files, or the
    ``store.lock`` / ``store.json`` a relay leaves there (a server may be running on it)."""
    if any(os.path.exists(os.path.join(data_dir, name)) for name in (LOCK_FILE, INFO_FILE)):
        return True
    try:
        return bool(os.listdir(os.path.join(data_dir, STORAGE_DIR)))
    except OSError:
        return False


def running_uri(data_dir: str) -> str | None:
    """The URI of the server another process runs on ``data_dir``, or None."""
    if not _lock_held(data_dir):
        return None
    info = _read_info(data_dir)
    return _uri(info["port"]) if info else None


def wait_for_running(data_dir: str, timeout: float = WAIT_FOR_SERVER_S) -> str | None:
    """The URI of the server another process runs on ``data_dir``, once it answers a ping.

    None when no process holds the directory (start one). Held but silent is a server being
    started or restarted: wait up to ``timeout``, then raise StoreUnreachable.
    """
    data_dir = os.path.abspath(data_dir)
    deadline = time.monotonic() + timeout
    while _lock_held(data_dir):
        info = _read_info(data_dir)
        if info and _answers(_uri(info["port"])):
            return _uri(info["port"])
        if time.monotonic() >= deadline:
            where = f"nothing answers on port {info['port']}" if info else f"it has no readable {INFO_FILE}"
            raise StoreUnreachable(
                f"the embedded store in {data_dir} is held by another process ({LOCK_FILE} is locked) but "
                f"{where} after {timeout:.0f} s; if relay is restarting it, try again; otherwise stop the "
                f"process holding {os.path.join(data_dir, LOCK_FILE)}")
        time.sleep(0.1)
    return None


class EmbeddedServer:
    """SecantusDB's server on one data directory, restarted on the same port when it dies.

    It runs through its command line, not imported: it is GPL-2.0, and in-process it would
    compete with the event loop for the interpreter. This process holds ``store.lock`` while
    the server is its own and keeps ``store.json`` (port, pid) current, so ``relay keys`` or
    a second relay reach it instead of opening the directory twice.

    A watcher thread waits on the child. A death outside ``stop()`` is logged and the server
    restarted on the same port, so every client (in this process, or a --workers child that
    got the URI) reconnects by itself; delays double from 0.2 s to 5 s. After
    MAX_FAILED_STARTS in a row ``status`` is "failed" and ``on_give_up`` runs (relay serve
    exits 1 there). ``status``: "stopped", "running", "restarting" or "failed";
    ``restarts``: how many times the server was brought back.
    """

    def __init__(self, data_dir: str, on_give_up: Callable[[], None] | None = None):
        self.data_dir = os.path.abspath(data_dir)
        self.on_give_up = on_give_up
        self.proc: subprocess.Popen[bytes] | None = None
        self.uri = ""
        self.port = 0
        self.status = "stopped"
        self.restarts = 0
        self._lock: TextIO | None = None
        self._mutex = threading.Lock()  # orders a restart's launch against stop()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._ready_at = 0.0

    @property
    def storage(self) -> str:
        return os.path.join(self.data_dir, STORAGE_DIR)

    @property
    def log_path(self) -> str:
        return os.path.join(self.data_dir, "store.log")

    def start(self, timeout: float = 30.0) -> str:
        os.makedirs(self.data_dir, exist_ok=True)
        self._take_lock()
        self._clear_stale_info()
        self.port = _free_port()
        self.uri = _uri(self.port)
        self._stopping.clear()
        try:
            proc = self._launch()
            self._wait_ready(proc, timeout)
        except _StartFailed as exc:
            self.stop()
            raise RuntimeError(str(exc)) from None
        self._ready_at = time.monotonic()
        self.status = "running"
        # Restarts are launched from this thread, and PR_SET_PDEATHSIG follows the thread that
        # forked: it must live as long as the server is supervised (it does, until stop()).
        self._watcher = threading.Thread(target=self._supervise, name="embedded-store-watcher", daemon=True)
        self._watcher.start()
        return self.uri

    def _take_lock(self) -> None:
        self._lock = open(os.path.join(self.data_dir, LOCK_FILE), "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise StoreAlreadyRunning(self.data_dir) from None

    def _clear_stale_info(self) -> None:
        """With the lock ours, a ``store.json`` is left from a relay that did not stop."""
        info = _read_info(self.data_dir)
        pid = info.get("pid") if info else None
        if isinstance(pid, int) and _serves(pid, self.storage):
            # An orphan (its relay died and the death signal did not reach it) holds the files.
            log.warning("stopping an orphaned embedded store (pid %d) on %s", pid, self.data_dir)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                if _wait_gone(pid, self.storage, 5.0):
                    break
        elif info is not None:
            log.info("removing a stale %s in %s (its server, pid %s, is gone)", INFO_FILE, self.data_dir, pid)
        try:
            os.unlink(os.path.join(self.data_dir, INFO_FILE))
        except OSError:
            pass

    def _launch(self) -> subprocess.Popen[bytes]:
        _load_prctl()
        with open(self.log_path, "ab") as out:
            self.proc = proc = subprocess.Popen(_server_command(self.port, self.storage),
                                                stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                                preexec_fn=die_with_parent, start_new_session=True)
        # Written whole, then renamed: a reader never sees half a file.
        path = os.path.join(self.data_dir, INFO_FILE)
        with open(path + ".tmp", "w") as fh:
            json.dump({"port": self.port, "pid": proc.pid}, fh)
        os.replace(path + ".tmp", path)
        return proc

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = _reap(proc)
            if ended is not None:
                raise _StartFailed(f"the embedded store exited ({ended}); see {self.log_path}")
            if _answers(self.uri):
                return
            time.sleep(0.1)
        _kill(proc)
        raise _StartFailed(f"the embedded store did not answer a ping within {timeout:.0f}s; see {self.log_path}")

    def _supervise(self) -> None:
        failed: int | None = 0  # failed starts in a row; None once stopping or given up
        while failed is not None:
            proc = self.proc
            if proc is None:  # stop() ran (it clears proc after setting _stopping)
                return
            how = _reap(proc, block=True)
            if self._stopping.is_set():
                return
            died_at = time.monotonic()
            up = died_at - self._ready_at
            failed = failed + 1 if up < STABLE_AFTER_S else 0
            self.status = "restarting"
            log.error("the embedded store (pid %d, port %d) died after %.0f s up: %s; restarting it",
                      proc.pid, self.port, up, how)
            failed = self._restart(failed, died_at)

    def _restart(self, failed: int, died_at: float) -> int | None:
        """Bring the server back on its port: the failed starts so far, or None (stopping, given up)."""
        while failed < MAX_FAILED_STARTS:
            if self._stopping.wait(min(RESTART_FIRST_DELAY_S * 2 ** failed, RESTART_MAX_DELAY_S)):
                return None
            try:
                proc = self._start_again()
            except _StartFailed as exc:
                if self._stopping.is_set():
                    return None
                failed += 1
                log.error("the embedded store did not restart (%d failed starts in a row, %d give up): %s",
                          failed, MAX_FAILED_STARTS, exc)
                continue
            self._ready_at = time.monotonic()
            self.restarts += 1
            self.status = "running"
            log.warning("the embedded store is back on port %d (pid %d), %.1f s after it died (restart #%d)",
                        self.port, proc.pid, self._ready_at - died_at, self.restarts)
            return failed
        self._give_up(failed)
        return None

    def _start_again(self) -> subprocess.Popen[bytes]:
        if not _port_bindable(self.port):
            raise _StartFailed(f"port {self.port} is taken by another process")
        with self._mutex:
            if self._stopping.is_set():
                raise _StartFailed("stopping")
            proc = self._launch()
        self._wait_ready(proc, RESTART_READY_S)
        return proc

    def _give_up(self, failed: int) -> None:
        self.status = "failed"
        _kill(self.proc)
        log.critical("the embedded store in %s failed to start %d times in a row; giving up on it "
                     "(see %s)", self.data_dir, failed, self.log_path)
        if self.on_give_up is not None:
            self.on_give_up()

    def stop(self) -> None:
        with self._mutex:
            self._stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                _kill(proc)
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(5)
        self.proc = None
        self.status = "stopped"
        if self._lock is not None:
            try:
                os.unlink(os.path.join(self.data_dir, INFO_FILE))
            except OSError:
                pass
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
