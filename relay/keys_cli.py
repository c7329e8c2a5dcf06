"""``relay keys ...``: key management from the shell, against the same store as serve."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from relay.errors import RelayError
from relay.keys import DISPLAY_PREFIX_LEN, key_view, reserved_parts
from relay.store.connect import close_client, open_store
from relay.store.mongo import MongoStore


async def run_keys_command(args: argparse.Namespace, store_uri: str) -> int:
    store = await open_store(store_uri, args.mongo_client)
    try:
        return await _run(args, store)
    except LookupError:
        given = args.key if len(args.key) <= DISPLAY_PREFIX_LEN else args.key[:DISPLAY_PREFIX_LEN] + "..."
        print(f"relay keys: no key matches {given!r} (`relay keys list` shows every key's prefix)", file=sys.stderr)
        return 1
    except RelayError as exc:
        print(f"relay keys: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await close_client(store.client)


async def _run(args: argparse.Namespace, store: MongoStore) -> int:
    cmd = args.keys_command
    if cmd == "create":
        key, doc = await store.create_key(args.quota, args.note)
        print(key)
        print(f"# shown once: store it now. prefix {doc['prefix']}, quota {doc['granted']}", file=sys.stderr)
        return 0
    if cmd == "list":
        print(f"{'prefix':12} {'status':9} {'granted':>12} {'used':>12} {'available':>12}  note")
        for doc in await store.list_keys():
            v = key_view(doc)
            print(f"{v['prefix']:12} {v['status']:9} {v['granted']:>12} {v['used']:>12} {v['available']:>12}  "
                  f"{v['note']}")
        return 0
    doc = await store.resolve(args.key)
    if cmd == "topup":
        doc = await store.topup(doc["_id"], args.quota)
    elif cmd in ("disable", "enable"):
        doc = await store.set_status(doc["_id"], "disabled" if cmd == "disable" else "active")
    print(json.dumps(key_view(doc), indent=2))
    for line in explain(doc):
        print(line, file=sys.stderr)
    return 0


def explain(doc: dict[str, Any]) -> list[str]:
    """A line for each number of the view that a reader could take for something else."""
    lines = []
    sliced, in_flight = reserved_parts(doc)
    if sliced:
        lines.append(f"reserved: {sliced} units held by relay processes as a slice, returned when idle")
    if in_flight:
        lines.append(f"reserved: {in_flight} units held by requests in flight, settled when they end")
    if doc["balance"] < 0:
        lines.append(f"balance: overdrawn by {-doc['balance']} units (a request cost more than was left, "
                     "as docs/quota.md allows); a top-up pays that first")
    return lines
