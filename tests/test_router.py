"""The router's retries, failover, budget and in-flight accounting, without sockets: a
scripted transport, and the clock and randomness passed in."""
import json
import random

import pytest

from relay.balancer.pool import Pool
from relay.config import parse_config
from relay.errors import NoEndpoint, UpstreamConnectError, UpstreamError, UpstreamRateLimited, UpstreamTimeout
from relay.proxy.request import UpstreamRequest
from relay.proxy.router import Router
from tests.fake_transport import FakeTransport, Reply

POOL = """
upstreams:
  - {name: primary, base_url: 'http://p', keys: [sk-p0, sk-p1], model_map: {gpt-4: gpt-4-0613}}
  - {name: backup, base_url: 'http://b', keys: [sk-b0], priority: 1}
health: {eject_after: 3, default_cooldown_s: 10}
retries: {max_attempts: 3, budget_ratio: 0.2, budget_floor: 3, budget_window_s: 10}
pricing: {"*": {input: 1}}
"""
CHAT = UpstreamRequest("POST", "/chat/completions", "gpt-4", {"model": "gpt-4", "messages": []},
                       b'{"model":"gpt-4","messages":[]}')


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def router(answers=None, text=POOL, seed=7):
    clock = Clock()
    r = Router(Pool.from_config(parse_config(text, {})), FakeTransport(answers), random.Random(seed), clock=clock,
               wall_clock=lambda: 1_700_000_000.0)
    return r, r.transport, clock


def in_flight(r: Router) -> dict[str, int]:
    return {ep.name: ep.health.in_flight for ep in r.pool.endpoints}


async def test_the_endpoint_counts_the_exchange_in_flight_until_it_ends():
    r, t, _ = router()
    async with r.exchange(CHAT) as resp:
        assert resp.status == 200 and in_flight(r)[resp.endpoint.name] == 1
    assert set(in_flight(r).values()) == {0} and t.responses[-1].closed


async def test_each_endpoint_gets_the_body_with_its_own_model_name():
    r, t, _ = router({"primary/k0": UpstreamError("down", outcome="5xx"),
                      "primary/k1": UpstreamError("down", outcome="5xx")})
    async with r.exchange(CHAT):
        pass
    bodies = {name: json.loads(body)["model"] for name, body in t.sent}
    assert bodies == {"primary/k0": "gpt-4-0613", "primary/k1": "gpt-4-0613", "backup/k0": "gpt-4"}
    assert t.sent[-1][1] == CHAT.raw, "nothing changed for the backup: the client's own bytes"


async def test_a_failing_tier_fails_over_to_the_next_and_nothing_stays_in_flight():
    r, t, _ = router({"primary/k0": UpstreamConnectError("refused", outcome="connect_error"),
                      "primary/k1": Reply(503, b'{"error": {"code": null}}')})
    async with r.exchange(CHAT) as resp:
        assert resp.endpoint.upstream.name == "backup"
    assert sorted(t.tried[:2]) == ["primary/k0", "primary/k1"] and t.tried[2] == "backup/k0"
    assert set(in_flight(r).values()) == {0}


async def test_a_client_error_is_handed_back_not_retried():
    r, t, _ = router({"primary/k0": Reply(400, b'{"error": {"code": "bad"}}'),
                      "primary/k1": Reply(400, b'{"error": {"code": "bad"}}')})
    async with r.exchange(CHAT) as resp:
        assert resp.status == 400
    assert len(t.sent) == 1


async def test_a_429_rests_that_key_for_retry_after_and_the_request_moves_on():
    r, t, clock = router({"primary/k0": Reply(429, b"{}", {"Retry-After": "7"})}, seed=1)
    for _ in range(6):
        async with r.exchange(CHAT) as resp:
            assert resp.status == 200
    k0 = next(ep for ep in r.pool.endpoints if ep.name == "primary/k0")
    assert k0.health.cooling_until == clock.now + 7
    assert t.tried.count("primary/k0") == 1, "cooling: not tried again"
    clock.now += 8
    assert k0.state(r.pool.config, clock.now).available


async def test_every_endpoint_rate_limited_is_a_429_with_retry_after():
    limited = Reply(429, b"{}", {"Retry-After": "2.5"})
    r, _, _ = router({"primary/k0": limited, "primary/k1": limited, "backup/k0": limited})
    with pytest.raises(UpstreamRateLimited) as info:
        async with r.exchange(CHAT):
            pass
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "3"}


async def test_consecutive_failures_eject_the_upstream_and_traffic_stays_on_the_backup():
    r, t, clock = router({"primary/k0": UpstreamTimeout("slow", outcome="timeout"),
                          "primary/k1": UpstreamTimeout("slow", outcome="timeout")})
    for _ in range(3):
        async with r.exchange(CHAT) as resp:
            assert resp.endpoint.upstream.name == "backup"
    primary = next(ep for ep in r.pool.endpoints if ep.name == "primary/k0")
    assert primary.state(r.pool.config, clock.now).state == "ejected"
    sent = len(t.sent)
    async with r.exchange(CHAT) as resp:
        assert resp.endpoint.upstream.name == "backup"
    assert len(t.sent) == sent + 1, "an ejected upstream is not tried"


async def test_retries_stop_at_the_budget():
    down = UpstreamConnectError("refused", outcome="connect_error")
    text = POOL.replace("budget_floor: 3", "budget_floor: 1").replace("budget_ratio: 0.2", "budget_ratio: 0.01")
    r, t, _ = router({"primary/k0": down, "primary/k1": down, "backup/k0": down}, text=text)
    for expected in (2, 1):  # the first request may retry once (the floor), the next may not
        before = len(t.sent)
        with pytest.raises(UpstreamConnectError):
            async with r.exchange(CHAT):
                pass
        assert len(t.sent) - before == expected


async def test_with_everything_ejected_the_soonest_back_is_tried():
    r, t, clock = router()
    for ep in r.pool.endpoints:
        ep.upstream_health.ejected_until = clock.now + (5 if ep.upstream.name == "backup" else 50)
    async with r.exchange(CHAT) as resp:
        assert resp.endpoint.upstream.name == "backup"


async def test_a_model_nobody_serves_has_no_endpoint():
    r, _, _ = router(text=POOL.replace("priority: 1}", "priority: 1, models: [gpt-4]}").replace(
        "model_map: {gpt-4: gpt-4-0613}}", "models: [gpt-4]}"))
    with pytest.raises(NoEndpoint):
        async with r.exchange(UpstreamRequest("POST", "/chat/completions", "gpt-3.5-turbo")):
            pass
