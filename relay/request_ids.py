"""Request ids: ``req_`` and 16 random hex digits, as ``secrets.token_hex(8)`` makes them.

A request id is its ledger entry's ``_id`` and its reservation's name, in a store that several
hosts and workers share, so it stays 64 random bits from the operating system's generator. Read
512 ids' worth at a time: one ``getrandom`` call per request was 1.8 % of a proxied chat's
samples (py-spy). A forked worker starts with an empty pool, never its parent's ids.
"""
from __future__ import annotations

import os

_IDS_PER_READ = 512
_HEX_PER_ID = 16

_pool = ""
_at = 0


def new_request_id() -> str:
    global _pool, _at
    at = _at
    if at >= len(_pool):
        _pool, at = os.urandom(_IDS_PER_READ * _HEX_PER_ID // 2).hex(), 0
    _at = at + _HEX_PER_ID
    return "req_" + _pool[at:at + _HEX_PER_ID]


def _forget_pool() -> None:
    global _pool, _at
    _pool, _at = "", 0


os.register_at_fork(after_in_child=_forget_pool)
