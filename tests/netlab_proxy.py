"""The links between relay hosts and the store, as a TCP proxy on the store's host, with delay
and jitter set on command (netem is not available on this machine; see tests/netlab.py).

    python -m tests.netlab_proxy --to 198.18.2.2:27017 --link a=198.18.2.2:27101 --link b=...

Each ``--link NAME=ADDR:PORT`` listens on ADDR:PORT and forwards to ``--to``. Commands, one JSON
line each on stdin, answered on stdout with the same "id":

    {"id": 1, "link": "a", "delay_ms": 20, "jitter_ms": 5}   every byte on link a, both ways,
                                                             waits 20 ± 5 ms (uniform)
    {"id": 2, "link": "a", "delay_ms": 0}                     no delay
    {"id": 3, "op": "ping"}

Bytes keep their order (TCP's): a chunk never overtakes the one before it, so jitter stretches
a stream, it does not reorder it. Connections already open take the new delay at once.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys


class Link:
    def __init__(self, name: str, rng: random.Random):
        self.name = name
        self.rng = rng
        self.delay_s = 0.0
        self.jitter_s = 0.0
        self.connections = 0

    def delay(self) -> float:
        if self.delay_s <= 0:
            return 0.0
        return max(0.0, self.delay_s + self.rng.uniform(-self.jitter_s, self.jitter_s))


async def pipe(link: Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        try:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    sender = asyncio.ensure_future(deliver())
    last_due = 0.0
    try:
        while True:
            data = await src.read(65536)
            due = max(loop.time() + link.delay(), last_due)  # never before the chunk ahead of it
            last_due = due
            queue.put_nowait((due, data))
            if not data:
                break
    except (ConnectionError, OSError):
        queue.put_nowait((0.0, b""))
    await sender


async def serve_link(link: Link, host: str, port: int, to_host: str, to_port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(to_host, to_port)
        except OSError:
            writer.close()
            return
        link.connections += 1
        await asyncio.gather(pipe(link, reader, up_writer), pipe(link, up_reader, writer))

    return await asyncio.start_server(handle, host, port)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--to", required=True)
    parser.add_argument("--link", action="append", default=[])
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    to_host, to_port = args.to.rsplit(":", 1)
    rng = random.Random(args.seed)
    links: dict[str, Link] = {}
    servers = []
    for spec in args.link:
        name, where = spec.split("=", 1)
        host, port = where.rsplit(":", 1)
        links[name] = Link(name, rng)
        servers.append(await serve_link(links[name], host, int(port), to_host, int(to_port)))

    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    while line := await commands.readline():
        cmd = json.loads(line)
        reply: dict[str, object] = {"id": cmd.get("id")}
        if cmd.get("op") == "ping":
            reply["links"] = {n: link.connections for n, link in links.items()}
        elif cmd.get("link") in links:
            link = links[cmd["link"]]
            link.delay_s = cmd.get("delay_ms", 0) / 1000
            link.jitter_s = cmd.get("jitter_ms", 0) / 1000
        else:
            reply["error"] = f"unknown command {cmd}"
        print(json.dumps(reply), flush=True)
    for server in servers:
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
