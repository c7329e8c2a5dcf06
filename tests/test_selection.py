"""Tiers and the choice within one, without sockets: weights, load, models."""
import random
from collections import Counter

import pytest

from relay.balancer.pool import Pool
from relay.balancer.selection import pick
from relay.config import parse_config
from relay.errors import NoEndpoint
from relay.proxy.router import Router


def _pool(text):
    return Pool.from_config(parse_config(text, {}))


TWO_TIERS = """
upstreams:
  - {name: heavy, base_url: 'http://a', keys: [k1], weight: 3}
  - {name: light, base_url: 'http://b', keys: [k2], weight: 1}
  - {name: spare, base_url: 'http://c', keys: [k3], priority: 1}
  - {name: only4, base_url: 'http://d', keys: [k4], models: [gpt-4], priority: 2}
"""


def test_tiers_are_lowest_first_and_respect_models():
    pool = _pool(TWO_TIERS)
    assert [[e.upstream.name for e in t] for t in pool.tiers_for("gpt-4")] == [["heavy", "light"], ["spare"], ["only4"]]
    assert len(pool.tiers_for("gpt-3.5-turbo")) == 2


def test_weighted_choice_follows_weights_when_load_is_even():
    tier = _pool(TWO_TIERS).tiers_for("gpt-4")[0]
    rng = random.Random(7)
    counts = Counter(pick(tier, rng).upstream.name for _ in range(4000))
    share = counts["heavy"] / 4000
    assert 0.70 < share < 0.95  # P2C over weights 3:1 leans to the heavy endpoint


def test_choice_prefers_the_endpoint_with_fewer_requests_in_flight():
    tier = _pool(TWO_TIERS).tiers_for("gpt-4")[0]
    tier[0].health.in_flight = 50  # heavy is swamped
    rng = random.Random(1)
    counts = Counter(pick(tier, rng).upstream.name for _ in range(1000))
    assert counts["light"] > counts["heavy"]


def test_router_with_nothing_to_offer_raises_no_endpoint():
    router = Router(_pool("upstreams:\n  - {name: d, base_url: 'http://d', keys: [k], models: [gpt-4]}"),
                    transport=None)
    assert router.choose("gpt-4").upstream.name == "d"
    with pytest.raises(NoEndpoint) as info:
        router.choose("gpt-3.5-turbo")
    assert info.value.status == 503

