"""Instructions per request: relay under callgrind, which counts what the CPU would execute and
so does not move with the machine's load, where CPU time here moves ±15 % a cell.

For each source tree (this one, and ``--baseline`` trees), in turn, ``--runs`` times: relay
starts under ``valgrind --tool=callgrind --instr-atstart=no`` (counting off while it starts),
on the same store, fake upstream, file and key as bench/proxy_compare.py; counting is turned on,
``--warmup`` requests go through, the counters are zeroed, ``--n`` requests go through one at a
time, and the count is dumped; then the counters are zeroed again and relay idles as long as
the requests took, and that count (its background work: group commits, limiter ticks,
heartbeats, which run per second, not per request, and a process 30× slower does them 30× as
often per request) is taken off. Prints instructions per request, per tree and run, and the
median. Needs Debian's valgrind; loopback only, bounded in time (~1 minute a run).

    python bench/instructions.py [--mode json] [--n 400] [--runs 3] [--baseline DIR ...]
"""
from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_port, relay_cmd, spawn, stop, wait_port  # noqa: E402
from proxy_compare import MODES, bench_key, relay_config, start_fake  # noqa: E402


def counted(out_dir: str, pid: int, before: set[str]) -> int:
    """The instruction count of the dump callgrind wrote since ``before`` was listed."""
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True)
    for _ in range(100):
        new = set(glob.glob(os.path.join(out_dir, "cg.*"))) - before
        for path in new:
            with open(path) as fh:
                for line in fh:
                    if line.startswith(("summary:", "totals:")):
                        return int(line.split()[1])
        time.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")


def one_run(tree: str, cfg: str, uri: str, key: str, mode_name: str, n: int, warmup: int) -> tuple[float, float]:
    """(instructions per request, of which the idle background's share per request)."""
    mode = MODES[mode_name]
    out_dir = tempfile.mkdtemp(prefix="relay-instructions-")
    port = free_port()
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_dir}/cg.%p",
           *relay_cmd("serve", "--config", cfg, "--port", str(port), "--mongodb-uri", uri,
                      "--data-dir", os.path.join(out_dir, "data"), log_level="info")]
    relay = spawn(cmd, log_path=os.path.join(out_dir, "relay.log"), cwd=tree, env={"PYTHONPATH": tree})
    try:
        wait_port(port, 300)
        path = "/v1/responses" if mode.api == "responses" else "/v1/chat/completions"
        body = json.dumps(mode.body).encode()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

        def requests(count: int) -> None:
            for _ in range(count):
                conn.request("POST", path, body, headers)
                reply = conn.getresponse()
                reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"relay answered {reply.status}")

        subprocess.run(["callgrind_control", "-i", "on", str(relay.pid)], capture_output=True, check=True)
        requests(warmup)
        subprocess.run(["callgrind_control", "-z", str(relay.pid)], capture_output=True, check=True)
        before = set(glob.glob(os.path.join(out_dir, "cg.*")))
        started = time.monotonic()
        requests(n)
        took = time.monotonic() - started
        busy = counted(out_dir, relay.pid, before)
        subprocess.run(["callgrind_control", "-z", str(relay.pid)], capture_output=True, check=True)
        before = set(glob.glob(os.path.join(out_dir, "cg.*")))
        time.sleep(took)
        idle = counted(out_dir, relay.pid, before)
        conn.close()
        return (busy - idle) / n, idle / n
    finally:
        stop(relay)
        shutil.rmtree(out_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="json", choices=sorted(MODES))
    parser.add_argument("--n", type=int, default=400, help="requests counted per run")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", action="append", default=[], metavar="DIR",
                        help="also relay from this source tree (a worktree of an earlier commit); repeatable")
    args = parser.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("needs valgrind (apt-get install valgrind)")
        return 2
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [("relay", here)] + [(f"base{i or ''}", os.path.abspath(d)) for i, d in enumerate(args.baseline)]
    workdir = tempfile.mkdtemp(prefix="relay-instructions-bench-")
    fake_port = free_port()
    fake = start_fake(fake_port)
    from relay.store.embedded import EmbeddedServer
    store = EmbeddedServer(os.path.join(workdir, "store"))
    try:
        uri = store.start()
        wait_port(fake_port)
        cfg = os.path.join(workdir, "upstreams.yaml")
        with open(cfg, "w") as fh:
            fh.write(relay_config(fake_port, True))
        key = bench_key(uri)
        results: dict[str, list[float]] = {name: [] for name, _ in trees}
        for run in range(args.runs):
            for name, tree in trees:
                per_request, background = one_run(tree, cfg, uri, key, args.mode, args.n, args.warmup)
                results[name].append(per_request)
                print(f"run {run + 1} {name:6s} {per_request / 1e3:8.0f} k instructions per {args.mode} request "
                      f"(idle background taken off: {background / 1e3:.0f} k)", flush=True)
        first = statistics.median(results["relay"])
        for name, values in results.items():
            median = statistics.median(values)
            print(f"{name:6s} median {median / 1e3:8.0f} k instructions per request"
                  + ("" if name == "relay" else f"; relay ÷ {name} {first / median:.3f}"))
        return 0
    finally:
        store.stop()
        stop(fake)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
