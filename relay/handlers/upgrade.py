"""A route for WebSocket upgrades only: the same path can then serve POST with another handler."""
from __future__ import annotations

from typing import Any

from tornado import httputil
from tornado.routing import PathMatches


class WebSocketUpgrade(PathMatches):
    """Matches ``path_pattern`` only on a request that asks to upgrade to a WebSocket."""

    def match(self, request: httputil.HTTPServerRequest) -> dict[str, Any] | None:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return None
        return super().match(request)
