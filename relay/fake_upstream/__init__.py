"""An OpenAI-compatible fake upstream: for trying relay offline and for tests.

It speaks OpenAI's wire format (one module per API) with deterministic replies, so token
counts are predictable. It can be told to misbehave (``Behaviour``) in-process or through
``POST /_fake/behaviour``, and it records what it was sent (``GET /_fake/requests``) so tests
can check what relay forwarded.
"""
from __future__ import annotations

from typing import Any

import tornado.web
from tornado.routing import Matcher

from relay.fake_upstream import audio, chat, control, embeddings, images, models, responses, responses_ws
from relay.fake_upstream.completions import CompletionsHandler
from relay.fake_upstream.moderations import ModerationsHandler
from relay.fake_upstream.state import MODELS, PIECES, Behaviour, FakeState, chat_usage, reply_pieces
from relay.handlers.upgrade import WebSocketUpgrade

__all__ = ["MODELS", "PIECES", "Behaviour", "FakeState", "chat_usage", "make_fake_app", "reply_pieces"]

ROUTES: list[tuple[str | Matcher, type[tornado.web.RequestHandler]]] = [
    (r"/v1/chat/completions", chat.ChatHandler),
    (r"/v1/embeddings", embeddings.EmbeddingsHandler),
    (r"/v1/models", models.ModelsHandler),
    (r"/v1/completions", CompletionsHandler),
    (r"/v1/moderations", ModerationsHandler),
    (r"/_fake/(behaviour|requests|reset)", control.ControlHandler),
    (r"/v1/images/generations", images.GenerationsHandler),
    (r"/v1/images/(?:edits|variations)", images.UploadsHandler),
    (r"/v1/audio/(?:transcriptions|translations)", audio.TranscriptionsHandler),
    (r"/v1/audio/speech", audio.SpeechHandler),
    (r"/_fake/files/([a-z0-9.-]+)", images.FileHandler),
    (WebSocketUpgrade(r"/v1/responses"), responses_ws.ResponsesSocketHandler),
    (r"/v1/responses", responses.ResponsesHandler),
    (r"/v1/responses/input_tokens", responses.InputTokensHandler),
    (r"/v1/responses/compact", responses.CompactHandler),
    (r"/v1/responses/([^/]+)(?:/(cancel|input_items))?", responses.StoredResponseHandler),
]


def make_fake_app(state: FakeState, quiet: bool = False) -> tornado.web.Application:
    kw = {"state": state}
    settings: dict[str, Any] = {"log_function": lambda handler: None} if quiet else {}
    return tornado.web.Application([(path, handler, kw) for path, handler in ROUTES], **settings)
