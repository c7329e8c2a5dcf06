"""Every route that needs the store answers a fast 503 while the store is unreachable, and
/healthz says so; all of them work again once it is back."""
import json
import time
import uuid

from tornado.httpclient import AsyncHTTPClient

from relay.app import make_app, make_server
from relay.config import parse_config
from relay.services import build_services
from relay.store.connect import close_client, open_store
from tests.conftest import ADMIN_TOKEN
from tests.faultproxy import FaultProxy
from tests.helpers import TEST_KEY, add_key, eventually, one_upstream_config, start_fake, unused_port
from tests.processes import db_uri

KEY = {"Authorization": f"Bearer {TEST_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
OTHER_KEY = "ak-test0000000000000000000000000000000000000009"  # never seen: its lookup needs the store
ROUTES = [
    ("GET", "/dashboard/billing/subscription", KEY, None),
    ("GET", "/v1/dashboard/billing/usage?start_date=2026-01-01&end_date=2026-02-01", KEY, None),
    ("GET", "/usage/api/summary", KEY, None),
    ("GET", "/admin/keys", ADMIN, None),
    ("POST", "/admin/keys", ADMIN, {"quota": 5}),
    ("POST", f"/admin/keys/{TEST_KEY}/topup", ADMIN, {"quota": 5}),
    ("POST", "/v1/chat/completions", {"Authorization": f"Bearer {OTHER_KEY}"},
     {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]}),
]


async def test_routes_that_need_the_store_fail_fast_while_it_is_gone(embedded, io_loop):
    proxy = await FaultProxy(int(embedded.split(":")[2].split("/")[0])).start()
    db = "routes" + uuid.uuid4().hex[:6]
    store = await open_store(db_uri(f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true", db))
    direct = await open_store(db_uri(embedded, db))
    await add_key(direct, quota=1_000_000)
    await add_key(direct, OTHER_KEY, quota=1_000_000)
    fake = start_fake()
    services = build_services(parse_config(one_upstream_config(fake.base_url), {}), store, admin_token=ADMIN_TOKEN)
    services.start_maintenance()
    server = make_server(make_app(services))
    port = unused_port()
    server.listen(port, "127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    c = AsyncHTTPClient(force_instance=True, max_clients=32)

    async def call(method, path, headers, body):
        started = time.monotonic()
        r = await c.fetch(url + path, method=method, headers=headers, raise_error=False, request_timeout=30,
                          body=json.dumps(body) if body is not None else None)
        return r, time.monotonic() - started

    for route in ROUTES[:4]:
        assert (await call(*route))[0].code == 200, route
    health = json.loads((await c.fetch(url + "/healthz")).body)
    assert health["store"] == "up"
    proxy.cut(hang=True)  # every byte lost: only timeouts tell
    # The first call finds the outage (within the call bound); every later one fails at once.
    first, waited = await call(*ROUTES[0])
    assert first.code == 503 and waited < 4.0, (first.code, waited)
    for route in ROUTES:
        r, waited = await call(*route)
        err = json.loads(r.body)["error"]
        assert (r.code, err["code"]) == (503, "store_unavailable"), (route, r.code, r.body)
        assert waited < 0.5, (route, waited)
    health = json.loads((await c.fetch(url + "/healthz")).body)
    assert (health["status"], health["store"]) == ("ok", "down"), "alive, and says the store is not"
    metrics = (await c.fetch(url + "/metrics")).body.decode()
    assert "relay_store_up 0.0" in metrics
    proxy.restore()
    await eventually(lambda: services.store.breaker.up, timeout=15, message="the probe finds the store back")
    for route in ROUTES:
        r, _ = await call(*route)
        assert r.code in (200, 201), (route, r.code, r.body)
    server.stop()
    await services.close()
    await close_client(store.client)
    await close_client(direct.client)
    await proxy.stop()
    fake.stop()
    c.close()
