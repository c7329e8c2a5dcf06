"""``relay codes ...``: top-up codes from the shell (create, list, disable), against the same
store as serve."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from relay.codes import MAX_COUNT, code_view
from relay.errors import RelayError
from relay.store.connect import close_client, open_store
from relay.store.mongo import MongoStore


def add_codes_parser(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                     store_options: Callable[[argparse.ArgumentParser], None]) -> None:
    codes = sub.add_parser("codes", help="top-up codes: create, list, disable")
    store_options(codes)
    cmds = codes.add_subparsers(dest="codes_command", required=True)
    create = cmds.add_parser("create", help="make single-use top-up codes (printed once)")
    create.add_argument("--quota", type=int, required=True, help="units each code grants")
    create.add_argument("--count", type=int, default=1, help=f"how many (1 to {MAX_COUNT}; default 1)")
    create.add_argument("--note", default="", help="the operator's note (a batch, a shop)")
    create.add_argument("--new-keys", action="store_true", help="mint funded keys instead of codes")
    cmds.add_parser("list", help="every code: prefix, status, quota, created, redeemed and by which key")
    disable = cmds.add_parser("disable", help="disable a code not yet redeemed, by the code or its prefix")
    disable.add_argument("code")
    for p in cmds.choices.values():
        store_options(p)


async def run_codes_command(args: argparse.Namespace, store_uri: str) -> int:
    store = await open_store(store_uri, args.mongo_client)
    try:
        return await _run(args, store)
    except LookupError:
        print("no code matches that code or prefix", file=sys.stderr)
        return 1
    except RelayError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    finally:
        await close_client(store.client)


async def _run(args: argparse.Namespace, store: MongoStore) -> int:
    cmd = args.codes_command
    if cmd == "create":
        if not 1 <= args.count <= MAX_COUNT:
            print(f"--count must be from 1 to {MAX_COUNT}", file=sys.stderr)
            return 2
        if args.new_keys:
            for _ in range(args.count):
                key, _doc = await store.create_key(args.quota, args.note)
                print(key)
            what = "keys"
        else:
            for code in await store.create_codes(args.quota, args.count, args.note):
                print(code)
            what = "codes"
        print(f"# shown once: store them now. {args.count} {what} of {args.quota} units each", file=sys.stderr)
        return 0
    if cmd == "list":
        print(f"{'prefix':12} {'status':9} {'quota':>12}  {'created':20}  {'redeemed':20}  {'key':11} note")
        for doc in await store.list_codes():
            v = code_view(doc)
            print(f"{v['prefix']:12} {v['status']:9} {v['quota']:>12}  {v['created_at'] or '-':20}  "
                  f"{v['redeemed_at'] or '-':20}  {v['redeemed_by'] or '-':11} {v['note']}")
        return 0
    doc = await store.resolve_code(args.code)
    print(json.dumps(code_view(await store.disable_code(doc["_id"])), indent=2))
    return 0

