"""The Tornado Application: routes, and the services they are handed."""
from __future__ import annotations

import ssl
from typing import Any

import tornado.httpserver
import tornado.iostream
import tornado.web

from relay import http_server
from relay.handlers import (
    admin,
    audio,
    billing,
    chat,
    codes,
    embeddings,
    images,
    models,
    responses,
    responses_ws,
    stored_responses,
    usage_page,
)
from relay.handlers.base import HealthzHandler, MetricsHandler, NotFoundHandler, ReadyzHandler, RelayHandler
from relay.handlers.completions import CompletionsHandler
from relay.handlers.moderations import ModerationsHandler
from relay.handlers.upgrade import WebSocketUpgrade
from relay.observability import recorder
from relay.services import Services, build_services
from relay.tornado_fastpath import RelayApplication

__all__ = ["Services", "build_services", "make_app", "make_metrics_app", "make_server"]


def _api(path: str) -> str:
    """Clients use both https://host/v1 and https://host/openai/v1 as their base URL."""
    return rf"/(?:openai/)?v1{path}"


def _billing(path: str) -> str:
    """ChatGPT-Next-Web calls {base}/dashboard/billing/... with no /v1; others add it."""
    return rf"/(?:openai/)?(?:v1/)?dashboard/billing{path}"


Server = tornado.httpserver.HTTPServer | http_server.HTTPServer


def make_app(services: Services, metrics: bool = True, **settings: Any) -> tornado.web.Application:
    """The application; ``metrics=False`` when /metrics is served on its own port instead."""
    kw = {"services": services}
    routes: list[tuple[str | WebSocketUpgrade, type[RelayHandler], dict[str, Services]]] = \
        [(r"/metrics", MetricsHandler, kw)] if metrics else []
    routes += [
        (_api("/chat/completions"), chat.ChatCompletionsHandler, kw),
        (_api("/embeddings"), embeddings.EmbeddingsHandler, kw),
        (_api("/models"), models.ModelsHandler, kw),
        (_api("/models/(.+)"), models.ModelHandler, kw),
        (_api("/completions"), CompletionsHandler, kw),
        (_api("/moderations"), ModerationsHandler, kw),
        (_api("/images/generations"), images.ImageGenerationsHandler, kw),
        (_api("/images/edits"), images.ImageEditsHandler, kw),
        (_api("/images/variations"), images.ImageVariationsHandler, kw),
        (_api("/audio/transcriptions"), audio.TranscriptionsHandler, kw),
        (_api("/audio/translations"), audio.TranslationsHandler, kw),
        (_api("/audio/speech"), audio.SpeechHandler, kw),
        (WebSocketUpgrade(_api("/responses")), responses_ws.ResponsesSocketHandler, kw),
        (_api("/responses"), responses.ResponsesHandler, kw),
        (_api("/responses/input_tokens"), responses.InputTokensHandler, kw),
        (_api("/responses/compact"), responses.CompactHandler, kw),
        (_api("/responses/([^/]+)(?:/(cancel|input_items))?"), stored_responses.StoredResponseHandler, kw),
        (_api("/redeem"), codes.RedeemHandler, kw),
        (r"/redeem", codes.RedeemHandler, kw),
        (_billing("/subscription"), billing.SubscriptionHandler, kw),
        (_billing("/usage"), billing.UsageHandler, kw),
        (r"/admin/keys", admin.KeysHandler, kw),
        (r"/admin/keys/([^/]+)", admin.KeyHandler, kw),
        (r"/admin/keys/([^/]+)/(topup|disable|enable)", admin.KeyActionHandler, kw),
        (r"/admin/codes", codes.AdminCodesHandler, kw),
        (r"/admin/codes/([^/]+)", codes.AdminCodeHandler, kw),
        (r"/admin/codes/([^/]+)/(disable)", codes.AdminCodeHandler, kw),
        (r"/admin/upstreams", admin.UpstreamsHandler, kw),
        (r"/admin/reload", admin.ReloadHandler, kw),
        (r"/usage", usage_page.UsagePageHandler, kw),
        (r"/usage/static/([a-z.]+)", usage_page.UsageStaticHandler, kw),
        (r"/usage/api/summary", usage_page.UsageSummaryHandler, kw),
        (r"/", usage_page.UsageRootHandler, kw),
        (r"/healthz", HealthzHandler, kw),
        (r"/readyz", ReadyzHandler, kw),
    ]
    return RelayApplication(
        routes, default_handler_class=NotFoundHandler, default_handler_args=kw,
        log_function=recorder.on_request_end, compress_response=False, **settings)


def make_metrics_app(services: Services) -> tornado.web.Application:
    """Only /metrics, for --metrics-port."""
    kw = {"services": services}
    return tornado.web.Application([(r"/metrics", MetricsHandler, kw)], default_handler_class=NotFoundHandler,
                                   default_handler_args=kw, log_function=lambda handler: None)


def make_server(app: tornado.web.Application, ssl_options: ssl.SSLContext | dict[str, Any] | None = None,
                max_body: int = 0, client_timeout_s: float = 60.0,
                body_timeout_s: float = 120.0) -> Server:
    """The HTTP server, with the limits that protect it from slow and idle clients.

    ``client_timeout_s`` bounds both reading a request's headers (slow-header clients) and an
    idle keep-alive connection; ``body_timeout_s`` bounds reading a body. The handlers enforce
    the configured body size limit themselves, with an OpenAI-shaped 413; the server's own cap
    is a backstop far above it. Plain HTTP is served by relay's own server
    (``relay/http_server.py``); TLS by Tornado's.
    """
    backstop = max(max_body * 4, 64 << 20)
    if ssl_options is None:
        return http_server.HTTPServer(app, idle_timeout=client_timeout_s, body_timeout=body_timeout_s,
                                      max_body_size=backstop)
    return _NoDelayServer(app, ssl_options=ssl_options, idle_connection_timeout=client_timeout_s,
                          body_timeout=body_timeout_s, max_body_size=backstop)



class _NoDelayServer(tornado.httpserver.HTTPServer):
    """TCP_NODELAY on every client connection, for its whole life.

    Tornado turns Nagle's algorithm on again after every request (and off at the end of the
    next), so a stream's second and later events can wait for the client's delayed ACK (up
    to 40 ms on a real network) and every request pays two setsockopt calls. relay writes
    whole responses and whole events, never bytes it would want coalesced. (asyncio and
    aiohttp set it on the upstream side already.)"""

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        stream.set_nodelay(True)
        # A deliberate monkeypatch of this one stream (the point of this class), which mypy
        # flags as assigning to a method.
        stream.set_nodelay = _keep_nodelay  # type: ignore[method-assign]
        super().handle_stream(stream, address)


def _keep_nodelay(value: bool) -> None:
    """Tornado's per-request toggling, ignored: the connection keeps TCP_NODELAY."""
