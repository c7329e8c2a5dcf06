import pytest

from tests.helpers import TEST_KEY, one_upstream_config, relay_app, start_fake


@pytest.fixture
def fake(io_loop):
    f = start_fake()
    yield f
    f.stop()


@pytest.fixture
def relay(io_loop, fake):
    """The relay app and its services, pointed at one fake upstream."""
    app, services = relay_app(one_upstream_config(fake.base_url))
    yield app, services
    io_loop.run_sync(services.close)


@pytest.fixture
def app(relay):
    return relay[0]


@pytest.fixture
def services(relay):
    return relay[1]


@pytest.fixture
def base_url(http_server_client):
    return http_server_client.get_url("/v1")


@pytest.fixture
def auth():
    return {"Authorization": f"Bearer {TEST_KEY}"}
