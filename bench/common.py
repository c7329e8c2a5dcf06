"""Shared bench plumbing: child processes, readiness waits, a small async load generator."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], env: dict | None = None, cpu: str | None = None,
          log_path: str | None = None, cwd: str | None = None) -> subprocess.Popen:
    """``log_path``: where the child's stderr (relay's log, access lines included) goes; a pipe
    nobody reads would block the child once it fills, so without a path it is discarded."""
    cmd = (["taskset", "-c", cpu] if cpu else []) + args
    err = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True, cwd=cwd)
    finally:
        if log_path:
            err.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def relay_cmd(*args: str, log_level: str = "warning") -> list[str]:
    return [sys.executable, "-m", "relay", "--log-level", log_level, *args]


@dataclass
class Result:
    latencies: list[float]
    ttfbs: list[float]
    wall: float
    errors: int

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000 if q < 100 else max(values) * 1000

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def p99(self) -> float:
        return self.pct(self.latencies, 99)

    @property
    def ttfb50(self) -> float:
        return statistics.median(self.ttfbs) * 1000 if self.ttfbs else float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall


async def drive(url: str, body: bytes, headers: dict, n: int | None, concurrency: int, stream: bool,
                seconds: float | None = None, end: bytes = b"data: [DONE]\n\n") -> Result:
    """Send n requests (or keep sending for ``seconds``), at most ``concurrency`` at once.

    Streams are read to the end and count as errors unless their last bytes hold ``end``
    ([DONE] for chat; a Responses stream ends with its response.completed event).
    """
    lat, ttfb, errors = [], [], 0
    queue = iter(range(n)) if n is not None else None
    deadline = time.perf_counter() + seconds if seconds is not None else None

    def more() -> bool:
        if queue is not None:
            return next(queue, None) is not None
        return time.perf_counter() < deadline

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker():
            nonlocal errors
            while more():
                t0 = time.perf_counter()
                first, tail = None, b""
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        async for chunk in resp.content.iter_any():
                            first = first or time.perf_counter()
                            tail = (tail + chunk)[-4096:]
                        ok = resp.status == 200 and (not stream or end in tail)
                except aiohttp.ClientError:
                    ok = False
                if not ok:
                    errors += 1
                    continue
                t1 = time.perf_counter()
                lat.append(t1 - t0)
                ttfb.append((first or t1) - t0)

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Result(lat, ttfb, time.perf_counter() - t, errors)


def child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def proc_cpu_seconds(*pids: int) -> float:
    """User + system CPU of these processes so far, from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def threads(pid: int) -> list[int]:
    """The thread ids of ``pid``: scheduling calls apply to one thread, not the process."""
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


def idle_priority(pid: int) -> None:
    """SCHED_IDLE for every thread of ``pid`` (threads it starts later inherit it): the process
    runs only when its core has nothing else to do."""
    for tid in threads(pid):
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def nice(pid: int, value: int) -> None:
    """This niceness for every thread of ``pid`` (Linux's niceness is per thread; threads it
    starts later inherit it).

    It weighs only against the process's own threads where autogroups are on (Debian's
    kernels: ``kernel.sched_autogroup_enabled``): each child here starts a session, each
    session is a scheduling group, and groups weigh the same whatever their threads' niceness.
    The store measured so far ran so, as a normal process beside the generator and the fake;
    setting the group's niceness too (``/proc/PID/autogroup``) would starve it at concurrency
    64 as SCHED_IDLE did."""
    for tid in threads(pid):
        os.setpriority(os.PRIO_PROCESS, tid, value)


# Linux's EEVDF scheduler (6.6 and later) lets a running task run on to the end of its slice
# before a task woken on the same core runs (RUN_TO_PARITY). On the bench's shared core that was
# the tail at concurrency 1: a store thread's group commit ran on for 2-3 ms while the fake
# upstream (or wrk) woken beside it waited (perf sched timehist: 1-3 ms scheduling delays). Since 6.12 a task may ask
# for a shorter slice (sched_setattr's sched_runtime for SCHED_OTHER), and a task with a shorter
# slice preempts at wake-up: the generator and the fake, stand-ins for machines of their own, ask.
SHORT_SLICE_US = 100
_SYS_SCHED_SETATTR = 314  # x86-64


def short_slice(pid: int, micros: int = SHORT_SLICE_US) -> bool:
    """A ``micros`` EEVDF slice for every thread of ``pid`` (0: this process); False where the
    kernel cannot (before 6.12, or not x86-64): the bench then runs as it did."""
    import ctypes
    import platform
    import struct
    if platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    ok = True
    for tid in threads(pid or os.getpid()):
        # struct sched_attr: size, policy (SCHED_OTHER), flags, nice, priority, runtime (the slice), ...
        attr = struct.pack("IIQiIQQQII", 56, 0, 0, os.getpriority(os.PRIO_PROCESS, tid), 0, micros * 1000, 0, 0, 0, 0)
        ok = libc.syscall(_SYS_SCHED_SETATTR, tid, ctypes.create_string_buffer(attr, len(attr)), 0) == 0 and ok
    return ok


def with_short_slice(cmd: list[str], micros: int = SHORT_SLICE_US) -> list[str]:
    """``cmd`` started with a short slice from its first instruction (its threads inherit it)."""
    return [sys.executable, os.path.abspath(__file__), "--short-slice", str(micros), *cmd]


def pin(pid: int, cores: str) -> None:
    """Every thread of ``pid`` onto ``cores`` ("0", "0,1")."""
    for tid in threads(pid):
        os.sched_setaffinity(tid, {int(c) for c in cores.split(",")})


def rss_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


if __name__ == "__main__" and sys.argv[1:2] == ["--short-slice"]:
    short_slice(0, int(sys.argv[2]))
    os.execvp(sys.argv[3], sys.argv[3:])
