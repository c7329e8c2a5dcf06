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
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import drive, free_port, proc_cpu_seconds, relay_cmd, spawn, stop, wait_port  # noqa: E402

BENCH_KEY = "ak-bench000000000000000000000000000000000000001"


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
    relay = spawn(relay_cmd("serve", "--config", cfg, "--port", str(relay_port)),
                  env={"RELAY_KEYS": BENCH_KEY})
    try:
        wait_port(fake_port)
        wait_port(relay_port)
        headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
        rows = []
        for stream in (False, True):
            body = json.dumps({"model": "gpt-3.5-turbo", "stream": stream,
                               "messages": [{"role": "user", "content": "Say hello"}]}).encode()
            for conc in (1, 32):
                n = args.n if conc == 1 else args.n * 4
                acc = {"direct": [], "relay": []}
                cpu = 0.0
                for target in ("direct", "relay"):  # warm both paths
                    await drive(_url(target, fake_port, relay_port), body, headers, 50, conc, stream)
                for _ in range(args.rounds):
                    for target in ("direct", "relay"):
                        c0 = proc_cpu_seconds(relay.pid)
                        acc[target].append(await drive(_url(target, fake_port, relay_port), body, headers,
                                                       n, conc, stream))
                        if target == "relay":
                            cpu += proc_cpu_seconds(relay.pid) - c0
                rows.append((("stream" if stream else "json"), conc, _merge(acc["direct"]), _merge(acc["relay"]),
                             cpu / (n * args.rounds) * 1000))
        _print(rows)
    finally:
        stop(relay)
        stop(fake)


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
          f"{'relay cpu/req':>13} {'errors':>6}")
    for mode, conc, d, r, cpu in rows:
        print(f"{mode:6} {conc:>4} | {d.p50:10.2f} {d.p99:7.2f} {d.ttfb50:6.2f} {d.rps:7.0f} | "
              f"{r.p50:9.2f} {r.p99:7.2f} {r.ttfb50:6.2f} {r.rps:7.0f} | {r.p50 - d.p50:9.2f} "
              f"{r.p99 - d.p99:9.2f} {cpu:11.3f}ms {d.errors + r.errors:6d}")
    print("times in ms; cpu/req is relay's process CPU (user+sys from /proc) per request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400, help="requests per round at concurrency 1")
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
