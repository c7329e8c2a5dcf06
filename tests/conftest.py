import pytest

from relay.store.embedded import EmbeddedServer
from tests.helpers import TEST_KEY, add_key, mock_store, one_upstream_config, relay_app, start_fake

ADMIN_TOKEN = "admin-test-token-0123456789"


@pytest.fixture
def fake(io_loop):
    f = start_fake()
    yield f
    f.stop()


@pytest.fixture
def store(io_loop):
    s = mock_store()
    io_loop.run_sync(lambda: add_key(s))
    return s


@pytest.fixture
def relay(io_loop, fake, store):
    """The relay app and its services, pointed at one fake upstream, with TEST_KEY funded."""
    app, services = relay_app(one_upstream_config(fake.base_url), store, admin_token=ADMIN_TOKEN)
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


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A real MongoDB-compatible server (the embedded store's), shared by a test module."""
    server = EmbeddedServer(str(tmp_path_factory.mktemp("store")))
    uri = server.start()
    yield uri
    server.stop()
