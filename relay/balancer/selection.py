"""Selection: the tier and endpoint for an attempt; within a tier, by cache affinity or by load
(weighted power of two choices, least in flight per weight). Pure."""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from relay.balancer.affinity import FELL_BACK, FIRST_CHOICE, pick_affine
from relay.balancer.failover import Attempts
from relay.balancer.health import WAITING_STATES
from relay.balancer.pool import Endpoint
from relay.config import Config


def pick(endpoints: Sequence[Endpoint], rng: random.Random) -> Endpoint:
    """Draw two distinct endpoints by weight and keep the less loaded (in flight ÷ weight).

    The first draw decides ties, so traffic follows the weights when load is even; the
    comparison steers away from a slow endpoint whose requests pile up (Envoy's
    least-request policy). Distinct draws matter in small tiers: with two endpoints the
    loaded one is always compared, never drawn twice.
    """
    if len(endpoints) == 1:
        return endpoints[0]
    weights = [ep.weight for ep in endpoints]
    i = rng.choices(range(len(endpoints)), weights=weights)[0]
    rest = [j for j in range(len(endpoints)) if j != i]
    j = rng.choices(rest, weights=[weights[k] for k in rest])[0]
    a, b = endpoints[i], endpoints[j]
    # Cross-multiplied so weights stay exact integers.
    load_a, load_b = a.in_flight * b.weight, b.in_flight * a.weight
    if load_a != load_b:
        return a if load_a < load_b else b
    return a


@dataclass(frozen=True)
class Choice:
    endpoint: Endpoint
    affinity: str | None = None  # with an affinity key: FIRST_CHOICE or FELL_BACK (relay_affinity_total)


def choose(tiers: list[list[Endpoint]], config: Config, now: float, rng: random.Random,
           attempts: Attempts | None = None, affinity: bytes | None = None,
           last_hope: bool = True) -> Choice | None:
    """Where the next attempt goes: None when nowhere.

    Group by group in the order ``attempts`` prefers (balancer/failover.py), the lowest tier with an
    endpoint available and not tried; within it, with an affinity key, the first in the key's
    ranking that is not overloaded (balancer/affinity.py), else weighted power of two choices.

    When nothing is available, the endpoint whose ejection or cooldown ends soonest (a panic
    mode, in Envoy's terms): a pool that is all ejected still gets a chance instead of a total
    outage, and a retry may take the next such endpoint.
    """
    attempts = attempts or Attempts()
    tried = attempts.tried
    for group in attempts.preference(tiers):
        for tier in group:
            ready = [ep for ep in tier if ep not in tried and ep.state(config, now).available]
            if not ready:
                continue
            if affinity is not None:
                chosen, first = pick_affine(tier, ready, affinity, config.routing.overload_factor)
                if chosen is not None:
                    return Choice(chosen, FIRST_CHOICE if first else FELL_BACK)
                return Choice(pick(ready, rng), FELL_BACK)
            return Choice(pick(ready, rng))
    if last_hope:
        states = [(ep.state(config, now), ep) for tier in tiers for ep in tier if ep not in tried]
        waiting = [(st.until, ep) for st, ep in states if st.state in WAITING_STATES]
        if waiting:
            return Choice(min(waiting, key=lambda pair: pair[0])[1])
    return None
