"""relay beside a bare upstream, nginx as a proxy floor and (``--litellm``) LiteLLM's proxy as
the peer, in one run, pinned to cores.

Layout (2 cores): the proxy under test (relay, nginx or LiteLLM) alone on core 0; the
load generator, the upstream fake (bench/lean_upstream.py: canned OpenAI replies from a bare
asyncio protocol; its own CPU per request is printed as the "direct" row) and relay's store
server on core 1 (its threads at nice 10, which weighs only within its own scheduling group
where autogroups are on: see common.nice). The generator and the fake ask the scheduler for
short slices (common.short_slice, Linux 6.12+), so that a group commit of the store's running
on core 1 does not hold them up for its whole slice. Targets are measured interleaved, round
by round, for each mode and concurrency.

relay runs as an operator would start it: a minimal upstreams.yaml (upstreams and prices, no
``quota:`` section, so the defaults: leases, affinity), at log level info with its access log
written to a file, and a bench key with a policy (models, expiry, addresses, rpm, tpm and
max_concurrency at values never reached), so every per-request feature is on.

Modes: ``json`` (a chat, gpt-4o-mini), ``stream`` (a 20-chunk chat stream, gpt-4o),
``responses`` (a 20-event Responses API stream, gpt-4.1-mini, stored) and ``tools`` (a chat with
a system prompt, two function tools and an image, answered by a tool call, gpt-4.1). Reported
per row: requests/s, p50/p99 latency, p50 time to first byte (Python generator only), the p50
added over direct, CPU per request of the target's processes (from /proc), the store server's
CPU per request of that row, and peak RSS.

    python bench/proxy_compare.py [--seconds 5] [--rounds 2] [--modes json,stream] [--conc 1,64]
    python bench/proxy_compare.py --baseline /tmp/base-main   # the same relay from another tree, interleaved
    python bench/proxy_compare.py --litellm /tmp/ll/bin/litellm  # LiteLLM's proxy beside it (its own venv)
    python bench/proxy_compare.py --scaling                   # --workers N, the generator on its own core
    python bench/proxy_compare.py --soak 600                  # RSS and open fds once a second; fails on growth

Needs Debian's nginx-light (`apt-get install nginx-light`) and wrk (the default generator;
``--generator python`` otherwise); loopback only, bounded in time.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(__file__))
from common import (Result, child_pids, drive, free_port, idle_priority, nice, pin, proc_cpu_seconds,  # noqa
                    relay_cmd, rss_mb, short_slice, spawn, stop, wait_port, with_short_slice)


PROXY_CORE, OTHER_CORE = "0", "1"
RELAY_ROWS = ("relay", "base", "bare")
FLOOR_ROWS = ("direct", "nginx")
POLICY = ["--models", "gpt-4*", "--allow-cidrs", "127.0.0.0/8,::1", "--expires-at", "2999-01-01",
          "--rpm", str(10**9), "--tpm", str(10**12), "--max-concurrency", str(10**6)]


def _png(width: int, height: int) -> bytes:
    """A white PNG of that size: a few KB, with the real header an estimate reads."""
    raw = zlib.compress(b"".join(b"\x00" + b"\xff" * (width * 3) for _ in range(height)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _tool(name: str, description: str, properties: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties)}}}


TOOLS = [_tool("get_weather", "The current weather in a city.",
               {"city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}),
         _tool("search_flights", "Flights between two airports on a day.",
               {"origin": {"type": "string"}, "destination": {"type": "string"},
                "date": {"type": "string", "description": "YYYY-MM-DD"}, "passengers": {"type": "integer"}})]
IMAGE = "data:image/png;base64," + base64.b64encode(_png(1024, 768)).decode()


@dataclass(frozen=True)
class Mode:
    api: str        # chat or responses: relay's path
    upstream: str   # the lean upstream's path prefix (and the upstream's name in relay's file)
    model: str
    stream: bool
    body: dict
    end: bytes = b"data: [DONE]\n\n"  # how a complete stream ends

    def path(self) -> str:
        return "/v1/responses" if self.api == "responses" else "/v1/chat/completions"


MODES = {
    "json": Mode("chat", "json", "gpt-4o-mini", False, {
        "model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": "Say hi"}]}),
    "stream": Mode("chat", "stream", "gpt-4o", True, {
        "model": "gpt-4o", "stream": True, "max_tokens": 64, "messages": [{"role": "user", "content": "Say hi"}]}),
    "responses": Mode("responses", "rstream", "gpt-4.1-mini", True, {
        "model": "gpt-4.1-mini", "stream": True, "max_output_tokens": 64, "input": "Say hi"},
        end=b"event: response.completed"),
    "tools": Mode("chat", "tools", "gpt-4.1", False, {
        "model": "gpt-4.1", "max_tokens": 256, "tools": TOOLS, "messages": [
            {"role": "system", "content": "You are a travel assistant. Use the tools when they help."},
            {"role": "user", "content": [{"type": "text", "text": "What is the weather where this photo was taken?"},
                                         {"type": "image_url", "image_url": {"url": IMAGE, "detail": "high"}}]}]}),
}


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
    client_max_body_size 10m;
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


def start_fake(port: int, cpu: str | None = None) -> subprocess.Popen:
    """The lean fake upstream on ``port``, on a short scheduler slice (common.short_slice)."""
    return spawn(with_short_slice([sys.executable, os.path.join(os.path.dirname(__file__), "lean_upstream.py"),
                                   str(port)]), cpu=cpu)


def bench_key(uri: str, policy: bool = True) -> str:
    """A new relay key on the store at ``uri`` with quota to spare; with the bench's policy
    (every field set, at values never reached) unless ``policy`` is False."""
    return subprocess.run(relay_cmd("keys", "create", "--quota", str(10**15), *(POLICY if policy else ()),
                                    "--mongodb-uri", uri), capture_output=True, text=True, check=True).stdout.strip()


def relay_config(fake_port: int, leases: bool, explicit: bool = False) -> str:
    """A minimal file: each mode's upstream (two keys, so that affinity ranks them) and prices."""
    ups = "".join(f"""
  - name: {m.upstream}
    base_url: http://127.0.0.1:{fake_port}/{m.upstream}/v1
    keys: [sk-bench-{m.upstream}-1, sk-bench-{m.upstream}-2]
    models: [{m.model}]""" for m in MODES.values())
    return f"""upstreams:{ups}
pricing:
  gpt-4o-mini: {{input: "1/10", output: "2/5"}}
  gpt-4o: {{input: "5/3", output: "20/3"}}
  gpt-4.1-mini: {{input: "4/15", output: "16/15"}}
  gpt-4.1: {{input: "4/3", output: "16/3"}}
""" + ("quota:\n  leases: false\n" if not leases else "quota:\n  leases: true\n" if explicit else "")


def litellm_config(workdir: str, fake_port: int) -> tuple[str, str]:
    """LiteLLM's proxy as the peer: the same models on the same fake upstream, no database, a
    master key of its own (it refuses to start without one). Its path and key."""
    models = "".join(f"""
  - model_name: {m.model}
    litellm_params:
      model: openai/{m.model}
      api_base: http://127.0.0.1:{fake_port}/{m.upstream}/v1
      api_key: sk-bench-{m.upstream}-1""" for m in MODES.values())
    key = "sk-" + os.urandom(32).hex()
    path = os.path.join(workdir, "litellm.yaml")
    with open(path, "w") as fh:
        fh.write(f"model_list:{models}\ngeneral_settings:\n  master_key: {key}\n")
    return path, key


def start_litellm(exe: str, workdir: str, fake_port: int, port: int) -> tuple[subprocess.Popen, str]:
    """``litellm`` (from an environment of its own: it is not one of relay's dependencies) with
    one worker on the proxy's core, as its docs start it; its log to a file."""
    path, key = litellm_config(workdir, fake_port)
    proc = spawn([exe, "--config", path, "--port", str(port), "--num_workers", "1"], cpu=PROXY_CORE,
                 env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"},  # no fetch of the price list at start-up
                 log_path=os.path.join(workdir, "litellm.log"), cwd=workdir)
    return proc, key


class Target:
    def __init__(self, name: str, port: int, pids_fn, headers: dict | None = None):
        self.name, self.port, self.pids_fn = name, port, pids_fn
        self.headers = headers  # its own key's (the rows "bare" and "litellm"), else the bench key's

    def url(self, mode: Mode) -> str:
        if self.name in FLOOR_ROWS:  # the fake itself, or nginx in front of it: the upstream's own path
            return f"http://127.0.0.1:{self.port}/{mode.upstream}{mode.path()}"
        return f"http://127.0.0.1:{self.port}{mode.path()}"


GENERATOR = {"name": "wrk"}


@dataclass
class Cell:
    """One measurement: the generator's result, the target's CPU per request, the store's CPU
    per request (relay rows), the target's peak RSS."""

    result: Result
    cpu: float
    store_cpu: float
    peak: float
    own: dict[float, float] | None = None  # relay rows: relay_overhead_seconds, cumulative count by bound


async def measure(target: Target, mode: Mode, conc: int, seconds: float, headers: dict,
                  store_pid: int | None = None) -> Cell:
    headers = target.headers or headers
    body = json.dumps(mode.body).encode()
    pids = target.pids_fn()
    cpu0 = proc_cpu_seconds(*pids)
    store0 = proc_cpu_seconds(store_pid) if store_pid else 0.0
    peak = [0.0]
    done = asyncio.Event()

    async def sample():
        while not done.is_set():
            peak[0] = max(peak[0], sum(rss_mb(p) for p in pids))
            await asyncio.sleep(0.25)

    sampler = asyncio.ensure_future(sample())
    own0 = buckets(target.port, OWN_TIME) if target.name in RELAY_ROWS else None
    if GENERATOR["name"] == "wrk":
        result = await run_wrk(target.url(mode), body, headers, conc, seconds)
    else:
        result = await drive(target.url(mode), body, headers, None, conc, mode.stream, seconds=seconds, end=mode.end)
    done.set()
    await sampler
    n = max(len(result.latencies), 1)
    cpu = proc_cpu_seconds(*pids) - cpu0
    store = proc_cpu_seconds(store_pid) - store0 if store_pid and target.name in RELAY_ROWS else float("nan")
    own = None
    if own0 is not None:
        own = {le: count - own0.get(le, 0.0) for le, count in buckets(target.port, OWN_TIME).items()}
    return Cell(result, cpu / n * 1000, store / n * 1000, peak[0], own)


async def settle(target: Target, bound: float = 30.0) -> float:
    """Waits until the target's processes are idle (under 4 % of a core for half a second; at most
    ``bound`` seconds) and says how long that took. A proxy still working off requests the
    generator gave up on (LiteLLM's at 64, past wrk's 2 s timeout: up to 64 of them at 11-50 a
    second) would otherwise run on into the next target's cell on the same core."""
    began = time.monotonic()
    pids = target.pids_fn()
    while time.monotonic() - began < bound:
        cpu0 = proc_cpu_seconds(*pids)
        await asyncio.sleep(0.5)
        if proc_cpu_seconds(*pids) - cpu0 < 0.02:
            break
    return time.monotonic() - began


OWN_TIME = "relay_overhead_seconds"  # relay's own time per request: all of it but the upstream's


def buckets(port: int, name: str) -> dict[float, float]:
    """A histogram without labels from relay's /metrics: cumulative count by upper bound."""
    text = metrics_text(port)
    prefix = name + '_bucket{le="'
    return {float(line[len(prefix):].split('"', 1)[0]): float(line.split()[-1])
            for line in text.splitlines() if line.startswith(prefix)}


def quantile_bound(counts: dict[float, float] | None, q: float) -> float:
    """The upper bound (ms) of the bucket where quantile ``q`` falls; nan without counts."""
    if not counts or max(counts.values()) <= 0:
        return float("nan")
    total = counts[float("inf")] if float("inf") in counts else max(counts.values())
    return next(le * 1000 for le, count in sorted(counts.items()) if count >= q * total)


def wrk_command(url: str, body: bytes, headers: dict, conc: int, seconds: float,
                cores: str = OTHER_CORE) -> tuple[list[str], dict]:
    """wrk (C, one thread on ``cores``, a short slice) POSTing ``body`` through wrk_post.lua:
    its command line and environment."""
    script = os.path.join(os.path.dirname(__file__), "wrk_post.lua")
    env = {**os.environ, "RELAY_BENCH_BODY": body.decode(), "RELAY_BENCH_AUTH": headers["Authorization"]}
    return (["taskset", "-c", cores, *with_short_slice(["wrk"]), "-t1", f"-c{conc}", f"-d{max(int(seconds), 1)}s",
             "-s", script, url], env)


def wrk_result(out: str) -> tuple[int, float, float, float, int]:
    """wrk_post.lua's RESULT line: requests, seconds, p50 ms, p99 ms, errors."""
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    _, n, micros, p50, p99, errors = line.split()
    return int(n), int(micros) / 1e6, float(p50), float(p99), int(errors)


async def run_wrk(url: str, body: bytes, headers: dict, conc: int, seconds: float, cores: str = OTHER_CORE) -> Result:
    """wrk: requests/s and latency percentiles; no time to first byte."""
    cmd, env = wrk_command(url, body, headers, conc, seconds, cores)
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    n, took, p50, p99, errors = wrk_result(out.decode())
    # Percentiles stand in for the sample list: the table reads p50, p99 and their count.
    tail = max(n // 50, 1)
    lat = [p50 / 1000] * (n - tail) + [p99 / 1000] * tail
    return Result(lat, [], took, errors)


def merge(cells: list[Cell]) -> Cell:
    lat = [x for c in cells for x in c.result.latencies]
    ttfb = [x for c in cells for x in c.result.ttfbs]
    res = Result(lat, ttfb, sum(c.result.wall for c in cells), sum(c.result.errors for c in cells))
    own = None
    if all(c.own is not None for c in cells):
        own = {le: sum((c.own or {}).get(le, 0.0) for c in cells) for le in (cells[0].own or {})}
    return Cell(res, statistics.median(c.cpu for c in cells), statistics.median(c.store_cpu for c in cells),
                max(c.peak for c in cells), own)


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


async def main(args) -> int:
    GENERATOR["name"] = args.generator
    if not shutil.which("nginx"):
        print("needs nginx (apt-get install nginx-light)")
        return 2
    if args.generator == "wrk" and not shutil.which("wrk"):
        print("needs wrk (apt-get install wrk), or --generator python")
        return 2
    modes = [MODES[m] for m in args.modes.split(",")]
    concurrencies = [int(c) for c in args.conc.split(",")]
    workdir = tempfile.mkdtemp(prefix="relay-proxy-bench-")
    fake_port, nginx_port, relay_port = free_port(), free_port(), free_port()
    procs = []
    try:
        fake = start_fake(fake_port, OTHER_CORE)
        floor = spawn(["nginx", "-c", nginx_conf(workdir, nginx_port, proxy_server_block(nginx_port, fake_port))],
                      cpu=PROXY_CORE)
        procs += [fake, floor]
        from relay.store.embedded import EmbeddedServer
        store = EmbeddedServer(os.path.join(workdir, "store"))
        os.sched_setaffinity(0, {int(OTHER_CORE)})  # the store server (our child) and the load generator
        uri = store.start()
        if args.generator == "python":
            short_slice(0)  # this process is the generator (after the store started: children inherit it)
        # Its bursts of work (each group commit) must not delay the generator and the fake on the
        # same core, nor starve when they keep the core busy (at SCHED_IDLE it did: its answers
        # came too late, and relay's store breaker opened).
        if args.store_priority == "idle":
            idle_priority(store.proc.pid)
        elif args.store_priority == "nice":
            nice(store.proc.pid, 10)
        cfg = os.path.join(workdir, "upstreams.yaml")
        with open(cfg, "w") as fh:
            fh.write(relay_config(fake_port, not args.no_leases, args.explicit_leases))
        # At level info, as in production: one access line per request, written to a file.
        relay = spawn(relay_cmd("serve", "--config", cfg, "--port", str(relay_port), "--mongodb-uri", uri,
                                "--data-dir", workdir, log_level="info"), cpu=PROXY_CORE,
                      log_path=os.path.join(workdir, "relay.log"))
        procs.append(relay)
        ports = [fake_port, nginx_port, relay_port]
        if args.baseline:  # the same relay from another source tree (e.g. a worktree of main), same store
            base_port = free_port()
            base_cmd = relay_cmd("serve", "--config", cfg, "--port", str(base_port), "--mongodb-uri", uri,
                                 "--data-dir", os.path.join(workdir, "base"), log_level="info")
            if args.base_python:  # the same code on another interpreter
                base_cmd[0] = args.base_python
            base = spawn(base_cmd, cpu=PROXY_CORE,
                         log_path=os.path.join(workdir, "relay-base.log"), cwd=os.path.abspath(args.baseline),
                         env={"PYTHONPATH": os.path.abspath(args.baseline)})
            procs.append(base)
            ports.append(base_port)
        if args.litellm:
            litellm_port = free_port()
            peer, peer_key = start_litellm(args.litellm, workdir, fake_port, litellm_port)
            procs.append(peer)
        for port in ports:
            wait_port(port, 60)
        if args.litellm:
            wait_port(litellm_port, 180)
        key = bench_key(uri)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        targets = [Target("direct", fake_port, lambda: [fake.pid]),
                   Target("nginx", nginx_port, lambda: [floor.pid] + child_pids(floor.pid)),
                   Target("relay", relay_port, lambda: [relay.pid])]
        if args.baseline:
            targets.append(Target("base", base_port, lambda: [base.pid]))
        if args.litellm:
            targets.append(Target("litellm", litellm_port, lambda: [peer.pid] + child_pids(peer.pid),
                                  headers={**headers, "Authorization": f"Bearer {peer_key}"}))
        if args.bare_key:  # the same relay, a key without a policy
            bare = bench_key(uri, policy=False)
            targets.append(Target("bare", relay_port, lambda: [relay.pid],
                                  headers={**headers, "Authorization": f"Bearer {bare}"}))
        if args.soak:
            return await soak(targets[2], headers, args.soak, relay.pid, modes, args.rss_budget)
        if args.scaling:
            stop(relay)
            return await scaling(args, cfg, uri, headers, [fake.pid, store.proc.pid], workdir)
        for t in targets:  # warm-up
            for mode in modes:
                await measure(t, mode, 8, 1.0, headers)
                await settle(t)
        load_before = loadavg()
        store_cpu0 = proc_cpu_seconds(store.proc.pid)
        rows = []
        settled: dict[str, float] = {}  # the longest wait for a target to go idle after its cell
        for mode in modes:
            for conc in concurrencies:
                cells: dict[str, list[Cell]] = {t.name: [] for t in targets}
                for _ in range(args.rounds):
                    for t in targets:
                        cells[t.name].append(await measure(t, mode, conc, args.seconds, headers, store.proc.pid))
                        settled[t.name] = max(settled.get(t.name, 0.0), await settle(t))
                if os.environ.get("BENCH_VERBOSE"):
                    print(mode.upstream, conc, {k: [(round(c.result.rps), round(c.result.p99, 2), round(c.cpu, 3))
                                                    for c in v] for k, v in cells.items()}, flush=True)
                direct = merge(cells["direct"])
                for t in targets:
                    rows.append((mode, conc, t.name, merge(cells[t.name]), direct))
        store_cpu = proc_cpu_seconds(store.proc.pid) - store_cpu0
        print(f"relay with quota.leases: {not args.no_leases}; load generator: {args.generator}; {args.rounds} x "
              f"{args.seconds:g} s per cell; load average {load_before} before, {loadavg()} after")
        print_table(rows)
        print("after a cell, each target was left to go idle before the next began; the longest waits: "
              + ", ".join(f"{name} {waited:.1f} s" for name, waited in settled.items()))
        total_relay = sum(len(r[3].result.latencies) for r in rows if r[2] in RELAY_ROWS)
        print(f"store server (separate process, core {OTHER_CORE}, {args.store_priority} priority): {store_cpu:.1f} s "
              f"CPU in all, {store_cpu / max(total_relay, 1) * 1000:.3f} ms per relay request; "
              f"RSS {rss_mb(store.proc.pid):.0f} MB")
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


def metrics_text(port: int) -> str:
    import urllib.request
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def metric_value(port: int, name: str) -> float:
    """One unlabelled sample from relay's /metrics."""
    text = metrics_text(port)
    return next((float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")), float("nan"))


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy so far (all cores, from /proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def scaling(args, cfg: str, uri: str, headers: dict, others: list[int], workdir: str) -> int:
    """``--workers N`` against one worker: JSON chats at concurrency 64, with wrk.

    First with the load generator, the fake and the store on a core of their own (the last)
    and relay's workers on the others (on two cores: one worker, then two sharing core 0);
    then with every process free to use every core (relay, wrk, the fake and the store share
    them, so two workers cannot double: the bound the cores allow is printed beside each row,
    from the CPU per request of relay and of everything else measured in that row)."""
    ncpu = os.cpu_count() or 1
    own = str(ncpu - 1)
    relay_cores = ",".join(str(c) for c in range(max(ncpu - 1, 1)))
    allcores = ",".join(str(c) for c in range(ncpu))
    many = max(ncpu - 1, 2)
    layouts = [(f"1 worker on {relay_cores}; wrk etc. on {own}", 1, relay_cores, own),
               (f"{many} workers on {relay_cores}; wrk etc. on {own}", many, relay_cores, own),
               ("1 worker, all cores shared", 1, allcores, allcores),
               (f"{ncpu} workers, all cores shared", max(ncpu, 2), allcores, allcores)]
    mode = MODES["json"]
    print(f"--workers scaling, JSON chat, concurrency 64, {args.rounds} x {args.seconds:.0f} s, {ncpu} cores; "
          f"load average {loadavg()}")
    print(f"{'layout':36} | {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} | {'relay cpu/req':>13} {'rest cpu/req':>12} "
          f"{'cores allow':>11} {'of bound':>8} {'errors':>6}")
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
            body = json.dumps(mode.body).encode()
            await run_wrk(target.url(mode), body, headers, 16, 1.0, other_cores)  # warm-up
            parts = []
            busy0 = machine_busy_seconds()
            for _ in range(args.rounds):
                pids = target.pids_fn()
                cpu0 = proc_cpu_seconds(*pids)
                res = await run_wrk(target.url(mode), body, headers, 64, args.seconds, other_cores)
                parts.append(Cell(res, (proc_cpu_seconds(*pids) - cpu0) / max(len(res.latencies), 1) * 1000,
                                  float("nan"), 0.0))
            busy = machine_busy_seconds() - busy0
            cell = merge(parts)
            res, relay_cpu = cell.result, cell.cpu
            n = max(len(res.latencies), 1)
            rest_cpu = max(busy * 1000 / n - relay_cpu, 0.0)
            cores = len(relay_cores.split(","))
            if other_cores != relay_cores:  # relay's cores are its own
                bound = cores * 1000 / relay_cpu
            else:  # everything shares the cores: they split by CPU per request
                bound = cores * 1000 / (relay_cpu + rest_cpu)
            print(f"{name:36} | {res.rps:7.0f} {res.p50:7.2f} {res.p99:7.2f} | {relay_cpu:13.3f} {rest_cpu:12.3f} "
                  f"{bound:11.0f} {res.rps / bound:8.0%} {res.errors:6d}")
        finally:
            stop(relay)
    return 0


def print_table(rows) -> None:
    print(f"{'mode':9} {'conc':>4} {'target':7} | {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'own p99':>7} "
          f"{'ttfb p50':>8} {'added p50':>9} | {'cpu/req ms':>10} {'store ms':>8} {'peak RSS MB':>11} {'errors':>6}")
    for mode, conc, name, cell, direct in rows:
        res = cell.result
        added = res.p50 - direct.result.p50 if name != "direct" else 0.0
        store = f"{cell.store_cpu:8.3f}" if cell.store_cpu == cell.store_cpu else f"{'':8}"
        own = quantile_bound(cell.own, 0.99)
        own_p99 = f"{'<=' + format(own, 'g'):>7}" if own == own else f"{'':7}"
        print(f"{mode.upstream if mode.upstream != 'rstream' else 'responses':9} {conc:>4} {name:7} | "
              f"{res.rps:7.0f} {res.p50:7.2f} {res.p99:7.2f} {own_p99} {res.ttfb50:8.2f} {added:9.2f} | "
              f"{cell.cpu:10.3f} {store} {cell.peak:11.1f} {res.errors:6d}")
    print("direct = the lean fake upstream itself (its cpu/req is the fake's own cost); cpu/req for nginx, relay "
          "and litellm is the proxy's process tree on core 0; store ms = the store server's CPU per request of that "
          "row; own p99 = relay's own time (all but the wait for the upstream), from its relay_overhead_seconds "
          "histogram: the bucket bound p99 falls under")


async def soak(target: Target, headers: dict, seconds: float, pid: int, modes: list[Mode], budget: float) -> int:
    """Moderate mixed load (every mode in turn) for ``seconds``; RSS and open fds sampled once a second."""
    samples = []
    stop_at = time.monotonic() + seconds

    async def load():
        while time.monotonic() < stop_at:
            for mode in modes:
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
    most = max(s[0] for s in samples)
    print(f"soak {seconds:.0f} s ({', '.join(m.upstream for m in modes)} in turn, concurrency 16), {len(samples)} "
          f"samples: RSS {first:.1f} -> {last:.1f} MB (max {most:.1f}, budget {budget:.0f}); "
          f"open fds {fds_first:.0f} -> {fds_last:.0f}")
    print("RSS by minute (MB): " + " ".join(f"{samples[i][0]:.1f}" for i in range(0, len(samples), 60)))
    grew = last - first > 5 or fds_last - fds_first > 20
    over = most > budget
    print("FAIL: growth" if grew else "FAIL: over the RSS budget" if over else "ok: flat, within budget")
    return 1 if grew or over else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="json,stream,responses,tools",
                        help="comma-separated, of: " + ", ".join(MODES))
    parser.add_argument("--conc", default="1,64", help="concurrencies, comma-separated")
    parser.add_argument("--soak", type=float, default=0.0, help="run the soak for this many seconds instead")
    parser.add_argument("--rss-budget", type=float, default=100.0, help="MB the soak allows relay's process")
    parser.add_argument("--generator", choices=("python", "wrk"), default="wrk",
                        help="wrk (lean, C; no TTFB) or python (aiohttp; records time to first byte, but takes "
                             "its core whole at high concurrency)")
    parser.add_argument("--store-priority", choices=("nice", "idle", "normal"), default="nice",
                        help="the store server's scheduling on core 1: nice 10 (default), SCHED_IDLE, or normal")
    parser.add_argument("--scaling", action="store_true",
                        help="--workers N against one worker (JSON, concurrency 64) instead of the table")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also measure relay from this source tree (a checkout of an earlier commit), "
                             "interleaved with this one: the row 'base'")
    parser.add_argument("--base-python", metavar="EXE",
                        help="with --baseline: the interpreter the row 'base' runs on (e.g. another build of Python "
                             "with relay's dependencies installed)")
    parser.add_argument("--litellm", metavar="EXE",
                        help="also LiteLLM's proxy as the peer (the row 'litellm'): the `litellm` command of an "
                             "environment of its own (pip install 'litellm[proxy]'), one worker, no database")
    parser.add_argument("--bare-key", action="store_true",
                        help="also the row 'bare': the same relay, with a key without a policy")
    parser.add_argument("--explicit-leases", action="store_true",
                        help="write quota.leases: true into the file (for a --baseline from before leases were the "
                             "default, which read a file without it as one store round trip per request)")
    parser.add_argument("--no-leases", action="store_true",
                        help="one reservation and one settlement in the store per request (quota.leases: false)")
    sys.exit(asyncio.run(main(parser.parse_args())))
