"""An in-process key store: for tests and for trying relay without a database."""
from __future__ import annotations

from relay.keys import display_prefix, hash_key
from relay.store.base import KeyRecord


class MemoryKeyStore:
    def __init__(self) -> None:
        self._keys: dict[str, KeyRecord] = {}

    def add(self, key: str, status: str = "active", note: str = "") -> KeyRecord:
        record = KeyRecord(hash_key(key), display_prefix(key), status, note)
        self._keys[record.key_hash] = record
        return record

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        return self._keys.get(key_hash)
