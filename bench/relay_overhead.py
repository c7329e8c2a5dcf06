"""What relay adds: latency (p50, p99), time to first byte and throughput, relay vs direct.

Starts relay's fake upstream and relay as child processes, then drives both with the same
requests at concurrency 1 and 32, JSON and streaming chats, alternating relay and direct
rounds so machine noise hits both alike. Prints one table.

    python bench/relay_overhead.py [--n 400] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import child_pids, drive, free_port, proc_cpu_seconds, relay_cmd, spawn, stop, wait_port  # noqa: E402


def _config(fake_port: int) -> str:
    return f"""
upstreams:
  - name: fake
    base_url: http://127.0.0.1:{fake_port}/v1
    keys: [sk-bench-upstream]
model_map:
  gpt-3.5-turbo: gpt-3.5-turbo-1106
pricing:
  gpt-3.5-turbo-1106: {{input: "2/3", output: "4/3"}}
"""


async def main(args) -> None:
    fake_port, relay_port = free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="relay-bench-")
    cfg = os.path.join(workdir, "upstreams.yaml")
    with open(cfg, "w") as fh:
        fh.write(_config(fake_port))
    fake = spawn(relay_cmd("fake-upstream", "--port", str(fake_port)))
    relay = spawn(relay_cmd("serve", "--config", cfg, "--port", str(relay_port), "--data-dir", workdir))
    try:
        wait_port(fake_port)
        wait_port(relay_port, timeout=60)
        bench_key = subprocess.run(relay_cmd("keys", "create", "--quota", str(10**12), "--data-dir", workdir),
                                   capture_output=True, text=True, check=True).stdout.strip()
        headers = {"Authorization": f"Bearer {bench_key}", "Content-Type": "application/json"}
        rows = []
        for stream in (False, True):
            body = json.dumps({"model": "gpt-3.5-turbo", "stream": stream,
                               "messages": [{"role": "user", "content": "Say hello"}]}).encode()
            for conc in (1, 32):
                n = args.n if conc == 1 else args.n * 4
                acc = {"direct": [], "relay": []}
                cpu = store_cpu = 0.0
                store_pids = child_pids(relay.pid)
                for target in ("direct", "relay"):  # warm both paths
                    await drive(_url(target, fake_port, relay_port), body, headers, 50, conc, stream)
                for _ in range(args.rounds):
                    for target in ("direct", "relay"):
                        c0, s0 = proc_cpu_seconds(relay.pid), proc_cpu_seconds(*store_pids)
                        acc[target].append(await drive(_url(target, fake_port, relay_port), body, headers,
                                                       n, conc, stream))
                        if target == "relay":
                            cpu += proc_cpu_seconds(relay.pid) - c0
                            store_cpu += proc_cpu_seconds(*store_pids) - s0
                rows.append((("stream" if stream else "json"), conc, _merge(acc["direct"]), _merge(acc["relay"]),
                             cpu / (n * args.rounds) * 1000, store_cpu / (n * args.rounds) * 1000))
        _print(rows)
    finally:
        stop(relay)
        stop(fake)
        shutil.rmtree(workdir, ignore_errors=True)


def _url(target: str, fake_port: int, relay_port: int) -> str:
    port = fake_port if target == "direct" else relay_port
    return f"http://127.0.0.1:{port}/v1/chat/completions"


def _merge(results):
    from common import Result
    lat = [x for r in results for x in r.latencies]
    ttfb = [x for r in results for x in r.ttfbs]
    return Result(lat, ttfb, sum(r.wall for r in results), sum(r.errors for r in results))


def _print(rows) -> None:
    print(f"{'mode':6} {'conc':>4} | {'direct p50':>10} {'p99':>7} {'ttfb':>6} {'req/s':>7} | "
          f"{'relay p50':>9} {'p99':>7} {'ttfb':>6} {'req/s':>7} | {'added p50':>9} {'added p99':>9} "
          f"{'relay cpu/req':>13} {'store cpu/req':>13} {'errors':>6}")
    for mode, conc, d, r, cpu, store_cpu in rows:
        print(f"{mode:6} {conc:>4} | {d.p50:10.2f} {d.p99:7.2f} {d.ttfb50:6.2f} {d.rps:7.0f} | "
              f"{r.p50:9.2f} {r.p99:7.2f} {r.ttfb50:6.2f} {r.rps:7.0f} | {r.p50 - d.p50:9.2f} "
              f"{r.p99 - d.p99:9.2f} {cpu:11.3f}ms {store_cpu:11.3f}ms {d.errors + r.errors:6d}")
    print("times in ms; cpu/req: relay's own process, and the embedded store's server on its own "
          "(user+sys from /proc), per request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400, help="requests per round at concurrency 1")
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
