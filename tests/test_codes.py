"""Top-up codes: created by the operator, redeemed once by a key holder, over real sockets.

In-process relays on mongomock for the HTTP behaviour; the embedded store and two relay
processes for the race; the command line against a running relay.
"""
import asyncio
import datetime as dt
import json
import uuid

import pytest
from tornado.httpclient import AsyncHTTPClient

from relay.codes import hash_code
from relay.keys import hash_key
from relay.metering.bounds import MAX_UNITS
from relay.store.connect import close_client, open_store
from tests.conftest import ADMIN_TOKEN
from tests.conservation import assert_conserved
from tests.helpers import TEST_KEY, add_key, eventually, one_upstream_config, serve
from tests.processes import RelayProcess, db_uri, relay_cli

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
OTHER_KEY = "ak-test0000000000000000000000000000000000000002"


async def post(client, path, body, headers):
    return await client.fetch(path, method="POST", body=json.dumps(body), headers=headers, raise_error=False)


async def make_codes(client, quota, count=1, note=""):
    resp = await post(client, "/admin/codes", {"quota": quota, "count": count, "note": note}, ADMIN)
    assert resp.code == 201, resp.body
    return json.loads(resp.body)["codes"]


def error(resp) -> dict:
    body = json.loads(resp.body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


async def subscription(client, auth):
    return json.loads((await client.fetch("/v1/dashboard/billing/subscription", headers=auth)).body)


async def test_a_code_is_redeemed_once_and_shows_in_billing_at_once(http_server_client, auth, store, services):
    c = http_server_client
    codes = await make_codes(c, 5000, count=3, note="batch 1")
    assert len(set(codes)) == 3 and all(code.startswith("rc-") and len(code) == 35 for code in codes)
    assert (await subscription(c, auth))["hard_limit_usd"] == 1_000_000
    done = await post(c, "/v1/redeem", {"code": codes[0]}, auth)
    assert done.code == 200, done.body
    body = json.loads(done.body)
    assert (body["quota"], body["granted"], body["balance"]) == (5000, 1_005_000, 1_005_000)
    assert done.headers["Cache-Control"] == "no-store"
    assert (await subscription(c, auth))["hard_limit_usd"] == 1_005_000, "visible to the billing endpoints at once"
    again = await post(c, "/v1/redeem", {"code": codes[0]}, auth)
    assert again.code == 400 and error(again)["code"] == "code_used" and error(again)["param"] == "code"
    assert "on this key" in error(again)["message"], "a retry after a lost answer learns the money is there"
    # The same code from another key: used all the same.
    await add_key(store, OTHER_KEY, quota=0)
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    used = error(await post(c, "/redeem", {"code": codes[0]}, other))
    assert used["code"] == "code_used" and "on this key" not in used["message"]
    # Every route: /redeem, /v1/redeem, /openai/v1/redeem.
    assert (await post(c, "/redeem", {"code": codes[1]}, other)).code == 200
    assert (await post(c, "/openai/v1/redeem", {"code": codes[2]}, auth)).code == 200
    assert (await subscription(c, other))["hard_limit_usd"] == 5000
    for bad in ("rc-" + "x" * 32, "rc-short", "ak-" + "x" * 40, ""):
        resp = await post(c, "/v1/redeem", {"code": bad}, auth)
        assert resp.code == 400 and error(resp)["code"] == "code_invalid", bad
    for body in ({}, {"code": 12}, {"code": None}):
        resp = await post(c, "/v1/redeem", body, auth)
        assert resp.code == 400 and error(resp)["param"] == "code" and error(resp)["code"] is None
    assert (await post(c, "/v1/redeem", {"code": codes[0]}, {})).code == 401
    listed = json.loads((await c.fetch("/admin/codes", headers=ADMIN)).body)["codes"]
    assert [(v["status"], v["redeemed_by"], v["quota"], v["note"]) for v in listed] == [
        ("redeemed", TEST_KEY[:10], 5000, "batch 1"), ("redeemed", OTHER_KEY[:10], 5000, "batch 1"),
        ("redeemed", TEST_KEY[:10], 5000, "batch 1")]
    assert all(v["redeemed_at"] and v["created_at"] for v in listed)
    assert not any(code in json.dumps(listed) for code in codes), "codes are shown once, at creation"
    grants = await store.grants.find({"kind": "code"}).to_list(None)
    assert sorted(g["key_hash"] for g in grants) == sorted([hash_key(TEST_KEY)] * 2 + [hash_key(OTHER_KEY)])
    await assert_conserved(store)


async def test_stored_hashed_and_disabled_codes_are_invalid(http_server_client, auth, store):
    c = http_server_client
    [code, spare] = await make_codes(c, 700, count=2)
    docs = await store.codes.find({}).to_list(None)
    assert {d["_id"] for d in docs} == {hash_code(code), hash_code(spare)}
    assert code not in json.dumps(docs, default=str) and spare not in json.dumps(docs, default=str)
    off = await post(c, f"/admin/codes/{code[:10]}/disable", {}, ADMIN)
    assert off.code == 200 and json.loads(off.body)["status"] == "disabled"
    assert error(await post(c, "/v1/redeem", {"code": code}, auth))["code"] == "code_invalid"
    assert json.loads((await c.fetch(f"/admin/codes/{spare}", headers=ADMIN)).body)["status"] == "active"
    assert (await post(c, "/v1/redeem", {"code": spare}, auth)).code == 200
    late = await post(c, f"/admin/codes/{spare}/disable", {}, ADMIN)
    assert late.code == 400 and "redeemed already" in error(late)["message"]
    missing = await c.fetch("/admin/codes/rc-nothing", headers=ADMIN, raise_error=False)
    assert missing.code == 404 and error(missing)["code"] == "code_not_found"
    for body in ({"quota": 0}, {"quota": 10, "count": 0}, {"quota": 10, "count": 1001}, {"quota": MAX_UNITS + 1},
                 {"quota": 10, "note": 5}, {"quota": 10, "new_keys": "yes"}):
        resp = await post(c, "/admin/codes", body, ADMIN)
        assert resp.code == 400 and error(resp)["param"] in ("quota", "count", "note", "new_keys"), body
    assert (await post(c, "/admin/codes", {"quota": 10}, {})).code == 401
    await assert_conserved(store)


async def test_the_shop_can_sell_keys_instead(http_server_client, store):
    resp = await post(http_server_client, "/admin/codes", {"quota": 900, "count": 2, "note": "shop", "new_keys": True},
                      ADMIN)
    assert resp.code == 201
    keys = json.loads(resp.body)["keys"]
    assert len(keys) == 2 and all(k["key"].startswith("ak-") and k["granted"] == 900 for k in keys)
    for k in keys:
        sub = await subscription(http_server_client, {"Authorization": f"Bearer {k['key']}"})
        assert sub["hard_limit_usd"] == 900
    await assert_conserved(store)


async def test_wrong_codes_from_one_address_are_slowed_down(http_server_client, auth, services):
    c = http_server_client
    [good] = await make_codes(c, 100)
    codes = [error(await post(c, "/v1/redeem", {"code": "rc-" + uuid.uuid4().hex}, auth))["code"]
             for _ in range(services.code_throttle.max_failures)]
    assert set(codes) == {"code_invalid"}
    slow = await post(c, "/v1/redeem", {"code": "rc-" + uuid.uuid4().hex}, auth)
    assert slow.code == 429 and error(slow)["code"] == "too_many_failed_attempts"
    assert (await post(c, "/v1/redeem", {"code": good}, auth)).code == 200, "a good code is never held back"
    # Bad keys have their own count: this address's key mistakes are not throttled by it.
    bad_key = await c.fetch("/v1/models", headers={"Authorization": "Bearer ak-" + "y" * 40}, raise_error=False)
    assert bad_key.code == 401


async def test_a_key_cannot_pass_the_bound_and_the_code_stays_redeemable(http_server_client, auth, store):
    c = http_server_client
    await add_key(store, OTHER_KEY, quota=MAX_UNITS - 10)
    [code] = await make_codes(c, 11)
    full = await post(c, "/v1/redeem", {"code": code}, {"Authorization": f"Bearer {OTHER_KEY}"})
    assert full.code == 400 and error(full)["param"] == "code" and "at most" in error(full)["message"]
    assert (await post(c, "/v1/redeem", {"code": code}, auth)).code == 200
    await assert_conserved(store)


async def test_a_redemption_cut_between_its_steps_is_finished_once(store, io_loop):
    """A crash after the claim, or after the credit: the sweep finishes it, never twice."""
    key_hash = hash_key(TEST_KEY)
    after_claim, after_credit = await store.create_codes(300, 2)
    # After the claim only (the process died before crediting the key).
    await store.codes.update_one({"_id": hash_code(after_claim)}, {"$set": {
        "redeemed_by": key_hash, "key_prefix": TEST_KEY[:10], "redeemed_at": store.now(), "applied": False}})
    # After the credit, before the grant was recorded.
    code_doc = await store.codes.find_one_and_update({"_id": hash_code(after_credit)}, {"$set": {
        "redeemed_by": key_hash, "key_prefix": TEST_KEY[:10], "redeemed_at": store.now(), "applied": False}},
        return_document=True)
    await store.keys.update_one({"_id": key_hash}, {"$inc": {"granted": 300, "balance": 300},
                                                    "$push": {"redeemed": code_doc["_id"]}})
    assert await store.finish_redemptions() == 0, "young claims are left to the request that made them"
    assert await store.finish_redemptions(older_than=dt.timedelta(0)) == 2
    assert await store.finish_redemptions(older_than=dt.timedelta(0)) == 0
    doc = await store.key_doc(key_hash)
    assert (doc["granted"], doc["balance"]) == (1_000_600, 1_000_600), "each code credited exactly once"
    assert await store.grants.count_documents({"kind": "code"}) == 2
    # A repeat of the whole redemption (a lost answer, retried) credits nothing more.
    await store._apply_code(await store.codes.find_one({"_id": hash_code(after_claim)}))
    assert (await store.key_doc(key_hash))["granted"] == 1_000_600
    with pytest.raises(Exception) as used:
        await store.redeem(key_hash, TEST_KEY[:10], after_claim)
    assert getattr(used.value, "code", None) == "code_used"
    await assert_conserved(store)


async def test_50_concurrent_redemptions_of_one_code_across_two_processes_credit_once(embedded, tmp_path, io_loop):
    uri = db_uri(embedded, "codes" + uuid.uuid4().hex[:8])
    store = await open_store(uri)
    keys = [f"ak-race{i:02d}" + "0" * 33 for i in range(5)]
    for key in keys:
        await add_key(store, key, quota=1000)
    [code] = await store.create_codes(7000, 1)
    config = one_upstream_config("http://127.0.0.1:9/v1")
    relays = [await RelayProcess(config, tmp_path, "--mongodb-uri", uri, "--trusted-proxy", "127.0.0.1").start()
              for _ in range(2)]
    c = AsyncHTTPClient(force_instance=True, max_clients=50)
    try:
        # Each from its own address (behind the trusted proxy), so that no throttle interferes.
        results = await asyncio.gather(*(c.fetch(
            relays[i % 2].url + "/v1/redeem", method="POST", body=json.dumps({"code": code}), raise_error=False,
            headers={"Authorization": f"Bearer {keys[i % 5]}", "X-Forwarded-For": f"10.0.0.{i}"})
            for i in range(50)))
        codes = sorted(r.code for r in results)
        assert codes == [200] + [400] * 49, codes
        assert {json.loads(r.body)["error"]["code"] for r in results if r.code == 400} == {"code_used"}
        docs = {d["_id"]: d for d in await store.keys.find({}).to_list(None)}
        assert sorted(d["granted"] for d in docs.values()) == [1000] * 4 + [8000], "one key credited, once"
        assert await store.grants.count_documents({"kind": "code"}) == 1
        await assert_conserved(store)
    finally:
        for r in relays:
            await r.stop()
        c.close()
        await close_client(store.client)


async def test_codes_from_the_command_line_redeemed_through_a_running_relay(embedded, tmp_path, io_loop):
    uri = db_uri(embedded, "codecli" + uuid.uuid4().hex[:8])
    store = await open_store(uri)
    await add_key(store, quota=100)
    loop = asyncio.get_running_loop()

    async def cli(*args):
        return await loop.run_in_executor(None, lambda: relay_cli(*args, "--mongodb-uri", uri))
    made = await cli("codes", "create", "--quota", "2500", "--count", "3", "--note", "taobao 12")
    assert made.returncode == 0, made.stderr
    codes = made.stdout.split()
    assert len(codes) == 3 and all(c.startswith("rc-") for c in codes) and "shown once" in made.stderr
    relay = await RelayProcess(one_upstream_config("http://127.0.0.1:9/v1"), tmp_path, "--mongodb-uri", uri).start()
    c = AsyncHTTPClient(force_instance=True)
    try:
        resp = await c.fetch(relay.url + "/redeem", method="POST", body=json.dumps({"code": codes[1]}),
                             headers={"Authorization": f"Bearer {TEST_KEY}"})
        assert json.loads(resp.body)["balance"] == 2600
        off = await cli("codes", "disable", codes[2][:10])
        assert off.returncode == 0 and json.loads(off.stdout)["status"] == "disabled"
        listed = await cli("codes", "list")
        assert listed.returncode == 0
        rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
        assert rows[codes[0][:10]][1:3] == ["active", "2500"] and rows[codes[0][:10]][-1] == "12"
        assert rows[codes[1][:10]][1] == "redeemed" and TEST_KEY[:10] in rows[codes[1][:10]]
        assert rows[codes[2][:10]][1] == "disabled"
        assert not any(code in listed.stdout for code in codes)
        used = await cli("codes", "disable", codes[1])
        assert used.returncode == 1 and "redeemed already" in used.stderr
        minted = await cli("codes", "create", "--quota", "400", "--count", "2", "--new-keys")
        keys = minted.stdout.split()
        assert minted.returncode == 0 and len(keys) == 2 and all(k.startswith("ak-") for k in keys)
        sub = await c.fetch(relay.url + "/v1/dashboard/billing/subscription",
                            headers={"Authorization": f"Bearer {keys[0]}"})
        assert json.loads(sub.body)["hard_limit_usd"] == 400
        assert codes[1] not in relay.log(), "no code in the logs"
        await assert_conserved(store)
    finally:
        await relay.stop()
        c.close()
        await close_client(store.client)


async def test_a_starting_relay_finishes_a_redemption_a_crash_left_half_done(store, fake, io_loop):
    [code] = await store.create_codes(450, 1)
    key_hash = hash_key(TEST_KEY)
    await store.codes.update_one({"_id": hash_code(code)}, {"$set": {  # claimed a minute ago, never credited
        "redeemed_by": key_hash, "key_prefix": TEST_KEY[:10], "applied": False,
        "redeemed_at": store.now() - dt.timedelta(minutes=1)}})
    url, server, services = await serve(one_upstream_config(fake.base_url), store)
    try:
        async def credited():
            return (await store.key_doc(key_hash))["granted"] == 1_000_450
        await eventually(credited, timeout=10, message="the sweep finishes the redemption")
        assert (await store.codes.find_one({"_id": hash_code(code)}))["applied"] is True
        await assert_conserved(store)
    finally:
        server.stop()
        await services.close()


async def test_a_key_gone_from_the_store_within_its_cache_time_is_a_401_not_a_500(http_server_client, auth, store):
    c = http_server_client
    [code] = await make_codes(c, 100)
    assert (await c.fetch("/v1/models", headers=auth)).code == 200  # the key is cached now
    await store.keys.delete_one({"_id": hash_key(TEST_KEY)})
    gone = await post(c, "/v1/redeem", {"code": code}, auth)
    assert gone.code == 401 and error(gone)["code"] == "invalid_api_key"
    assert json.loads((await c.fetch(f"/admin/codes/{code}", headers=ADMIN)).body)["status"] == "active"
