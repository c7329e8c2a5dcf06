"""The router's retries, failover, budget and in-flight accounting, without sockets: a
scripted transport, and the clock and randomness passed in."""
import json
import random

import pytest

from relay.balancer.pool import Pool
from relay.config import parse_config
from relay.errors import NoEndpoint, UpstreamConnectError, UpstreamRateLimited, UpstreamTimeout
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
    r, t, _ = router({"primary/k0": Reply(429, b"{}"), "primary/k1": Reply(429, b"{}")})
    async with r.exchange(CHAT):
        pass
    bodies = {name: json.loads(body)["model"] for name, body in t.sent}
    assert bodies == {"primary/k0": "gpt-4-0613", "primary/k1": "gpt-4-0613", "backup/k0": "gpt-4"}
    assert t.sent[-1][1] == CHAT.raw, "nothing changed for the backup: the client's own bytes"


@pytest.mark.parametrize("failure", [UpstreamConnectError("refused", outcome="connect_error"),
                                     UpstreamTimeout("slow", outcome="timeout"), Reply(503, b'{"error": {}}')])
async def test_the_upstreams_fault_fails_over_to_another_base_url_not_its_other_key(failure):
    r, t, _ = router({"primary/k0": failure, "primary/k1": failure})
    async with r.exchange(CHAT) as resp:
        assert resp.endpoint.upstream.name == "backup"
    assert len(t.tried) == 2 and t.tried[0].startswith("primary/") and t.tried[1] == "backup/k0", t.tried
    assert set(in_flight(r).values()) == {0}


async def test_the_upstreams_fault_is_retried_on_its_other_key_when_no_other_base_url_is_left():
    one = "upstreams:\n  - {name: only, base_url: 'http://o', keys: [sk-o0, sk-o1]}\npricing: {'*': {input: 1}}\n"
    r, t, _ = router({"only/k0": Reply(500, b"{}")}, text=one)
    for _ in range(4):
        async with r.exchange(CHAT) as resp:
            assert resp.status == 200 and resp.endpoint.name == "only/k1"


@pytest.mark.parametrize("status,body", [(429, b"{}"), (401, b"{}"),
                                         (429, b'{"error": {"code": "insufficient_quota"}}')])
async def test_a_keys_fault_is_retried_on_another_key_of_the_same_upstream_first(status, body):
    r, t, _ = router({"primary/k0": Reply(status, body), "primary/k1": Reply(status, body)})
    async with r.exchange(CHAT) as resp:
        assert resp.endpoint.upstream.name == "backup"
    assert sorted(t.tried[:2]) == ["primary/k0", "primary/k1"] and t.tried[2] == "backup/k0", t.tried
    r, t, _ = router({"primary/k0": Reply(status, body)})
    async with r.exchange(CHAT) as resp:
        assert resp.endpoint.name == "primary/k1", "the primary's other key, not the backup"


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
    # The first request: its failover to the backup (which has not failed yet) costs nothing, the retry
    # after that (the primary's other key: nothing else is left) the one the budget allows; the next
    # request's failover goes to a backup that has failed: the budget is spent, no retry.
    for expected in (["primary", "backup", "primary"], ["primary"]):
        before = len(t.sent)
        with pytest.raises(UpstreamConnectError):
            async with r.exchange(CHAT):
                pass
        assert [name.split("/")[0] for name in t.tried[before:]] == expected


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
