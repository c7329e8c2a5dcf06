"""relay beside a bare upstream and nginx as a proxy floor, in one run, pinned to cores.

Layout (2 cores): the proxy under test (relay, or nginx as the floor) alone on core 0; the
load generator, the upstream fake (bench/lean_upstream.py: canned OpenAI replies from a bare
asyncio protocol; its own CPU per request is printed as the "direct" row) and relay's store
server on core 1, the store at idle priority (SCHED_IDLE) so that it takes only what the
generator and the fake leave. Relay runs at log level info, its access log to a file.
Targets are measured interleaved, round by round, at concurrency 1, 16 and 64, for JSON
chats and 20-chunk streams. Reported per row: requests/s, p50/p99 latency, p50 time to
first byte, CPU per request of the proxy's processes (from /proc) and their peak RSS.

    python bench/proxy_compare.py [--seconds 5] [--rounds 2]
    python bench/proxy_compare.py --soak 600     # RSS and open fds once a second; fails on growth

Needs Debian's nginx-light (`apt-get install nginx-light`); loopback only, bounded in time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import (Result, child_pids, drive, free_port, idle_priority, pin, proc_cpu_seconds, relay_cmd,  # noqa
                    rss_mb, spawn, stop, wait_port)


PROXY_CORE, OTHER_CORE = "0", "1"


def nginx_conf(workdir: str, listen: int, body: str) -> str:
    path = os.path.join(workdir, f"nginx-{listen}.conf")
    with open(path, "w") as fh:
        fh.write(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx-{listen}.pid;
error_log {workdir}/nginx-{listen}.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body-{listen};
    proxy_temp_path {workdir}/proxy-{listen};
    keepalive_requests 1000000;
    {body}
}}
""")
    return path


def proxy_server_block(port: int, upstream_port: int) -> str:
    return f"""
    upstream fake {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}"""


def relay_config(fake_port: int, leases: bool) -> str:
    return f"""
upstreams:
  - name: json
    base_url: http://127.0.0.1:{fake_port}/json/v1
    keys: [sk-bench-1]
    models: [bench-json]
  - name: stream
    base_url: http://127.0.0.1:{fake_port}/stream/v1
    keys: [sk-bench-2]
    models: [bench-stream]
pricing:
  bench-json: {{input: 1, output: 1}}
  bench-stream: {{input: 1, output: 1}}
quota:
  default_max_tokens: 64
  leases: {"true" if leases else "false"}
"""


class Target:
    def __init__(self, name: str, port: int, pids_fn, path_prefix: str = "", headers: dict | None = None):
        self.name, self.port, self.pids_fn, self.path_prefix = name, port, pids_fn, path_prefix
        self.headers = headers  # its own key's (the row "policy"), else the bench key's

    def url(self, mode: str) -> str:
        if self.name in ("relay", "base", "policy"):
            return f"http://127.0.0.1:{self.port}/v1/chat/completions"
        return f"http://127.0.0.1:{self.port}/{mode}/v1/chat/completions"


GENERATOR = {"name": "python"}


async def measure(target: Target, mode: str, conc: int, seconds: float, headers: dict) -> tuple[Result, float, float]:
    headers = target.headers or headers
    body = json.dumps({"model": f"bench-{mode}", "stream": mode == "stream", "max_tokens": 64,
                       "messages": [{"role": "user", "content": "Say hi"}]}).encode()
    pids = target.pids_fn()
    cpu0 = proc_cpu_seconds(*pids)
    peak = [0.0]
    done = asyncio.Event()

    async def sample():
        while not done.is_set():
            peak[0] = max(peak[0], sum(rss_mb(p) for p in pids))
            await asyncio.sleep(0.25)

    sampler = asyncio.ensure_future(sample())
    if GENERATOR["name"] == "wrk":
        result = await run_wrk(target.url(mode), body, headers, conc, seconds)
    else:
        result = await drive(target.url(mode), body, headers, None, conc, mode == "stream", seconds=seconds)
    done.set()
    await sampler
    cpu = proc_cpu_seconds(*pids) - cpu0
    n = max(len(result.latencies), 1)
    return result, cpu / n * 1000, peak[0]


async def run_wrk(url: str, body: bytes, headers: dict, conc: int, seconds: float, cores: str = OTHER_CORE) -> Result:
    """wrk (C, one thread on ``cores``): requests/s and latency percentiles; no time to first byte."""
    script = os.path.join(os.path.dirname(__file__), "wrk_post.lua")
    env = {**os.environ, "RELAY_BENCH_BODY": body.decode(), "RELAY_BENCH_AUTH": headers["Authorization"]}
    proc = await asyncio.create_subprocess_exec(
        "taskset", "-c", cores, "wrk", "-t1", f"-c{conc}", f"-d{max(int(seconds), 1)}s", "-s", script, url,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    line = next(x for x in out.decode().splitlines() if x.startswith("RESULT"))
    _, n, micros, p50, p99, errors = line.split()
    n = int(n)
    # Percentiles stand in for the sample list: the table reads p50, p99 and their count.
    tail = max(n // 50, 1)
    lat = [float(p50) / 1000] * (n - tail) + [float(p99) / 1000] * tail
    return Result(lat, [], int(micros) / 1e6, int(errors))


def merge(parts: list[tuple[Result, float, float]]) -> tuple[Result, float, float]:
    lat = [x for r, _, _ in parts for x in r.latencies]
    ttfb = [x for r, _, _ in parts for x in r.ttfbs]
    res = Result(lat, ttfb, sum(r.wall for r, _, _ in parts), sum(r.errors for r, _, _ in parts))
    return res, statistics.mean(c for _, c, _ in parts), max(p for _, _, p in parts)


async def main(args) -> int:
    GENERATOR["name"] = args.generator
    if not shutil.which("nginx"):
        print("needs nginx (apt-get install nginx-light)")
        return 2
    workdir = tempfile.mkdtemp(prefix="relay-proxy-bench-")
    fake_port, nginx_port, relay_port = free_port(), free_port(), free_port()
    procs = []
    try:
        fake = spawn([sys.executable, os.path.join(os.path.dirname(__file__), "lean_upstream.py"), str(fake_port)],
                     cpu=OTHER_CORE)
        floor = spawn(["nginx", "-c", nginx_conf(workdir, nginx_port, proxy_server_block(nginx_port, fake_port))],
                      cpu=PROXY_CORE)
        procs += [fake, floor]
        from relay.store.embedded import EmbeddedServer
        store = EmbeddedServer(os.path.join(workdir, "store"))
        os.sched_setaffinity(0, {int(OTHER_CORE)})  # the store server (our child) and the load generator
        uri = store.start()
        # Its bursts of work (each group commit) must not delay the generator and the fake on the
        # same core: measured at normal priority they put relay's p90 at c=1 at 2.4 ms, at idle
        # priority 0.9 ms. It still gets the core's idle time, and its CPU is reported below.
        idle_priority(store.proc.pid)
        cfg = os.path.join(workdir, "upstreams.yaml")
        with open(cfg, "w") as fh:
            fh.write(relay_config(fake_port, not args.no_leases))
        # At level info, as in production: one access line per request, written to a file.
        relay = spawn(relay_cmd("serve", "--config", cfg, "--port", str(relay_port), "--mongodb-uri", uri,
                                "--data-dir", workdir, log_level="info"), cpu=PROXY_CORE,
                      log_path=os.path.join(workdir, "relay.log"))
        procs.append(relay)
        ports = [fake_port, nginx_port, relay_port]
        if args.baseline:  # the same relay from another source tree (e.g. a worktree of main), same store
            base_port = free_port()
            base = spawn(relay_cmd("serve", "--config", cfg, "--port", str(base_port), "--mongodb-uri", uri,
                                   "--data-dir", os.path.join(workdir, "base"), log_level="info"), cpu=PROXY_CORE,
                         log_path=os.path.join(workdir, "relay-base.log"), cwd=os.path.abspath(args.baseline),
                         env={"PYTHONPATH": os.path.abspath(args.baseline)})
            procs.append(base)
            ports.append(base_port)
        for port in ports:
            wait_port(port, 60)
        key = subprocess.run(relay_cmd("keys", "create", "--quota", str(10**15), "--mongodb-uri", uri),
                             capture_output=True, text=True, check=True).stdout.strip()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        targets = [Target("direct", fake_port, lambda: [fake.pid]),
                   Target("nginx", nginx_port, lambda: [floor.pid] + child_pids(floor.pid)),
                   Target("relay", relay_port, lambda: [relay.pid])]
        if args.baseline:
            targets.append(Target("base", base_port, lambda: [base.pid]))
        if args.key_policy:  # the same relay, a key with every policy field set and no limit ever reached
            policy = ["--models", "bench-*", "--allow-cidrs", "127.0.0.0/8,::1", "--expires-at", "2999-01-01",
                      "--rpm", str(10**9), "--tpm", str(10**12), "--max-concurrency", str(10**6)]
            limited = subprocess.run(relay_cmd("keys", "create", "--quota", str(10**15), *policy, "--mongodb-uri",
                                               uri), capture_output=True, text=True, check=True).stdout.strip()
            targets.append(Target("policy", relay_port, lambda: [relay.pid],
                                  headers={**headers, "Authorization": f"Bearer {limited}"}))
        if args.soak:
            return await soak(targets[2], headers, args.soak, relay.pid)
        if args.scaling:
            stop(relay)
            return await scaling(args, cfg, uri, headers, [fake.pid, store.proc.pid], workdir)
        for t in targets:  # warm-up
            for mode in ("json", "stream"):
                await measure(t, mode, 8, 1.0, headers)
        rows = []
        for mode in ("json", "stream"):
            for conc in (1, 16, 64):
                parts = {t.name: [] for t in targets}
                for _ in range(args.rounds):
                    for t in targets:
                        parts[t.name].append(await measure(t, mode, conc, args.seconds, headers))
                if os.environ.get("BENCH_VERBOSE"):
                    print(mode, conc, {k: [(round(r.rps), round(r.p99, 2)) for r, _, _ in v] for k, v in parts.items()},
                          flush=True)
                direct = merge(parts["direct"])
                for t in targets:
                    rows.append((mode, conc, t.name, merge(parts[t.name]), direct))
        store_cpu = proc_cpu_seconds(store.proc.pid)
        print(f"relay with quota.leases: {not args.no_leases}; load generator: {args.generator}")
        print_table(rows)
        total_relay = sum(len(r[3][0].latencies) for r in rows if r[2] in ("relay", "base", "policy"))
        print(f"store server (separate process, core {OTHER_CORE}): {store_cpu:.1f} s CPU in all, "
              f"{store_cpu / max(total_relay, 1) * 1000:.3f} ms per relay request; RSS {rss_mb(store.proc.pid):.0f} MB")
        with open(os.path.join(workdir, "relay.log"), "rb") as fh:
            access_lines = sum(1 for line in fh if b" key=" in line)
        print(f"relay wrote {access_lines} access lines at log level info; "
              f"{metric_value(relay_port, 'relay_quota_store_waits_total'):.0f} reservations waited for the store")
        store.stop()
        return 0
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(workdir, ignore_errors=True)


def metric_value(port: int, name: str) -> float:
    """One unlabelled sample from relay's /metrics."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return next((float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")), float("nan"))


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy so far (all cores, from /proc/stat)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def scaling(args, cfg: str, uri: str, headers: dict, others: list[int], workdir: str) -> int:
    """``--workers N`` against one worker: JSON chats at concurrency 64.

    Rows: one worker alone on core 0 (the main table's layout); then one and two workers with
    every process free to use both cores (relay, wrk, the fake and the store share them, so two
    workers cannot double: the bound the cores allow is printed beside each row, from the CPU
    per request of relay and of everything else measured in that row)."""
    ncpu = os.cpu_count() or 1
    layouts = [("1 worker, core 0; rest core 1", 1, PROXY_CORE, OTHER_CORE),
               ("1 worker, all cores shared", 1, "0,1", "0,1"),
               ("2 workers, all cores shared", 2, "0,1", "0,1")]
    print(f"--workers scaling, JSON chat, concurrency 64, {args.rounds} x {args.seconds:.0f} s, {ncpu} cores")
    print(f"{'layout':32} | {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} | {'relay cpu/req':>13} {'rest cpu/req':>12} "
          f"{'cores allow':>11} {'of bound':>8} {'errors':>6}")
    base = None
    for name, workers, relay_cores, other_cores in layouts:
        for pid in others:
            pin(pid, other_cores)
        os.sched_setaffinity(0, {int(c) for c in other_cores.split(",")})
        port = free_port()
        relay = spawn(relay_cmd("serve", "--config", cfg, "--port", str(port), "--mongodb-uri", uri,
                                "--data-dir", os.path.join(workdir, f"w{workers}-{port}"), "--workers", str(workers),
                                log_level="info"), cpu=relay_cores, log_path=os.path.join(workdir, f"relay-{port}.log"))
        try:
            wait_port(port, 60)
            target = Target("relay", port, lambda relay=relay: [relay.pid] + child_pids(relay.pid))
            await asyncio.sleep(1.0)  # workers up
            body = json.dumps({"model": "bench-json", "max_tokens": 64,
                               "messages": [{"role": "user", "content": "Say hi"}]}).encode()
            await run_wrk(target.url("json"), body, headers, 16, 1.0, other_cores)  # warm-up
            parts = []
            busy0 = machine_busy_seconds()
            for _ in range(args.rounds):
                pids = target.pids_fn()
                cpu0 = proc_cpu_seconds(*pids)
                res = await run_wrk(target.url("json"), body, headers, 64, args.seconds, other_cores)
                parts.append((res, (proc_cpu_seconds(*pids) - cpu0) / max(len(res.latencies), 1) * 1000, 0.0))
            busy = machine_busy_seconds() - busy0
            res, relay_cpu, _ = merge(parts)
            n = max(len(res.latencies), 1)
            rest_cpu = max(busy * 1000 / n - relay_cpu, 0.0)
            cores = len(relay_cores.split(","))
            # One core for relay alone; when everything shares, the cores split by CPU per request.
            bound = 1000 / relay_cpu if cores == 1 else ncpu * 1000 / (relay_cpu + rest_cpu)
            base = base or res.rps
            print(f"{name:32} | {res.rps:7.0f} {res.p50:7.2f} {res.p99:7.2f} | {relay_cpu:13.3f} {rest_cpu:12.3f} "
                  f"{bound:11.0f} {res.rps / bound:8.0%} {res.errors:6d}")
        finally:
            stop(relay)
    return 0


def print_table(rows) -> None:
    print(f"{'mode':6} {'conc':>4} {'target':7} | {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'ttfb p50':>8} "
          f"{'added p50':>9} | {'cpu/req ms':>10} {'peak RSS MB':>11} {'errors':>6}")
    for mode, conc, name, (res, cpu, peak), (direct, _, _) in rows:
        added = res.p50 - direct.p50 if name != "direct" else 0.0
        print(f"{mode:6} {conc:>4} {name:7} | {res.rps:7.0f} {res.p50:7.2f} {res.p99:7.2f} {res.ttfb50:8.2f} "
              f"{added:9.2f} | {cpu:10.3f} {peak:11.1f} {res.errors:6d}")
    print("direct = the lean fake upstream itself (its cpu/req is the fake's own cost); "
          "cpu/req for nginx and relay is the proxy's process tree on core 0")


async def soak(target: Target, headers: dict, seconds: float, pid: int) -> int:
    """Moderate mixed load for ``seconds``; RSS and open fds sampled once a second."""
    samples = []
    stop_at = time.monotonic() + seconds

    async def load():
        while time.monotonic() < stop_at:
            for mode in ("json", "stream"):
                await measure(target, mode, 16, 2.0, headers)

    async def watch():
        while time.monotonic() < stop_at:
            samples.append((rss_mb(pid), len(os.listdir(f"/proc/{pid}/fd"))))
            await asyncio.sleep(1.0)

    await asyncio.gather(load(), watch())
    third = max(len(samples) // 3, 1)
    first = statistics.median(s[0] for s in samples[:third])
    last = statistics.median(s[0] for s in samples[-third:])
    fds_first = statistics.median(s[1] for s in samples[:third])
    fds_last = statistics.median(s[1] for s in samples[-third:])
    print(f"soak {seconds:.0f} s, {len(samples)} samples: RSS {first:.1f} -> {last:.1f} MB "
          f"(max {max(s[0] for s in samples):.1f}); open fds {fds_first:.0f} -> {fds_last:.0f}")
    grew = last - first > 5 or fds_last - fds_first > 20
    print("FAIL: growth" if grew else "ok: flat")
    return 1 if grew else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--soak", type=float, default=0.0, help="run the soak for this many seconds instead")
    parser.add_argument("--generator", choices=("python", "wrk"), default="python",
                        help="python (aiohttp; records time to first byte) or wrk (leaner; no TTFB)")
    parser.add_argument("--scaling", action="store_true",
                        help="--workers 2 against one worker (JSON, concurrency 64) instead of the table")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also measure relay from this source tree (a checkout of an earlier commit), "
                             "interleaved with this one: the row 'base'")
    parser.add_argument("--key-policy", action="store_true",
                        help="also the row 'policy': the same relay, with a key whose every policy field is set "
                             "(models, addresses, expiry, rpm, tpm, max_concurrency) at values never reached")
    parser.add_argument("--no-leases", action="store_true",
                        help="one reservation and one settlement in the store per request (quota.leases: false)")
    sys.exit(asyncio.run(main(parser.parse_args())))
