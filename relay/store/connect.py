"""Opening the store: a MongoDB URI or the embedded server, through PyMongo async or motor.

Both drivers share the surface the store uses (find_one, update_one, find().to_list,
find_one_and_update, insert_many); ``RELAY_MONGO_CLIENT`` / ``--mongo-client`` chooses.
PyMongo's async client is the default: it was faster on the embedded server
(bench/store_clients.py) and motor is deprecated in its favour.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.store.embedded import EmbeddedServer, StoreAlreadyRunning, StoreUnreachable, wait_for_running
from relay.store.mongo import MongoStore

CLIENTS = ("pymongo", "motor")
DEFAULT_CLIENT = "pymongo"


def make_client(uri: str, kind: str = DEFAULT_CLIENT) -> Any:
    """A PyMongo ``AsyncMongoClient`` or a motor ``AsyncIOMotorClient`` (motor is untyped)."""
    # Short timeouts: with the store down, a request gets its 503 in about two seconds.
    opts: dict[str, Any] = {"serverSelectionTimeoutMS": 2000, "connectTimeoutMS": 2000, "socketTimeoutMS": 10000,
                            "tz_aware": False}
    if kind == "pymongo":
        from pymongo import AsyncMongoClient
        return AsyncMongoClient(uri, **opts)
    if kind == "motor":
        from motor.motor_asyncio import AsyncIOMotorClient
        return AsyncIOMotorClient(uri, **opts)
    raise ValueError(f"unknown mongo client {kind!r} (choose from {', '.join(CLIENTS)})")


async def close_client(client: Any) -> None:
    result = client.close()
    if inspect.isawaitable(result):  # PyMongo's async close is a coroutine, motor's is not
        await result


def database_name(uri: str) -> str:
    """The database named in the URI's path, as MongoDB tools read it; "relay" when none."""
    from pymongo.uri_parser import parse_uri
    return parse_uri(uri).get("database") or "relay"


async def open_store(uri: str, kind: str = DEFAULT_CLIENT) -> MongoStore:
    client = make_client(uri, kind)
    store = MongoStore(client, database_name(uri))
    await store.ensure_indexes()
    return store


@dataclass
class StoreLocation:
    """Where the store is: a URI, and the embedded server this process started, if any."""

    uri: str
    embedded: EmbeddedServer | None = None
    data_dir: str | None = None  # the embedded store's directory (None: a MongoDB URI)

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


def locate_store(mongodb_uri: str | None, data_dir: str,
                 on_give_up: Callable[[], None] | None = None) -> StoreLocation:
    """MONGODB_URI if given; else the embedded server on data_dir (reach a running one, or start it).

    ``on_give_up`` runs if a server started here dies and cannot be brought back.
    """
    uri = mongodb_uri or os.environ.get("MONGODB_URI")
    if uri:
        return StoreLocation(uri)
    # Never open the directory twice: whoever holds store.lock runs its server. Losing the
    # race for the lock to another process means reaching that process's server instead.
    for _ in range(3):
        existing = wait_for_running(data_dir)
        if existing:
            return StoreLocation(existing, data_dir=os.path.abspath(data_dir))
        server = EmbeddedServer(data_dir, on_give_up)
        try:
            return StoreLocation(server.start(), server, server.data_dir)
        except StoreAlreadyRunning:
            continue
    raise StoreUnreachable(f"the embedded store in {os.path.abspath(data_dir)} changes hands too often to be reached")
