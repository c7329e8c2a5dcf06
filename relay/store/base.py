"""The store's contract, shared by the in-memory and MongoDB stores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from relay.policy import Policy


@dataclass(frozen=True)
class KeyRecord:
    key_hash: str
    prefix: str
    status: str  # "active" or "disabled"
    note: str = ""
    policy: Policy | None = None  # models, expiry, rate limits, addresses (relay/policy.py)

    @property
    def active(self) -> bool:
        return self.status == "active"


class KeyStore(Protocol):
    async def find_key(self, key_hash: str) -> KeyRecord | None: ...
