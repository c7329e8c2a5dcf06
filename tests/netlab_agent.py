"""The client host's agent: OpenAI clients in the client's namespace, reaching relay by the
names its own /etc/hosts gives (the primary and the backup), driven by the tests.

    ip netns exec <client ns> python -m tests.netlab_agent

Commands, one JSON line each on stdin, answered on stdout with the same "id" (several may run
at once). Times are ``time.monotonic()``, which every process on the machine shares.

    {"op": "chat", "url": U, "key": K, "n": N | "seconds": S, "concurrency": C | "rate": R,
     "stop_after_refusals": M}
        chats (gpt-4, max_tokens 10): N of them or for S seconds; C at a time one after another
        (closed loop), or R per second whatever the answers (open loop); a closed loop stops
        after M answers in a row that are 429 or 401. Answers each as [sent, status, ms, id].
    {"op": "fetch", "url": U, "method": M, "headers": H, "body": B}
    {"op": "change_then_until", "change": {fetch}, "url": U, "key": K, "code": C, "within": S}
        the change (an admin call), then chats with U one after another until one answers C:
        how long after the change's answer that was.
    {"op": "failover", "primary": U, "backup": U, "key": K, "seconds": S, "rate": R}
        the OpenAI Python client, R chats a second to the primary; on a connection error the
        client switches to the backup and asks it again at once.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

CHAT = {"model": "gpt-4", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
REFUSED = (401, 429)


async def chat_once(session: aiohttp.ClientSession, url: str, key: str, timeout: float) -> list[Any]:
    sent = time.monotonic()
    started = time.perf_counter()
    try:
        async with session.post(url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            status, rid = resp.status, resp.headers.get("X-Request-Id")
    except TimeoutError:
        status, rid = 599, None  # no answer within the timeout
    except aiohttp.ClientError:
        status, rid = 598, None  # connection refused or broken
    return [sent, status, (time.perf_counter() - started) * 1000, rid]


async def chat(cmd: dict[str, Any]) -> dict[str, Any]:
    url, key, timeout = cmd["url"], cmd["key"], cmd.get("timeout", 30)
    n, seconds = cmd.get("n"), cmd.get("seconds")
    results: list[list[Any]] = []
    begun = 0
    connector = aiohttp.TCPConnector(limit=cmd.get("concurrency", 100))
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic()

        def more() -> bool:
            return (n is None or begun < n) and (seconds is None or time.monotonic() - start < seconds)

        if "rate" in cmd:  # open loop: a request every 1/rate seconds, whatever the answers
            tasks = []
            while more():
                tasks.append(asyncio.ensure_future(chat_once(session, url, key, timeout)))
                begun += 1
                await asyncio.sleep(max(0.0, start + begun / cmd["rate"] - time.monotonic()))
            results = list(await asyncio.gather(*tasks))
        else:
            stop_after = cmd.get("stop_after_refusals")
            refusals = 0

            async def worker() -> None:
                nonlocal begun, refusals
                while more() and (stop_after is None or refusals < stop_after):
                    begun += 1
                    r = await chat_once(session, url, key, timeout)
                    results.append(r)
                    refusals = refusals + 1 if r[1] in REFUSED else 0

            await asyncio.gather(*(worker() for _ in range(cmd.get("concurrency", 1))))
    return {"results": results}


async def fetch(cmd: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.request(cmd.get("method", "GET"), cmd["url"], headers=cmd.get("headers", {}),
                                   data=cmd.get("body"), timeout=aiohttp.ClientTimeout(total=30)) as resp:
            body = await resp.text()
            return {"status": resp.status, "headers": dict(resp.headers), "body": body,
                    "ms": (time.perf_counter() - started) * 1000, "at": time.monotonic()}


async def change_then_until(cmd: dict[str, Any]) -> dict[str, Any]:
    changed = await fetch(cmd["change"])
    codes = []
    async with aiohttp.ClientSession() as session:
        while True:
            r = await chat_once(session, cmd["url"], cmd["key"], 10)
            codes.append(r[1])
            if r[1] == cmd["code"]:
                return {"change": changed["status"], "after_s": time.monotonic() - changed["at"], "codes": codes}
            if time.monotonic() - changed["at"] > cmd.get("within", 10):
                return {"change": changed["status"], "after_s": None, "codes": codes}


async def failover(cmd: dict[str, Any]) -> dict[str, Any]:
    from openai import APIConnectionError, APIStatusError, AsyncOpenAI
    clients = {name: AsyncOpenAI(base_url=cmd[name] + "/v1", api_key=cmd["key"], max_retries=0, timeout=5)
               for name in ("primary", "backup")}
    using, results = "primary", []
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < cmd["seconds"]:
        while True:
            sent = time.monotonic()
            try:
                raw = await clients[using].chat.completions.with_raw_response.create(**CHAT)
                results.append([sent, using, raw.status_code, time.monotonic() - sent,
                                raw.headers.get("x-request-id")])
            except APIConnectionError as exc:
                results.append([sent, using, type(exc).__name__, time.monotonic() - sent, None])
                if using == "primary":
                    using = "backup"  # the client's own rule: the primary is gone, use the backup
                    continue          # and ask again, at once
            except APIStatusError as exc:
                results.append([sent, using, exc.status_code, time.monotonic() - sent, None])
            break
        i += 1
        await asyncio.sleep(max(0.0, start + i / cmd["rate"] - time.monotonic()))
    for client in clients.values():
        await client.close()
    return {"results": results}


OPS = {"chat": chat, "fetch": fetch, "change_then_until": change_then_until, "failover": failover}


async def run(cmd: dict[str, Any]) -> None:
    try:
        if cmd.get("op") == "ping":
            reply: dict[str, Any] = {}
        else:
            reply = await OPS[cmd["op"]](cmd)
    except Exception as exc:  # reported to the test, which fails with it
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({"id": cmd.get("id"), **reply}), flush=True)


async def main() -> None:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    running = set()
    while line := await commands.readline():
        task = asyncio.ensure_future(run(json.loads(line)))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.gather(*running)


if __name__ == "__main__":
    asyncio.run(main())
