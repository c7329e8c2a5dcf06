"""What relay sends upstream for one client request, rendered for each endpoint tried. Pure."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    path: str                                  # under the upstream's base URL, e.g. /chat/completions
    model: str = ""                            # the model served (after the global map); "" when none
    body: Mapping[str, Any] | None = None      # the client's body, parsed
    raw: bytes | None = None                   # its bytes, sent as they are when nothing differs
    extra: Mapping[str, Any] | None = None     # fields relay adds (stream_options.include_usage)
    content_type: str = "application/json"
    # (upstream name, key fingerprint): only that endpoint may serve it (a stored response lives
    # in the account that made it), tried once, with no failover.
    pinned: tuple[str, str] | None = None

    def render(self, upstream_model: str) -> bytes | None:
        """The body for an endpoint that calls the model ``upstream_model`` (its own model_map)."""
        if self.body is None:
            return self.raw
        if self.raw is not None and not self.extra and upstream_model == self.body.get("model"):
            return self.raw  # nothing to change: skip re-serialising
        return json.dumps({**self.body, "model": upstream_model, **(self.extra or {})},
                          separators=(",", ":")).encode()
