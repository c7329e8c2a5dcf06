"""relay's CPU per streamed request: a 20-event Responses API stream against a 20-chunk chat stream.

One run, rounds interleaved: relay alone on core 0; the load generator, a lean upstream (canned
replies from a bare asyncio protocol: bench/lean_upstream.py's chat stream, and its Responses
stream of 20 typed events as OpenAI sends them) and the embedded store (idle priority) on
core 1. Printed per kind: requests/s, p50, relay's CPU per request, and the ratio to chat.
A Responses request with ``store`` on also records who owns the response (written in groups).

    python bench/responses_stream.py [--seconds 4] [--rounds 3] [--concurrency 8]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp

sys.path.insert(0, os.path.dirname(__file__))
from common import free_port, idle_priority, proc_cpu_seconds, relay_cmd, spawn, stop, wait_port  # noqa: E402
from lean_upstream import REPLIES  # noqa: E402

PROXY_CORE, OTHER_CORE = "0", "1"


class Upstream(asyncio.Protocol):
    reply = {"chat": REPLIES["stream"], "responses": REPLIES["rstream"], "models": REPLIES["models"]}

    def connection_made(self, transport):
        self.transport, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].decode("latin-1")
            length = next((int(v) for n, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
                           if n.lower() == "content-length"), 0)
            if len(self.buf) < end + 4 + length:
                return
            path = head.split(" ", 2)[1]
            self.buf = self.buf[end + 4 + length:]
            kind = "models" if path.endswith("/models") else "responses" if "/responses" in path else "chat"
            self.transport.write(self.reply[kind])


def config(port: int) -> str:
    return f"""
upstreams:
  - {{name: lean, base_url: 'http://127.0.0.1:{port}/v1', keys: [sk-bench-1]}}
pricing:
  "*": {{input: 1, output: 1}}
quota: {{default_max_tokens: 64}}
"""


async def drive(url: str, body: bytes, headers: dict, conc: int, seconds: float, end: bytes) -> tuple[list, int]:
    lat, errors = [], 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as session:
        async def worker():
            nonlocal errors
            while time.perf_counter() < deadline:
                t0, tail = time.perf_counter(), b""
                async with session.post(url, data=body, headers=headers) as resp:
                    async for chunk in resp.content.iter_any():
                        tail = (tail + chunk)[-4096:]
                if resp.status != 200 or end not in tail:
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t0)
        await asyncio.gather(*(worker() for _ in range(conc)))
    return lat, errors


async def main(args) -> int:
    workdir = tempfile.mkdtemp(prefix="relay-responses-bench-")
    up_port, relay_port = free_port(), free_port()
    procs = []
    try:
        os.sched_setaffinity(0, {int(OTHER_CORE)})
        upstream = spawn([sys.executable, __file__, "--upstream", str(up_port)], cpu=OTHER_CORE)
        procs.append(upstream)
        from relay.store.embedded import EmbeddedServer
        store = EmbeddedServer(os.path.join(workdir, "store"))
        uri = store.start()
        idle_priority(store.proc.pid)
        cfg = os.path.join(workdir, "upstreams.yaml")
        with open(cfg, "w") as fh:
            fh.write(config(up_port))
        relay = spawn(relay_cmd("serve", "--config", cfg, "--port", str(relay_port), "--mongodb-uri", uri,
                                "--data-dir", workdir, log_level="info"), cpu=PROXY_CORE,
                      log_path=os.path.join(workdir, "relay.log"))
        procs.append(relay)
        for port in (up_port, relay_port):
            wait_port(port, 60)
        key = subprocess.run(relay_cmd("keys", "create", "--quota", str(10**15), "--mongodb-uri", uri),
                             capture_output=True, text=True, check=True).stdout.strip()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        base = f"http://127.0.0.1:{relay_port}/v1"
        kinds = {
            "chat, 20 chunks": (base + "/chat/completions", {"model": "gpt-4o", "stream": True, "max_tokens": 64,
                                                             "messages": [{"role": "user", "content": "Say hi"}]},
                                b"data: [DONE]"),
            "responses, 20 events": (base + "/responses", {"model": "gpt-4o", "stream": True,
                                                           "max_output_tokens": 64, "input": "Say hi"},
                                     b"event: response.completed"),
            "responses, store: false": (base + "/responses", {"model": "gpt-4o", "stream": True, "store": False,
                                                              "max_output_tokens": 64, "input": "Say hi"},
                                        b"event: response.completed"),
        }
        rows: dict[str, list[tuple[float, float, float, int]]] = {k: [] for k in kinds}
        for url, body, end in kinds.values():  # warm-up
            await drive(url, json.dumps(body).encode(), headers, args.concurrency, 1.0, end)
        for _ in range(args.rounds):
            for kind, (url, body, end) in kinds.items():
                cpu0 = proc_cpu_seconds(relay.pid)
                t0 = time.perf_counter()
                lat, errors = await drive(url, json.dumps(body).encode(), headers, args.concurrency, args.seconds, end)
                wall = time.perf_counter() - t0
                cpu = proc_cpu_seconds(relay.pid) - cpu0
                rows[kind].append((len(lat) / wall, statistics.median(lat) * 1000, cpu / max(len(lat), 1) * 1000,
                                   errors))
        chat_cpu = statistics.median(r[2] for r in rows["chat, 20 chunks"])
        print(f"concurrency {args.concurrency}, {args.rounds} rounds of {args.seconds} s each, medians over rounds")
        print(f"{'kind':<26}{'req/s':>8}{'p50 ms':>9}{'CPU ms/req':>12}{'vs chat':>9}{'errors':>8}")
        for kind, rs in rows.items():
            cpu = statistics.median(r[2] for r in rs)
            print(f"{kind:<26}{statistics.median(r[0] for r in rs):>8.0f}{statistics.median(r[1] for r in rs):>9.2f}"
                  f"{cpu:>12.3f}{cpu / chat_cpu:>8.2f}x{sum(r[3] for r in rs):>8}")
        store.stop()
        return 0
    finally:
        for p in procs:
            stop(p)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.upstream:
        async def serve(port: int) -> None:
            server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", port, backlog=1024)
            async with server:
                await server.serve_forever()
        asyncio.run(serve(a.upstream))
    else:
        sys.exit(asyncio.run(main(a)))
