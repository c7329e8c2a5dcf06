"""Per-key rate limits (``rpm``, ``tpm``, ``max_concurrency``), held across every relay process
on one store without a store round trip per request.

**Buckets.** ``rpm`` and ``tpm`` are token buckets, as OpenAI describes its own limits: the
capacity is the limit, refilled continuously at the limit per minute (a burst of up to N, then
N a minute: one request every 60/N s). Each limited key's buckets live in one document in the
store (relay/store/limits.py). A process takes a *chunk* of a bucket into memory with one
compare-and-set of that document and admits requests from it locally: a chunk covers eight
requests like the one that asked, or half a second of the key's recent traffic in this
process when that is more, and at most a tenth of the limit; when half of it is spent the
next is taken in the background. A chunk is spendable for ``HOLD_S`` after it was taken; what
is left then goes back to the store's bucket, and so do the tokens a request was counted for
but did not use: ``tpm`` counts the prompt plus the completion allowance when a request is
admitted and its actual prompt and completion tokens when it ends (a refunded request: none);
what a request used beyond what it was counted for is taken from the store's bucket too, which
may then go below zero (at most one limit's worth) until its refill pays that debt.

**Tolerance.** Every request admitted spent units taken from the one bucket in the store, and
no unit is spent later than ``HOLD_S`` after it was taken; units held outside the bucket are
the only way past it, and the bucket refills by at most limit × HOLD_S / 60 while they are
out. So over any T seconds, across all processes, at most limit + limit × (T + HOLD_S) / 60
are admitted: the bucket's own promise plus limit / 60 (one request at ``rpm`` 60). Clocks:
refill is computed in the store's time as each process measures it, and the document's ``at``
never moves back, so an offset between two processes' measurements adds at most its own
length of refill, once.

**Concurrency.** ``max_concurrency`` is shared as slots: each process records in the document
how many it holds (``conc.<process>``: count and a lease that lapses ``SLOT_TTL_S`` after its
last renewal, so a crashed process's slots come back by themselves). A request takes a slot
from what its process holds, and a process takes more from the store (compare-and-set
against every live process's count) only when it has none free: what it needs and as many
again, but never more than a quarter of what would stay free (``slot_headroom``: a ramp to 64
in flight takes 7 compare-and-sets, not 64; under a small limit, exactly what is needed);
slots unused for ``RELEASE_IDLE_S`` go back. Another process thus finds at least three
quarters of what was free when one took its headroom. The tolerance: a process stalled or cut off from the store for
longer than ``SLOT_TTL_S`` may run requests on slots the store gave to another meanwhile.

**Outage.** When the store cannot be reached, each process limits a key on its own, with a
bucket and slots of its own at the key's full limits (up to N times the limit over N
processes) until the store answers again.

A refused request gets 429 ``rate_limit_exceeded`` with ``Retry-After`` (and ``retry-after-ms``)
for when what it lacks should be back; every response of a limited key carries OpenAI's
``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` as this process last saw the buckets.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.errors import RateLimited, StoreUnavailable
from relay.policy import Policy
from relay.store.base import KeyRecord
from relay.store.mongo import MongoStore

log = logging.getLogger("relay.limits")

HOLD_S = 1.0           # a chunk is spendable this long after it was taken; its rest then goes back
CHUNK_REQUESTS = 8     # a chunk covers this many requests like the one that asked for it,
CHUNK_S = 0.5          # or this long of the key's recent traffic in this process,
CHUNK_SHARE = 0.1      # and at most this share of the limit (never less than the request needs)
RATE_WINDOW_S = 0.5    # the recent traffic is measured over windows this long
SLOT_TTL_S = 30.0      # a process's slots lapse this long after their last renewal
RELEASE_IDLE_S = 0.5   # slots this process has not needed for this long go back
SLOT_RETRY_S = 1.0     # Retry-After for a request refused for concurrency
ASK_EVERY_S = 0.1      # a process short of a key's units asks the store again at most this often,
ASK_AGAIN_S = 1.0      # and at least this often (other processes give units back meanwhile)
TICK_S = 0.1           # returns, releases and renewals are sent this often (a debt at once),
GIVE_EVERY_S = 0.5     # units owed back at most this often, unless they make a chunk
FORGET_S = 60.0        # a key idle this long (nothing held, nothing owed) leaves memory
CAS_ATTEMPTS = 10
EPOCH = dt.datetime(1970, 1, 1)
BUCKETS = ("rpm", "tpm")


@dataclass
class Chunk:
    left: float
    expires: float  # monotonic


@dataclass
class Bucket:
    """This process's side of one of a key's buckets."""

    chunks: deque[Chunk] = field(default_factory=deque)
    held: float = 0.0            # Σ chunks' left, kept as they change (the hot path reads it)
    owed: float = 0.0            # to give back to the store's bucket (expired chunks, unused tokens);
                                 # negative: to take from it (tokens used beyond what was counted)
    gave_at: float = -math.inf   # when units were last given back
    blocked_until: float = -math.inf  # the store's bucket lacked ``blocked_lack`` more than this process
    blocked_lack: float = 0.0         # held: requests lacking as much are refused until then
    retry_at: float = -math.inf       # when the store's bucket should have it, by its refill alone
    seen_level: float | None = None   # the store's bucket, as last read (for the headers)
    seen_at: float = 0.0
    last_need: float = 1.0
    rate: float = 0.0            # units spent per second here, over the last window
    window_units: float = 0.0
    window_start: float = 0.0
    alone_level: float | None = None  # while the store is unreachable: a bucket of this process's own
    alone_at: float = 0.0

    def available(self, now: float) -> float:
        chunks = self.chunks
        while chunks and chunks[0].expires <= now:
            left = chunks.popleft().left
            self.owed += left
            self.held -= left
        if not chunks:
            self.held = 0.0  # no rounding left over
        return self.held

    def add(self, amount: float, now: float) -> None:
        self.chunks.append(Chunk(amount, now + HOLD_S))
        self.held += amount

    def take_all(self) -> float:
        held, self.held = self.held, 0.0
        self.chunks.clear()
        return held

    def spend(self, amount: float, now: float) -> None:
        self._count(amount, now)
        self.held -= amount
        chunks = self.chunks
        while amount > 0 and chunks:
            chunk = chunks[0]
            used = min(chunk.left, amount)
            chunk.left -= used
            amount -= used
            if chunk.left <= 0:
                chunks.popleft()

    def target(self, need: float, capacity: int) -> float:
        return max(need, min(max(need * CHUNK_REQUESTS, self.rate * CHUNK_S), capacity * CHUNK_SHARE))

    def estimate(self, capacity: int, now: float) -> float:
        """Units left for this key as this process sees them: the store's bucket as last read,
        refilled since, plus this process's chunks."""
        seen = capacity if self.seen_level is None else \
            self.seen_level + (now - self.seen_at) * capacity / 60.0
        return max(0.0, min(float(capacity), seen + max(self.available(now), 0.0)))

    def _count(self, units: float, now: float) -> None:
        self.window_units += units
        elapsed = now - self.window_start
        if elapsed >= RATE_WINDOW_S:
            self.rate = self.window_units / elapsed if elapsed < 4 * RATE_WINDOW_S else 0.0
            self.window_units, self.window_start = 0.0, now


@dataclass
class KeyLimits:
    """This process's side of one key's limits."""

    key_hash: str
    policy: Policy
    rpm: Bucket = field(default_factory=Bucket)
    tpm: Bucket = field(default_factory=Bucket)
    slots: int = 0               # concurrency slots this process holds in the store
    slots_until: float = 0.0     # store seconds: when the store stops counting them
    in_flight: int = 0
    slots_blocked_until: float = -math.inf
    last_admit: float = 0.0
    doc: dict[str, Any] | None = None  # the store's document as last read or written
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    refilling: asyncio.Task[None] | None = None

    def bucket(self, name: str) -> Bucket:
        return self.rpm if name == "rpm" else self.tpm

    def idle(self) -> bool:
        return not (self.rpm.chunks or self.tpm.chunks or self.rpm.owed or self.tpm.owed or self.slots
                    or self.in_flight)


@dataclass
class Ticket:
    """One admitted request: what it was counted for, given back in part when it ends."""

    key_hash: str
    tokens: float
    slot: bool
    alone: bool = False
    ended: bool = False


class LimitBook:
    def __init__(self, store: MongoStore, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.clock = clock
        self.keys: dict[str, KeyLimits] = {}
        self.on_limited: Callable[[str], None] | None = None  # a refusal, by limit (rpm, tpm, concurrency)

    # --- the request's side -------------------------------------------------------------

    async def admit(self, key: KeyRecord, tokens: int) -> Ticket:
        """Count one request of ``key`` (whose policy is limited) with ``tokens`` tokens, or
        raise RateLimited. Waits for the store only when this process holds too little."""
        assert key.policy is not None
        st = self.keys.get(key.key_hash)
        if st is None:
            st = self.keys[key.key_hash] = KeyLimits(key.key_hash, key.policy)
        elif st.policy is not key.policy and st.policy != key.policy:  # changed: what was concluded is stale
            st.policy = key.policy
            for b in (st.rpm, st.tpm):
                b.blocked_until = b.retry_at = -math.inf
            st.slots_blocked_until = -math.inf
        st.policy = key.policy
        need = _needs(key.policy, tokens)
        for _ in range(3):
            now = self.clock()
            if self._covered(st, need, now):
                return self._spend(key.key_hash, st, need, now)
            self._refuse_if_known(st, need, now)
            async with st.lock:
                if not self._covered(st, need, self.clock()):
                    try:
                        await self._take(key.key_hash, st, need)
                    except StoreUnavailable:
                        return self._alone(key.key_hash, st, need, self.clock())
        raise self._refusal(st, "rpm" if "rpm" in need else "tpm" if "tpm" in need else "concurrency",
                            SLOT_RETRY_S, need)

    def finish(self, ticket: Ticket, used_tokens: int) -> None:
        """The request ended, having used ``used_tokens`` (prompt and completion; 0 when refunded)."""
        if ticket.ended:
            return
        ticket.ended = True
        st = self.keys.get(ticket.key_hash)
        if st is None:
            return
        if ticket.slot:
            st.in_flight -= 1
        if ticket.tokens and not ticket.alone:
            st.tpm.owed += ticket.tokens - used_tokens  # unused: back to the bucket; beyond: taken from it

    def headers(self, key_hash: str) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for a limited key, as this process sees its buckets."""
        st = self.keys.get(key_hash)
        if st is None:
            return {}
        now = self.clock()
        out: dict[str, str] = {}
        policy = st.policy
        if policy.rpm is not None:
            left = st.rpm.estimate(policy.rpm, now)
            out["x-ratelimit-limit-requests"] = str(policy.rpm)
            out["x-ratelimit-remaining-requests"] = str(int(left))
            out["x-ratelimit-reset-requests"] = duration((policy.rpm - left) * 60.0 / policy.rpm)
        if policy.tpm is not None:
            left = st.tpm.estimate(policy.tpm, now)
            out["x-ratelimit-limit-tokens"] = str(policy.tpm)
            out["x-ratelimit-remaining-tokens"] = str(int(left))
            out["x-ratelimit-reset-tokens"] = duration((policy.tpm - left) * 60.0 / policy.tpm)
        return out

    def _covered(self, st: KeyLimits, need: dict[str, float], now: float) -> bool:
        if "concurrency" in need and st.in_flight + 1 > st.slots:
            return False
        policy = st.policy
        return (policy.rpm is None or st.rpm.available(now) >= need["rpm"]) and \
            (policy.tpm is None or st.tpm.available(now) >= need["tpm"])

    def _refuse_if_known(self, st: KeyLimits, need: dict[str, float], now: float) -> None:
        """Refuse at once, without asking the store, a request that cannot be served before the
        store's bucket (or slots) said it would have what it lacks."""
        for name in BUCKETS:
            b = st.bucket(name)
            if name in need and b.blocked_until > now and need[name] - b.available(now) >= b.blocked_lack:
                raise self._refusal(st, name, max(b.blocked_until, b.retry_at) - now, need)
        if "concurrency" in need and st.slots_blocked_until > now and st.in_flight + 1 > st.slots:
            raise self._refusal(st, "concurrency", st.slots_blocked_until - now, need)

    def _spend(self, key_hash: str, st: KeyLimits, need: dict[str, float], now: float) -> Ticket:
        low = False  # a chunk half spent: the next is taken ahead, in the background
        for name, b, capacity in ((("rpm", st.rpm, st.policy.rpm), ("tpm", st.tpm, st.policy.tpm))):
            if capacity is not None:
                amount = need[name]
                b.spend(amount, now)
                b.last_need = amount if amount > 1.0 else 1.0
                low = low or (b.held < b.target(b.last_need, capacity) / 2 and b.blocked_until <= now)
        slot = "concurrency" in need
        if slot:
            st.in_flight += 1
        st.last_admit = now
        if low and st.refilling is None:
            st.refilling = asyncio.ensure_future(self._refill(key_hash, st))
        return Ticket(key_hash, need.get("tpm", 0.0), slot)

    def _alone(self, key_hash: str, st: KeyLimits, need: dict[str, float], now: float) -> Ticket:
        """The store is unreachable: this process limits the key on its own."""
        for name in BUCKETS:
            if name not in need:
                continue
            b, capacity = st.bucket(name), getattr(st.policy, name)
            level = capacity if b.alone_level is None else \
                min(capacity, b.alone_level + (now - b.alone_at) * capacity / 60.0)
            b.alone_level, b.alone_at = level, now
            if level < need[name]:
                raise self._refusal(st, name, (need[name] - level) * 60.0 / capacity, need)
        if "concurrency" in need and st.in_flight + 1 > (st.policy.max_concurrency or 0):
            raise self._refusal(st, "concurrency", SLOT_RETRY_S, need)
        for name in BUCKETS:
            b = st.bucket(name)
            if name in need and b.alone_level is not None:
                b.alone_level -= need[name]
        if "concurrency" in need:
            st.in_flight += 1
        return Ticket(key_hash, need.get("tpm", 0.0), "concurrency" in need, alone=True)

    def _refusal(self, st: KeyLimits, limit: str, wait: float, need: dict[str, float]) -> RateLimited:
        if self.on_limited is not None:
            self.on_limited(limit)
        wait = max(wait, 0.001)
        policy = st.policy
        if limit == "rpm":
            message = f"Rate limit reached for requests on this key: limit {policy.rpm} per minute."
        elif limit == "tpm":
            message = (f"Rate limit reached for tokens on this key: limit {policy.tpm} per minute, requested "
                       f"{int(need.get('tpm', 0))}.")
        else:
            message = f"Too many requests in flight on this key: limit {policy.max_concurrency} at once."
        headers = {**self.headers(st.key_hash), "Retry-After": str(max(1, math.ceil(wait))),
                   "retry-after-ms": str(max(1, math.ceil(wait * 1000)))}
        return RateLimited(f"{message} Please try again in {duration(wait)}.", limit, headers)

    # --- the store's side ----------------------------------------------------------------

    def _seconds(self) -> float:
        return (self.store.now() - EPOCH).total_seconds()

    async def _take(self, key_hash: str, st: KeyLimits, need: dict[str, float], prefetch: bool = False) -> None:
        """Take what this process lacks for ``need`` (with ``prefetch``: tops the chunks up to
        their target, needing nothing) from the store's buckets and slots, all or nothing, by
        compare-and-set. Raises RateLimited when the store lacks it (not with ``prefetch``)."""
        policy = st.policy
        fresh = False  # a shortage is concluded only from a document just read
        for attempt in range(CAS_ATTEMPTS):
            if attempt > 0 or st.doc is None:
                if attempt > 1:
                    await asyncio.sleep(random.uniform(0.001, 0.005))
                st.doc, fresh = await self.store.limits_doc(key_hash), True
            doc = st.doc
            now, at_s = self.clock(), self._seconds()
            fields: dict[str, Any] = {}
            takes: dict[str, tuple[float, float]] = {}
            short: tuple[str, float] | None = None
            for name in BUCKETS:
                capacity = getattr(policy, name)
                if capacity is None or name not in need:
                    continue
                b = st.bucket(name)
                level, since = _level(doc, name, capacity, at_s)
                b.seen_level, b.seen_at = level, now
                have = b.available(now)
                lack = 0.0 if prefetch else need[name] - have
                want = b.target(max(need[name], b.last_need), capacity) - have
                if lack > 0 and level < lack:
                    if short is None:
                        short = (name, (lack - level) * 60.0 / capacity)
                    continue
                take = min(level, max(lack, want))
                if take > 0 and (lack > 0 or take >= want / 2):
                    fields[name] = {"level": level - take, "at": max(at_s, since), "cap": capacity}
                    takes[name] = (take, level - take)
            slots = None
            if "concurrency" in need and not prefetch and st.in_flight + 1 > st.slots:
                conc = {p: s for p, s in ((doc or {}).get("conc") or {}).items() if s["until"] > at_s}
                mine = st.in_flight + 1
                others = sum(s["n"] for p, s in conc.items() if p != self.store.instance_id)
                limit = policy.max_concurrency or 0
                if others + mine > limit:
                    short = short or ("concurrency", SLOT_RETRY_S)
                else:
                    mine += slot_headroom(mine, limit - others - mine)
                    conc[self.store.instance_id] = {"n": mine, "until": at_s + SLOT_TTL_S}
                    fields["conc"], slots = conc, mine
            if short is not None and not fresh:
                st.doc = None
                continue
            if short is not None:
                if not prefetch:
                    name, wait = short
                    if name == "concurrency":
                        st.slots_blocked_until = now + min(wait, 0.25)
                    else:  # refused without asking the store again for a while
                        b = st.bucket(name)
                        wait = max(wait, ASK_EVERY_S)
                        b.blocked_until = now + min(wait, ASK_AGAIN_S)
                        b.retry_at, b.blocked_lack = now + wait, need[name] - b.available(now)
                    raise self._refusal(st, name, wait, need)
                return
            if not fields:
                return
            written = await self.store.limits_cas(key_hash, doc["v"] if doc else 0, fields)
            if written is None:
                st.doc = None  # another process wrote first: read again
                continue
            st.doc = written
            now = self.clock()
            for name, (take, left) in takes.items():
                b = st.bucket(name)
                b.add(take, now)
                b.seen_level, b.seen_at = left, now
            if slots is not None:
                st.slots, st.slots_until = slots, at_s + SLOT_TTL_S
            return
        if not prefetch:  # lost every race: as busy as a refusal
            raise self._refusal(st, "rpm" if "rpm" in need else "tpm" if "tpm" in need else "concurrency",
                                SLOT_RETRY_S, need)

    async def _refill(self, key_hash: str, st: KeyLimits) -> None:
        try:
            async with st.lock:
                need = {n: st.bucket(n).last_need for n in BUCKETS if getattr(st.policy, n) is not None}
                await self._take(key_hash, st, need, prefetch=True)
        except Exception as exc:  # the request that finds the chunk empty asks again
            log.debug("taking a chunk ahead failed (%s)", type(exc).__name__)
        finally:
            st.refilling = None

    async def run(self) -> None:
        """Give back what chunks have left when they lapse and what requests did not use,
        release slots no longer needed, renew the ones held."""
        while True:
            await asyncio.sleep(TICK_S)
            if not self.store.breaker.up:
                continue
            try:
                await self.tick()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("rate limit upkeep failed; retrying")

    async def tick(self, release_all: bool = False) -> None:
        now = self.clock()
        for key_hash, st in list(self.keys.items()):
            give = release_all
            for name in BUCKETS:
                b = st.bucket(name)
                b.available(now)  # lapsed chunks become owed
                give = give or b.owed < 0 or b.owed > 0 and (
                    now - b.gave_at >= GIVE_EVERY_S or b.owed >= b.target(b.last_need, getattr(st.policy, name) or 1))
            release = st.slots > st.in_flight and (release_all or now - st.last_admit >= RELEASE_IDLE_S)
            renew = st.slots > 0 and self._seconds() > st.slots_until - SLOT_TTL_S / 2
            if give or release or renew:
                async with st.lock:
                    await self._give_back(key_hash, st, release, renew)
            elif st.idle() and now - st.last_admit > FORGET_S and not st.lock.locked():
                del self.keys[key_hash]

    async def _give_back(self, key_hash: str, st: KeyLimits, release: bool, renew: bool) -> None:
        owed = {name: st.bucket(name).owed for name in BUCKETS}
        for name in BUCKETS:
            st.bucket(name).owed = 0.0
        keep = st.in_flight if release else st.slots
        st.slots = min(st.slots, keep)  # released slots leave this process before the store hears of it
        try:
            for attempt in range(CAS_ATTEMPTS):
                if attempt > 0 or st.doc is None:
                    st.doc = await self.store.limits_doc(key_hash)
                doc = st.doc
                at_s = self._seconds()
                fields: dict[str, Any] = {}
                for name in BUCKETS:
                    capacity = getattr(st.policy, name)
                    if owed[name] and capacity is not None and doc is not None and name in doc:
                        level, since = _level(doc, name, capacity, at_s)
                        fields[name] = {"level": max(-float(capacity), min(float(capacity), level + owed[name])),
                                        "at": max(at_s, since), "cap": capacity}
                if release or renew:
                    conc = {p: s for p, s in ((doc or {}).get("conc") or {}).items() if s["until"] > at_s}
                    if keep > 0:
                        conc[self.store.instance_id] = {"n": keep, "until": at_s + SLOT_TTL_S}
                    else:
                        conc.pop(self.store.instance_id, None)
                    fields["conc"] = conc
                if not fields:
                    return
                written = await self.store.limits_cas(key_hash, doc["v"] if doc else 0, fields)
                if written is not None:
                    st.doc = written
                    for name in BUCKETS:
                        b = st.bucket(name)
                        b.gave_at = self.clock()
                        if owed[name] > 0:  # the store's bucket has more now: ask it again
                            b.blocked_until = b.retry_at = -math.inf
                    if keep > 0:
                        st.slots_until = at_s + SLOT_TTL_S
                    return
                st.doc = None
        except BaseException:
            for name in BUCKETS:  # to be given back on a later tick
                st.bucket(name).owed += owed[name]
            raise
        for name in BUCKETS:
            st.bucket(name).owed += owed[name]

    async def close(self) -> None:
        """At shutdown: what is held goes back, and every slot."""
        await asyncio.gather(*(st.refilling for st in self.keys.values() if st.refilling is not None),
                             return_exceptions=True)
        for st in self.keys.values():
            for b in (st.rpm, st.tpm):
                b.owed += max(b.take_all(), 0.0)
        await self.tick(release_all=True)


def slot_headroom(needed: int, free: int) -> int:
    """Slots taken beyond what this process needs, when it takes some: as many again (so a
    ramp to N requests in flight takes log2(N) compare-and-sets, not N), but at most a quarter
    of what would stay free, so that other processes always find most of it. Under a small
    limit (a quarter of the rest below one) exactly what is needed; unused slots go back
    after ``RELEASE_IDLE_S`` without new requests."""
    return max(min(needed, free // 4), 0)


def _needs(policy: Policy, tokens: int) -> dict[str, float]:
    need: dict[str, float] = {}
    if policy.rpm is not None:
        need["rpm"] = 1.0
    if policy.tpm is not None:
        need["tpm"] = float(min(max(tokens, 0), policy.tpm))  # a request larger than the bucket waits for it whole
    if policy.max_concurrency is not None:
        need["concurrency"] = 1.0
    return need


def _level(doc: dict[str, Any] | None, name: str, capacity: int, at_s: float) -> tuple[float, float]:
    """The store's bucket ``name`` at store time ``at_s`` (refilled since it was written), and
    the time it was written; a bucket never written is full. A limit changed since moves the
    level by as much (a higher limit applies at once; a lower one counts what was used already)."""
    b = (doc or {}).get(name)
    if not b:
        return float(capacity), at_s
    level, before = b["level"], b.get("cap", capacity)
    if before != capacity:
        level = max(min(level, 0.0), level + capacity - before)
    return min(float(capacity), level + max(at_s - b["at"], 0.0) * capacity / 60.0), b["at"]


def duration(seconds: float) -> str:
    """A wait as OpenAI writes one in x-ratelimit-reset-*: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(round(seconds, 3), 60)
    return f"{int(minutes)}m{rest:g}s"
