"""Stored responses across relay processes: two relays on one real store (the embedded server),
two upstream accounts; every call about a response reaches the account that made it, from either
process and after a restart, for its owner only; an account gone from the file is a 503."""
import uuid

import pytest
from openai import AsyncOpenAI, InternalServerError, NotFoundError

from relay.store.connect import close_client, open_store
from tests.conservation import assert_conserved, settled
from tests.helpers import PRICING, TEST_KEY, add_key, eventually, start_fake
from tests.processes import RelayProcess, db_uri

OTHER_KEY = "ak-test0000000000000000000000000000000000000002"


def two_accounts(alpha, beta, with_beta: bool = True) -> str:
    upstreams = f"""
upstreams:
  - {{name: alpha, base_url: {alpha.base_url}, keys: [sk-alpha-account-key-0001]}}
"""
    if with_beta:
        upstreams += f"  - {{name: beta, base_url: {beta.base_url}, keys: [sk-beta-account-key-0002]}}\n"
    return upstreams + PRICING


@pytest.fixture
def uri(embedded):
    return db_uri(embedded, "t" + uuid.uuid4().hex[:10])


@pytest.fixture
def fakes(io_loop):
    pair = start_fake(), start_fake()
    yield pair
    for f in pair:
        f.stop()


def sdk(relay: RelayProcess, key: str = TEST_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=relay.url + "/v1", api_key=key, max_retries=0)


def about(fake, response_id: str) -> list[tuple[str, str]]:
    """What a fake was asked about one response: (method, path) of each call, and continuations."""
    return [(r["method"], r["path"]) for r in fake.requests
            if response_id in r["path"] or r.get("previous_response_id") == response_id]


@pytest.mark.timeout(120)
async def test_a_stored_response_is_served_by_its_account_from_any_process_and_after_a_restart(
        uri, fakes, tmp_path, io_loop):
    store = await open_store(uri)
    await add_key(store)
    await add_key(store, OTHER_KEY)
    alpha, beta = fakes
    relays = [await RelayProcess(two_accounts(alpha, beta), tmp_path, "--mongodb-uri", uri).start()
              for _ in range(2)]
    clients = [sdk(r) for r in relays]
    others: list[AsyncOpenAI] = []
    try:
        made: dict[str, object] = {}  # response id -> the fake that made it
        for i in range(40):
            if i >= 4 and {id(f) for f in made.values()} == {id(alpha), id(beta)}:
                break
            # A different prompt each time: cache affinity keeps one prompt on one account.
            created = await clients[i % 2].responses.create(model="gpt-4", input=f"Hi {i}", stream=False)
            made[created.id] = alpha if created.id in alpha.state.responses else beta
        assert {id(f) for f in made.values()} == {id(alpha), id(beta)}, "both accounts made responses"

        for n, (rid, owner) in enumerate(made.items()):
            other_process = clients[(n + 1) % 2]
            assert (await other_process.responses.retrieve(rid)).id == rid
            assert [i.type async for i in other_process.responses.input_items.list(rid)] == ["message"]
            follow = await other_process.responses.create(model="gpt-4", input="And?", previous_response_id=rid)
            assert follow.id in owner.state.responses, "the continuation was made by the same account"
            assert ("POST", "/v1/responses") in about(owner, rid)
            stranger = beta if owner is alpha else alpha
            assert about(stranger, rid) == [], "nothing about it went to the other account"

        # Another key, through either process: 404, as for an id nobody made.
        stranger_sdk = sdk(relays[1], OTHER_KEY)
        others.append(stranger_sdk)
        for rid in made:
            with pytest.raises(NotFoundError):
                await stranger_sdk.responses.retrieve(rid)

        # A restarted relay knows every response from the store alone.
        await relays[0].stop()
        relays[0] = await RelayProcess(two_accounts(alpha, beta), tmp_path, "--mongodb-uri", uri).start()
        restarted = sdk(relays[0])
        others.append(restarted)
        for rid in made:
            assert (await restarted.responses.retrieve(rid)).id == rid

        # beta removed from the file: its responses get a clear 503, never a call to alpha.
        relays[0].config.write_text(two_accounts(alpha, beta, with_beta=False))
        beta_id = next(rid for rid, f in made.items() if f is beta)
        alpha_calls = len(alpha.requests)

        async def refused() -> bool:
            try:
                await restarted.responses.retrieve(beta_id)
            except InternalServerError as err:
                return err.status_code == 503 and err.code == "pinned_endpoint_unavailable"
            return False

        await eventually(refused, timeout=15, interval=0.2, message="the reload makes beta's responses a 503")
        assert all(beta_id not in r["path"] for r in alpha.requests[alpha_calls:])
    finally:
        for c in (*clients, *others):
            await c.close()
        for r in relays:
            await r.stop()
    await settled(store)
    assert sum(e["api"] == "responses" for e in await store.ledger_entries()) == 2 * len(made)
    await assert_conserved(store)
    await close_client(store.client)
