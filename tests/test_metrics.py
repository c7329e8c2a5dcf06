"""Metrics: what /metrics holds after traffic, what it must never hold, and several workers."""
import asyncio
import json
import re
import secrets
import subprocess
import sys
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient

from tests.helpers import PRICING, TEST_KEY, UPSTREAM_KEY, add_key, eventually, mock_store, serve, start_fake
from tests.processes import RelayProcess, relay_cli

CHAT = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


def series(text: str) -> set[str]:
    return {line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def test_metrics_after_traffic_hold_no_keys_no_content_and_no_junk_series(io_loop):
    fake = start_fake()
    store = mock_store()
    await add_key(store)
    text = f"upstreams:\n  - {{name: primary, base_url: '{fake.base_url}', keys: [{UPSTREAM_KEY}]}}\n{PRICING}"
    url, server, services = await serve(text, store)
    c = AsyncHTTPClient(force_instance=True, max_clients=32)
    marker = "CONTENT-" + secrets.token_hex(8)
    # The registry is per process and other tests ran before: compare against a baseline.
    base = (await c.fetch(url + "/metrics")).body.decode()
    for stream in (False, True):
        body = json.dumps({"model": "gpt-4", "stream": stream, "messages": [{"role": "user", "content": marker}]})
        assert (await c.fetch(url + CHAT, method="POST", body=body, headers=AUTH)).code == 200
    fake.state.behaviour.status = 400  # the fake echoes the upstream key in its error message
    body = json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": marker}]})
    await c.fetch(url + CHAT, method="POST", body=body, headers=AUTH, raise_error=False)
    fake.state.behaviour.status = None
    await c.fetch(url + CHAT, method="POST", body=body, headers={"Authorization": "Bearer ak-" + "z" * 40},
                  raise_error=False)

    async def counted():
        # Settlements (and their token counts) follow the responses; the gauges refresh every second;
        # the slice's group commit (its store-operation series) follows within 100 ms.
        text = (await c.fetch(url + "/metrics")).body.decode()
        done = (value(text, "relay_tokens_total", model="gpt-4", kind="completion")
                - value(base, "relay_tokens_total", model="gpt-4", kind="completion") >= 20
                and value(text, "relay_endpoint_state", upstream="primary", key_id="k0", state="healthy") == 1
                and 'op="commit_lease"' in text)
        return text if done else None
    metrics = await eventually(counted, message="the traffic is counted in /metrics")


    def delta(name, **labels):
        return value(metrics, name, **labels) - value(base, name, **labels)
    assert delta("relay_requests_total", route="chat", status_class="2xx") == 2
    assert delta("relay_tokens_total", model="gpt-4", kind="completion") == 20
    assert delta("relay_upstream_attempts_total", upstream="primary", outcome="ok") == 2
    assert value(metrics, "relay_endpoint_state", upstream="primary", key_id="k0", state="healthy") == 1
    assert "relay_overhead_seconds_bucket" in metrics and 'le="0.00025"' in metrics
    for secret in (marker, TEST_KEY, UPSTREAM_KEY, "ak-", "sk-", "z" * 20):
        assert secret not in metrics, secret
    junk = json.dumps({"model": "junk-0", "messages": [{"role": "user", "content": "x"}]})
    await c.fetch(url + CHAT, method="POST", body=junk, headers=AUTH, raise_error=False)
    before_text = (await c.fetch(url + "/metrics")).body.decode()
    before = series(before_text)
    for _ in range(200):
        junk = json.dumps({"model": f"junk-{secrets.token_hex(6)}", "messages": [{"role": "user", "content": "x"}]})
        resp = await c.fetch(url + CHAT, method="POST", body=junk, headers=AUTH, raise_error=False)
        assert resp.code == 400 and b"model_not_priced" in resp.body  # "*" serves it; no price
    after_text = (await c.fetch(url + "/metrics")).body.decode()
    assert series(after_text) == before, "random model names add no series"
    assert value(after_text, "relay_requests_total", model="other", status_class="4xx") - \
        value(before_text, "relay_requests_total", model="other", status_class="4xx") == 200
    server.stop()
    await services.close()
    fake.stop()
    c.close()


async def test_two_worker_processes_add_up(tmp_path, io_loop):
    fake = start_fake()
    mp = tmp_path / "metrics"
    mp.mkdir()
    text = f"upstreams:\n  - {{name: primary, base_url: '{fake.base_url}', keys: [sk-w1]}}\n{PRICING}"
    relay = RelayProcess(text, tmp_path, "--workers", "2", "--data-dir", str(tmp_path / "data"),
                         env={"PROMETHEUS_MULTIPROC_DIR": str(mp)})
    await relay.start()
    loop = asyncio.get_running_loop()
    made = await loop.run_in_executor(None, lambda: relay_cli("keys", "create", "--quota", "10000000",
                                                              "--data-dir", str(tmp_path / "data")))
    key = made.stdout.strip()
    c = AsyncHTTPClient(force_instance=True, max_clients=40)
    body = json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5})
    n = 120
    # New connections each time, so the kernel spreads them over both workers.
    results = await asyncio.gather(*(c.fetch(relay.url + CHAT, method="POST", body=body,
                                             headers={"Authorization": f"Bearer {key}", "Connection": "close"})
                                     for _ in range(n)))
    assert {r.code for r in results} == {200}
    pids = {m.group(1) for f in mp.iterdir() if (m := re.search(r"_(\d+)\.db$", f.name))}
    assert len(pids) >= 2, f"both workers served: {sorted(p.name for p in mp.iterdir())}"

    async def counted():  # settlements (and their token counts) follow the responses
        text = (await c.fetch(relay.url + "/metrics", headers={"Connection": "close"})).body.decode()
        return value(text, "relay_tokens_total", model="gpt-4", kind="completion") >= 5 * n
    await eventually(counted, message="every settlement counted")
    for _ in range(6):
        metrics = (await c.fetch(relay.url + "/metrics", headers={"Connection": "close"})).body.decode()
        assert value(metrics, "relay_requests_total", route="chat", status_class="2xx") == n
        assert value(metrics, "relay_tokens_total", model="gpt-4", kind="completion") == 5 * n
    await relay.stop()
    assert relay.proc.returncode is not None
    fake.stop()
    c.close()


ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"


def promtool(*args, cwd=MONITORING):
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_config_rules_and_rule_tests():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        proc = promtool(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = promtool("test", "rules", "alerts_test.yml", cwd=MONITORING / "tests")
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_dashboard_json_is_generated_from_its_source():
    sys.path.insert(0, str(MONITORING))
    try:
        import dashboard
    finally:
        sys.path.pop(0)
    assert (MONITORING / "grafana/dashboards/relay.json").read_text() == dashboard.render()


async def test_access_line_flags_say_why_a_request_failed(caplog, io_loop):
    caplog.set_level("INFO", logger="relay.access")
    fake = start_fake()
    store = mock_store()
    await add_key(store)
    poor = "ak-poor000000000000000000000000000000000000002"
    await add_key(store, key=poor, quota=10)
    text = f"upstreams:\n  - {{name: primary, base_url: '{fake.base_url}', keys: [sk-flag-1]}}\n" \
           f"timeouts: {{first_byte_s: 0.3}}\n{PRICING}"
    url, server, services = await serve(text, store)
    c = AsyncHTTPClient(force_instance=True)
    body = json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})

    async def call(headers=AUTH):
        return await c.fetch(url + CHAT, method="POST", body=body, headers=headers, raise_error=False)

    fake.state.behaviour.status = 500
    assert (await call()).code == 502
    fake.state.behaviour.status = None
    fake.state.behaviour.first_byte_delay = 1.0
    assert (await call()).code == 504
    fake.state.behaviour.first_byte_delay = 0
    assert (await call({"Authorization": f"Bearer {poor}"})).code == 429
    fake.state.keys = set()  # the only key is refused: then nothing is left to serve
    assert (await call()).code == 502
    assert (await call()).code == 503
    flags = [r.getMessage().rsplit("flag=", 1)[1] for r in caplog.records if r.name == "relay.access"
             and "/chat/completions" in r.getMessage()]
    assert flags == ["upstream_5xx", "upstream_timeout", "quota_exhausted", "upstream_auth", "no_endpoint"]
    server.stop()
    await services.close()
    fake.stop()
    c.close()


def test_relays_histogram_buckets_every_value_as_prometheus_client_does():
    import random

    import prometheus_client
    from prometheus_client import CollectorRegistry

    from relay.observability.metrics import LATENCY_BUCKETS, Histogram

    theirs_registry, ours_registry = CollectorRegistry(), CollectorRegistry()
    theirs = prometheus_client.Histogram("h", "h", ["x"], buckets=LATENCY_BUCKETS, registry=theirs_registry)
    ours = Histogram("h", "h", ["x"], buckets=LATENCY_BUCKETS, registry=ours_registry)
    rng = random.Random(7)
    values = [*LATENCY_BUCKETS, 0.0, -1.0, 1e9, float("inf")] + [rng.uniform(0, 150) ** rng.choice((1, 0.2, 3))
                                                                for _ in range(5000)]
    values += [b * (1 + 1e-12) for b in LATENCY_BUCKETS] + [b * (1 - 1e-12) for b in LATENCY_BUCKETS]
    for v in values:
        theirs.labels("a").observe(v)
        ours.labels("a").observe(v)
    def samples(registry):  # all but the creation times
        return [line for line in prometheus_client.generate_latest(registry).decode().splitlines()
                if "_created" not in line]
    assert samples(ours_registry) == samples(theirs_registry) and len(samples(ours_registry)) > 15
    try:
        ours.observe(1.0)  # the labelled parent: the library's own error
    except ValueError as exc:
        assert "missing label values" in str(exc)
    else:
        raise AssertionError("observing a labelled histogram's parent must fail")
