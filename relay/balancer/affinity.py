"""Cache affinity: a key per request, and the endpoints of a tier ranked for it. Pure.

Upstreams cache long prompt prefixes per account and bill cached input at a fraction of the
price, but only when the same prefix reaches the same account again. A conversation's requests
share their start (the system prompt and the first user turn), so they share a key, and weighted
rendezvous hashing (highest random weight) ranks a tier's endpoints for that key the same way
on every process and every machine, with no shared state: the first endpoint in the ranking
sees the whole conversation. Across many keys each endpoint is first for a share of them in
proportion to its weight; taking an endpoint away moves only the keys it was first for.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from relay.balancer.pool import Endpoint

# The leading characters of a prompt that make its key: about 2,000 tokens, beyond the 1,024 an
# upstream caches first. Two prompts that agree this far share a cacheable prefix (and a key);
# hashing stays cheap whatever the prompt's length.
MAX_PREFIX_CHARS = 8192

FIRST_CHOICE, FELL_BACK = "first_choice", "fell_back"  # relay_affinity_total{outcome}

_SYSTEM_ROLES = ("system", "developer")


def affinity_key(api: str | None, body: Mapping[str, Any], model: str, client: str) -> bytes | None:
    """The key that places a request: from the client's ``prompt_cache_key``, else its
    ``previous_response_id``, else the start of its prompt (system or instructions and the first
    user turn, as text), each with ``client`` (the relay key's hash) and the model. None when
    the request has no usable prefix (embeddings, an empty prompt): it is placed by load."""
    hint = body.get("prompt_cache_key")
    if isinstance(hint, str) and hint:
        return _digest("cache-key", client, model, hint[:MAX_PREFIX_CHARS])
    previous = body.get("previous_response_id")
    if isinstance(previous, str) and previous:
        return _digest("response", client, model, previous[:MAX_PREFIX_CHARS])
    prefix = prompt_prefix(api, body)
    return _digest("prefix", client, model, prefix) if prefix else None


def prompt_prefix(api: str | None, body: Mapping[str, Any]) -> str:
    """The start of the prompt as normalised text: each leading turn as ``role: text`` with its
    text parts joined and the ends stripped (a string or a list of parts says the same), up to
    and including the first user turn, at most ``MAX_PREFIX_CHARS``."""
    if api == "chat":
        turns = _leading_turns(body.get("messages"))
    elif api == "responses":
        turns = _responses_turns(body)
    elif api == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        turns = iter([("prompt", prompt)] if isinstance(prompt, str) else [])
    else:
        return ""
    out: list[str] = []
    room = MAX_PREFIX_CHARS
    for role, content in turns:
        text = _text(content, room)
        if text:
            out.append(f"{role}: {text}")
            room -= len(out[-1]) + 1
        if room <= 0:
            break
    return "\n".join(out)[:MAX_PREFIX_CHARS]


def _leading_turns(items: Any) -> Iterator[tuple[str, Any]]:
    """Turns up to and including the first user turn (the system prompt comes before it)."""
    if not isinstance(items, list):
        return
    for item in items:
        if not isinstance(item, dict):
            continue
        role = item.get("role")
        if not isinstance(role, str):
            continue
        yield role, item.get("content")
        if role not in _SYSTEM_ROLES:
            return  # the first user turn (or whatever opened the conversation) ends the prefix


def _responses_turns(body: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        yield "system", instructions
    given = body.get("input")
    if isinstance(given, str):
        yield "user", given
    else:
        yield from _leading_turns(given)


def _text(content: Any, room: int) -> str:
    """A turn's text (a string, or the text of its parts), at most ``room`` characters read."""
    if isinstance(content, str):
        return content[:room].strip()
    if not isinstance(content, list):
        return ""
    parts = []
    for part in content:
        if room <= 0:
            break
        text = part.get("text") if isinstance(part, dict) else None
        if isinstance(text, str):
            parts.append(text[:room])
            room -= len(parts[-1])
    return "".join(parts).strip()


def _digest(kind: str, client: str, model: str, value: str) -> bytes:
    data = "\0".join((kind, client, model, value)).encode("utf-8", "surrogatepass")  # JSON allows lone surrogates
    return hashlib.blake2b(data, digest_size=16).digest()


def score(key: bytes, endpoint: Endpoint) -> float:
    """The endpoint's weighted rendezvous score for ``key``: weight / -ln(u), u uniform in (0, 1)
    from a stable hash (never Python's ``hash``, which differs between processes). The highest
    score wins; an endpoint wins a share of keys in proportion to its weight."""
    h = int.from_bytes(hashlib.blake2b(key + endpoint.seed, digest_size=8).digest(), "big")
    u = ((h >> 12) + 0.5) / (1 << 52)  # 52 bits: strictly between 0 and 1 as a float
    return endpoint.weight / -math.log(u)


def rank(endpoints: Sequence[Endpoint], key: bytes) -> list[Endpoint]:
    """The endpoints in the key's order of preference (ties, all but impossible, by name)."""
    scored = [(-score(key, ep), ep.name, ep) for ep in endpoints]
    scored.sort(key=_first_two)
    return [ep for _, _, ep in scored]


def _first_two(item: tuple[float, str, Endpoint]) -> tuple[float, str]:
    return item[0], item[1]


def first_choice(endpoints: Sequence[Endpoint], key: bytes) -> Endpoint:
    """``rank(endpoints, key)[0]`` without ranking the rest: the key's first choice is all a
    request needs unless that endpoint is overloaded (one pass, no sort, per request)."""
    best, best_score = endpoints[0], -1.0
    for ep in endpoints:
        s = score(key, ep)
        if s > best_score or (s == best_score and ep.name < best.name):
            best, best_score = ep, s
    return best


def pick_affine(tier: Sequence[Endpoint], ready: Sequence[Endpoint], key: bytes,
                overload_factor: float) -> tuple[Endpoint | None, bool]:
    """The first endpoint in the key's ranking of ``tier`` that is ``ready`` (available, not
    tried) and not overloaded, and whether it is the tier's first choice; (None, False) when
    none qualifies. The first choice's upstream's other keys come right after it (in the key's
    order), as a retry after a key's fault goes (balancer/failover.py): while a key cools down
    or is busy, its prefixes go to one sibling (the same for all of them), and come back after.

    Overloaded (consistent hashing with bounded loads, as HAProxy's ``hash-balance-factor``):
    the request would make the endpoint's requests in flight exceed ``overload_factor`` times
    its weighted share of the ready endpoints' requests in flight, this one counted, rounded
    up. An idle endpoint is never overloaded, and with a factor of at least 1 some ready
    endpoint always has room.
    """
    if len(tier) == 1:  # nothing to rank (nor anywhere else to go)
        return (tier[0], True) if ready else (None, False)
    total = sum(ep.in_flight for ep in ready) + 1
    weights = sum(ep.weight for ep in ready)
    everyone = len(ready) == len(tier)
    ready_set = frozenset(() if everyone else ready)

    def takes(ep: Endpoint) -> bool:
        return (everyone or ep in ready_set) and \
            ep.in_flight + 1 <= math.ceil(overload_factor * total * ep.weight / weights)

    first = first_choice(tier, key)
    if takes(first):
        return first, True
    ranked = rank(tier, key)
    home = first.upstream.name
    for ep in [ep for ep in ranked if ep.upstream.name == home] + [ep for ep in ranked if ep.upstream.name != home]:
        if ep is not first and takes(ep):
            return ep, False
    return None, False
