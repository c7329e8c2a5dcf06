"""What relay's own slow requests at concurrency 1 overlap: its event loop's bursts, by name.

relay serves one request at a time from `wrk` (on a short slice, on the other core), with the
fake upstream and the embedded store of bench/proxy_compare.py, under bench/loop_tracer.py:
asyncio's loop (not uvloop's: its callbacks cannot be timed, so every figure here is slower than
relay's own) with each callback of at least ``--min-ms`` recorded by name, and each request's own
time (its duration minus the upstream's part). After ``--warmup`` seconds the records start
afresh; after ``--seconds`` more they are read back. Prints the callbacks by name (count and
mean time), the own time's percentiles, and for the requests whose own time passed ``--slow-ms``
the callbacks other than request handlers that overlapped them: which background work lands on
the requests in flight. A socket read (``_read_ready``) is either relay's own connections or the
store driver's. Loopback only, bounded in time.

    python bench/loop_bursts.py [--mode json] [--seconds 5] [--warmup 3] [--min-ms 0.3] [--slow-ms 1] [--tree DIR]
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_port, nice, spawn, stop, wait_port  # noqa: E402
from proxy_compare import MODES, OTHER_CORE, PROXY_CORE, bench_key, relay_config, start_fake, wrk_command, wrk_result  # noqa: E402

HANDLER_STEPS = ("RequestHandler._execute",)  # the requests' own work, not a burst in their way


Callback = tuple[float, float, str]  # (start, seconds, name)
Request = tuple[float, float, float]  # (start, own seconds, total seconds)


def read_trace(path: str) -> tuple[list[Callback], list[Request]]:
    callbacks: list[Callback] = []
    requests: list[Request] = []
    with open(path) as fh:
        for line in fh:
            kind, start, took, rest = line.rstrip("\n").split(" ", 3)
            if kind == "C":
                callbacks.append((float(start), float(took), rest))
            else:
                requests.append((float(start), float(took), float(rest)))
    return sorted(callbacks), requests


def overlapping(callbacks: list[Callback], starts: list[float], start: float, total: float,
                longest: float) -> set[str]:
    """Names of the callbacks (other than request handlers) that ran while a request was served."""
    names = set()
    i = bisect.bisect_left(starts, start - longest)  # one that began before it may run into it
    while i < len(callbacks) and callbacks[i][0] < start + total:
        c_start, took, name = callbacks[i]
        if c_start + took > start and name not in HANDLER_STEPS:
            names.add(name)
        i += 1
    return names


def report(callbacks: list[Callback], requests: list[Request], slow_ms: float, min_ms: float) -> None:
    count: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    for _, took, name in callbacks:
        count[name] += 1
        total[name] += took
    print(f"{len(requests)} requests; callbacks of {min_ms:g} ms or more, by name:")
    for name, n in count.most_common(12):
        print(f"  {n:6d} x mean {1000 * total[name] / n:6.2f} ms  {name}")
    own = sorted(r[1] for r in requests)
    if not own:
        print("no proxied request was recorded")
        return
    at = lambda q: 1000 * own[min(int(len(own) * q), len(own) - 1)]  # noqa: E731
    print(f"own time: p50 {at(0.5):.3f} ms, p90 {at(0.9):.3f} ms, p99 {at(0.99):.3f} ms, max {1000 * own[-1]:.3f} ms")
    slow = [r for r in requests if r[1] > slow_ms / 1000]
    longest = max((c[1] for c in callbacks), default=0.0)
    starts = [c[0] for c in callbacks]
    blame: collections.Counter[str] = collections.Counter()
    alone = 0
    for start, _, total in slow:
        names = overlapping(callbacks, starts, start, total, longest)
        blame.update(names)
        alone += not names
    print(f"own time over {slow_ms:g} ms: {len(slow)} requests ({100 * len(slow) / len(requests):.2f} %); "
          f"overlapped by:")
    for name, n in blame.most_common(10):
        print(f"  {n:6d}  {name}")
    print(f"  {alone:6d}  nothing recorded (the request's own work, or callbacks under {min_ms:g} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="json", choices=sorted(MODES))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--min-ms", type=float, default=0.3, help="record callbacks at least this long")
    parser.add_argument("--slow-ms", type=float, default=1.0, help="a request whose own time passed this is slow")
    parser.add_argument("--tree", default=None, metavar="DIR",
                        help="relay from this source tree instead (a worktree of an earlier commit)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("needs wrk (apt-get install wrk)")
        return 2
    mode = MODES[args.mode]
    workdir = tempfile.mkdtemp(prefix="relay-loop-bursts-")
    trace = os.path.join(workdir, "trace.txt")
    fake_port, relay_port = free_port(), free_port()
    procs = [start_fake(fake_port, OTHER_CORE)]
    from relay.store.embedded import EmbeddedServer
    store = EmbeddedServer(os.path.join(workdir, "store"))
    os.sched_setaffinity(0, {int(OTHER_CORE)})  # the store server (our child) beside the fake and wrk
    try:
        uri = store.start()
        nice(store.proc.pid, 10)
        cfg = os.path.join(workdir, "upstreams.yaml")
        with open(cfg, "w") as fh:
            fh.write(relay_config(fake_port, True))
        tracer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loop_tracer.py")
        relay = spawn([sys.executable, tracer, trace, str(args.min_ms), "--log-level", "info", "serve",
                       "--config", cfg, "--port", str(relay_port), "--mongodb-uri", uri, "--data-dir", workdir],
                      cpu=PROXY_CORE, log_path=os.path.join(workdir, "relay.log"),
                      **({"cwd": args.tree, "env": {"PYTHONPATH": os.path.abspath(args.tree)}} if args.tree else {}))
        procs.append(relay)
        wait_port(fake_port)
        wait_port(relay_port, 60)
        key = bench_key(uri)
        path = "/v1/responses" if mode.api == "responses" else "/v1/chat/completions"
        wrk, env = wrk_command(f"http://127.0.0.1:{relay_port}{path}", json.dumps(mode.body).encode(),
                               {"Authorization": f"Bearer {key}"}, 1, max(args.warmup + args.seconds, 2))
        load = subprocess.Popen(wrk, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(args.warmup)
        os.kill(relay.pid, signal.SIGUSR1)  # the warm-up's records are dropped
        time.sleep(args.seconds)
        os.kill(relay.pid, signal.SIGUSR1)
        out, _ = load.communicate(timeout=60)
        for _ in range(100):
            if os.path.exists(trace) and os.path.getmtime(trace) > time.time() - args.seconds / 2:
                break
            time.sleep(0.1)
        if "RESULT" in out:
            n, took, p50, p99, errors = wrk_result(out)
            print(f"wrk, {args.mode} at concurrency 1, whole run: {n / took:.0f} req/s, "
                  f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, errors {errors}")
        report(*read_trace(trace), args.slow_ms, args.min_ms)
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)
        store.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
