"""The health state machine, the retry budget and the router's choice, without sockets."""
import pytest

from relay.balancer import health as h
from relay.balancer import outcome as o
from relay.balancer.budget import RetryBudget
from relay.balancer.pool import Pool
from relay.config import HealthPolicy, parse_config
from relay.errors import NoEndpoint
from relay.proxy.router import Router

P = HealthPolicy()


def fresh():
    return h.EndpointHealth(), h.UpstreamHealth()


@pytest.mark.parametrize("status,code,outcome", [
    (200, None, o.OK), (500, None, o.SERVER_ERROR), (503, None, o.SERVER_ERROR), (429, None, o.RATE_LIMITED),
    (429, "insufficient_quota", o.NO_CREDIT), (401, None, o.AUTH), (403, None, o.AUTH),
    (400, "account_deactivated", o.AUTH), (400, None, o.CLIENT_ERROR), (404, "model_not_found", o.CLIENT_ERROR),
    (422, None, o.CLIENT_ERROR)])
def test_classify_status(status, code, outcome):
    assert o.classify_status(status, code) == outcome


def state(ep, up, now, operator=False):
    return h.endpoint_state(ep, up, operator, P, now).state


def test_consecutive_failures_eject_the_upstream_for_growing_times():
    ep, up = fresh()
    for outcome in (o.SERVER_ERROR, o.TIMEOUT):
        h.record_attempt(outcome, ep, up, P, now=0)
    assert state(ep, up, 0) == "healthy"
    h.record_attempt(o.CONNECT_ERROR, ep, up, P, now=0)
    assert state(ep, up, 0) == "ejected" and up.ejected_until == 30
    assert state(ep, up, 30) == "healthy"
    for _ in range(3):
        h.record_attempt(o.SERVER_ERROR, ep, up, P, now=31)
    assert up.ejected_until == 31 + 60  # 30 s × times ejected
    for _ in range(20):
        up.ejected_until = 0
        for _ in range(3):
            h.record_attempt(o.SERVER_ERROR, ep, up, P, now=100)
    assert up.ejected_until == 100 + P.max_ejection_s  # capped


def test_a_success_resets_the_failure_count():
    ep, up = fresh()
    for outcome in (o.SERVER_ERROR, o.SERVER_ERROR, o.OK, o.SERVER_ERROR, o.SERVER_ERROR):
        h.record_attempt(outcome, ep, up, P, now=0)
    assert state(ep, up, 0) == "healthy"


def test_client_errors_say_nothing_about_the_upstream():
    ep, up = fresh()
    for _ in range(10):
        h.record_attempt(o.CLIENT_ERROR, ep, up, P, now=0)
    assert state(ep, up, 0) == "healthy"


def test_429_cools_only_that_key_for_retry_after_capped():
    ep, up = fresh()
    other = h.EndpointHealth()
    h.record_attempt(o.RATE_LIMITED, ep, up, P, now=10, retry_after_s=7)
    assert state(ep, up, 16.9) == "cooling" and state(ep, up, 17) == "healthy"
    assert state(other, up, 11) == "healthy" and not up.ejected(11)
    h.record_attempt(o.RATE_LIMITED, ep, up, P, now=100, retry_after_s=10_000)
    assert ep.cooling_until == 100 + P.max_cooldown_s
    ep2, _ = fresh()
    h.record_attempt(o.RATE_LIMITED, ep2, up, P, now=0)
    assert ep2.cooling_until == P.default_cooldown_s


@pytest.mark.parametrize("outcome", [o.AUTH, o.NO_CREDIT])
def test_refused_key_is_disabled_by_the_checker_until_a_probe_works(outcome):
    ep, up = fresh()
    h.record_attempt(outcome, ep, up, P, now=0)
    assert state(ep, up, 1000) == "disabled_by_checker" and not up.ejected(0)
    assert not h.probe_due(ep, P, P.interval_s) and h.probe_due(ep, P, P.recheck_disabled_s)
    h.record_probe(o.AUTH, ep, up, P, now=60)
    assert state(ep, up, 61) == "disabled_by_checker"
    h.record_probe(o.OK, ep, up, P, now=120)
    assert state(ep, up, 121) == "healthy"


def test_operator_disabled_is_apart_from_checker_disabled():
    ep, up = fresh()
    h.record_probe(o.OK, ep, up, P, now=0)
    assert state(ep, up, 1, operator=True) == "disabled_by_operator"


def test_failed_probes_make_an_idle_endpoint_unhealthy_and_a_good_one_returns_it():
    ep, up = fresh()
    h.record_probe(o.CONNECT_ERROR, ep, up, P, now=0)
    assert state(ep, up, 0) == "healthy"
    h.record_probe(o.TIMEOUT, ep, up, P, now=10)
    assert state(ep, up, 10) == "unhealthy"
    h.record_probe(o.OK, ep, up, P, now=20)
    assert state(ep, up, 20) == "healthy"


def test_a_successful_probe_ends_an_ejection_early():
    ep, up = fresh()
    for _ in range(3):
        h.record_attempt(o.CONNECT_ERROR, ep, up, P, now=0)
    assert state(ep, up, 5) == "ejected"
    h.record_probe(o.OK, ep, up, P, now=5)
    assert state(ep, up, 5) == "healthy"


def test_retry_budget_has_a_floor_and_a_ratio():
    b = RetryBudget(ratio=0.2, floor=3, window_s=10)
    for _ in range(5):
        b.record_request(0)
    assert [b.try_retry(0) for _ in range(4)] == [True, True, True, False]  # the floor
    for _ in range(100):
        b.record_request(1)
    allowed = sum(b.try_retry(1) for _ in range(100))
    assert allowed == 21 - 3  # 20% of 105 requests, minus the 3 already spent
    assert b.try_retry(12)  # the window moved on


TIERS = """
upstreams:
  - {name: a, base_url: 'http://a', keys: [ka1, ka2]}
  - {name: b, base_url: 'http://b', keys: [kb1], priority: 1}
  - {name: c, base_url: 'http://c', keys: [kc1, {key: kc2, disabled: true}], priority: 2}
"""


def router(text=TIERS, now=0.0):
    clock = [now]
    r = Router(Pool.from_config(parse_config(text, {})), transport=None, clock=lambda: clock[0])
    return r, clock


def test_router_prefers_the_lowest_available_tier_and_excludes_tried():
    r, clock = router()
    a1, a2, b1, c1, c2 = r.pool.endpoints
    assert r.choose("m").upstream.name == "a"
    assert r.choose("m", exclude={a1}) is a2  # same tier first
    assert r.choose("m", exclude={a1, a2}) is b1  # then the next
    for _ in range(3):
        h.record_attempt(o.SERVER_ERROR, a1.health, a1.upstream_health, P, 0)
    assert r.choose("m") is b1, "an ejected upstream's keys are skipped"
    assert c2.operator_disabled and c2.state(r.pool.config, 0).state == "disabled_by_operator"


def test_router_last_hope_is_the_soonest_ending_ejection():
    r, clock = router()
    a1, a2, b1, c1, c2 = r.pool.endpoints
    for ep, until in ((a1, 50), (b1, 20), (c1, 90)):
        ep.upstream_health.ejected_until = until
    assert r.choose("m") is b1
    with pytest.raises(NoEndpoint):
        r.choose("m", last_hope=False)
    for ep in (a1, b1, c1):
        ep.health.disabled_reason = o.AUTH
    with pytest.raises(NoEndpoint):
        r.choose("m", exclude={a2})  # nothing left but disabled keys


def test_health_carries_over_a_reload_for_unchanged_endpoints():
    r, _ = router()
    a1 = r.pool.endpoints[0]
    a1.health.disabled_reason = o.AUTH
    a1.health.in_flight = 2
    changed = TIERS.replace("keys: [ka1, ka2]}", "keys: [ka1, ka3], weight: 5}")
    new = Pool.from_config(parse_config(changed, {}), previous=r.pool)
    assert new.endpoints[0].health is a1.health and new.endpoints[0].weight == 5
    assert new.endpoints[1].key == "ka3" and new.endpoints[1].health.disabled_reason is None
    moved = Pool.from_config(parse_config(TIERS.replace("http://a", "http://a2"), {}), previous=r.pool)
    assert moved.endpoints[0].health is not a1.health, "a new base URL starts unproven"
