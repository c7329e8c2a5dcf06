"""A real Prometheus scrapes a running relay: every dashboard and alert expression has data,
and an injected upstream failure makes its alert's expression true."""
import asyncio
import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import yaml
from tornado.httpclient import AsyncHTTPClient

from tests.helpers import PRICING, TEST_KEY, add_key, mock_store, serve, start_fake, unused_port

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
COMPARISON = re.compile(r"^(?P<query>.*\S)\s*(==|!=|>=|<=|>|<)\s*[0-9.]+\s*$", re.S)


def dashboard_exprs() -> list[str]:
    board = json.loads((MONITORING / "grafana/dashboards/relay.json").read_text())
    return [t["expr"].replace("$__rate_interval", "30s") for p in board["panels"] for t in p["targets"]]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


async def query(c, prom: str, expr: str) -> list:
    resp = await c.fetch(f"{prom}/api/v1/query?query={urllib.parse.quote(expr)}", raise_error=False)
    body = json.loads(resp.body)
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


async def traffic(c, url, n, key=TEST_KEY, model="gpt-4"):
    out = []
    for i in range(n):
        path = "/v1/embeddings" if i % 5 == 4 else "/v1/chat/completions"
        body = {"model": "text-embedding-ada-002", "input": "hello"} if i % 5 == 4 else \
            {"model": model, "stream": i % 2 == 0, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
        r = await c.fetch(url + path, method="POST", body=json.dumps(body), raise_error=False,
                          headers={"Authorization": f"Bearer {key}"})
        out.append(r.code)
    return out


async def test_prometheus_sees_every_dashboard_and_alert_expression(tmp_path, io_loop):
    assert shutil.which("prometheus"), "Debian's prometheus package is required (.ci/run installs it)"
    primary, backup = start_fake(), start_fake()
    for fake in (primary, backup):
        fake.state.behaviour.cached_tokens = 4  # part of each prompt read from the upstream's cache
    store = mock_store()
    await add_key(store)
    poor = "ak-poor000000000000000000000000000000000000001"
    await add_key(store, key=poor, quota=100)
    text = f"""
upstreams:
  - {{name: primary, base_url: '{primary.base_url}', keys: [sk-p1, sk-p2]}}
  - {{name: backup, base_url: '{backup.base_url}', keys: [sk-b1], priority: 1}}
health: {{interval_s: 0.5}}
{PRICING}"""
    url, server, services = await serve(text, store)
    relay_port = int(url.rsplit(":", 1)[1])
    prom_port = unused_port()
    rules = tmp_path / "alerts.yml"
    rules.write_text((MONITORING / "alerts.yml").read_text())
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{relay_port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with open(tmp_path / "prometheus.log", "wb") as prom_log:  # the child keeps its own copy of the descriptor
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=prom_log)
    c = AsyncHTTPClient(force_instance=True, max_clients=16)
    base = f"http://127.0.0.1:{prom_port}"
    try:
        for _ in range(300):
            try:
                if (await c.fetch(base + "/-/ready", raise_error=False)).code == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        while not await query(c, base, 'up{job="relay"}'):  # counters must be seen before they move
            await asyncio.sleep(0.2)
        # Traffic in steps a scrape apart, so each counter is seen before and after it moves.
        for _ in range(2):
            assert set(await traffic(c, url, 10)) == {200}
            assert set(await traffic(c, url, 2, key=poor)) == {429}  # quota rejections
            await asyncio.sleep(1.5)
        # Inject: the primary fails (retries, failovers, then ejection), then briefly everything (5xx).
        primary.state.behaviour.status = 500
        for _ in range(2):
            assert set(await traffic(c, url, 6)) == {200}
            await asyncio.sleep(1.5)
        backup.state.behaviour.status = 500
        for _ in range(2):
            assert set(await traffic(c, url, 6)) == {502}
            await asyncio.sleep(1.5)
        backup.state.behaviour.status = None
        await asyncio.sleep(1.5)  # a probe finds the backup healthy again and ends its ejection
        assert set(await traffic(c, url, 10)) == {200}
        await asyncio.sleep(3)
        up = await query(c, base, 'up{job="relay"}')
        assert up and up[0]["value"][1] == "1", (tmp_path / "prometheus.log").read_text()[-2000:]
        empty = [e for e in dashboard_exprs() if not await query(c, base, e)]
        assert not empty, f"dashboard expressions without data: {empty}"
        for rule in alert_rules():
            m = COMPARISON.match(rule["expr"])
            assert m, rule["alert"]
            assert await query(c, base, m.group("query")), f"{rule['alert']}: no data for {m.group('query')}"
        ejected = next(r for r in alert_rules() if r["alert"] == "RelayUpstreamEjected")
        firing = await query(c, base, ejected["expr"])
        assert [s["metric"]["upstream"] for s in firing] == ["primary"], "the injected failure shows"
        errors = next(r for r in alert_rules() if r["alert"] == "RelayErrorRatioHigh")
        ratio = COMPARISON.match(errors["expr"]).group("query")
        assert await query(c, base, errors["expr"]), ("the 5xx ratio is above its threshold",
                                                      await query(c, base, ratio),
                                                      await query(c, base, 'relay_requests_total'))
        calm = next(r for r in alert_rules() if r["alert"] == "RelayNoAvailableEndpoint")
        assert not await query(c, base, calm["expr"]), "the backup still serves every model"
    finally:
        prom.terminate()
        prom.wait(20)
        server.stop()
        await services.close()
        primary.stop()
        backup.stop()
        c.close()
