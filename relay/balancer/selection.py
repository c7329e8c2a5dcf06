"""Selection within a tier: weighted power of two choices, least in flight per weight. Pure."""
from __future__ import annotations

import random
from collections.abc import Sequence

from relay.balancer.pool import Endpoint


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
