"""The Tornado Application: routes, and the services they are handed."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import tornado.web

from relay.auth import Authenticator
from relay.balancer.pool import Pool
from relay.config import Config
from relay.handlers import openai_api
from relay.handlers.base import HealthzHandler, NotFoundHandler
from relay.observability.access_log import log_request
from relay.proxy.router import Router
from relay.proxy.transport import Transport
from relay.store.base import KeyStore


@dataclass
class Services:
    router: Router
    auth: Authenticator
    transport: Transport
    trusted_proxies: tuple = field(default_factory=tuple)

    @property
    def config(self) -> Config:
        return self.router.pool.config

    async def close(self) -> None:
        await self.transport.close()


def build_services(config: Config, store: KeyStore, trusted_proxies: tuple = (),
                   rng: random.Random | None = None) -> Services:
    transport = Transport(config.limits, config.timeouts)
    return Services(router=Router(Pool.from_config(config), transport, rng),
                    auth=Authenticator(store), transport=transport, trusted_proxies=trusted_proxies)


def _api(path: str) -> str:
    """Clients use both https://host/v1 and https://host/openai/v1 as their base URL."""
    return rf"/(?:openai/)?v1{path}"


def make_app(services: Services, **settings) -> tornado.web.Application:
    kw = {"services": services}
    routes = [
        (_api("/chat/completions"), openai_api.ChatCompletionsHandler, kw),
        (_api("/embeddings"), openai_api.EmbeddingsHandler, kw),
        (_api("/models"), openai_api.ModelsHandler, kw),
        (r"/healthz", HealthzHandler, kw),
    ]
    return tornado.web.Application(
        routes, default_handler_class=NotFoundHandler, default_handler_args=kw,
        log_function=log_request, compress_response=False, **settings)
