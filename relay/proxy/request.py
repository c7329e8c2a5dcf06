"""What relay sends upstream for one client request, rendered for each endpoint tried. Pure."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.proxy.chunks import Chunks

# A rendered body: JSON bytes, or an upload as the chunks it arrived in (sent without joining).
Body = bytes | tuple[bytes, ...]


@dataclass(frozen=True)
class ModelField:
    """Where an upload names its model, so an endpoint with its own model_map gets its name:
    bytes [start, end) of the body become ``prefix + name + suffix`` (a part inserted when the
    client sent none: start == end)."""

    start: int
    end: int
    sent: str = ""          # the name the client's bytes carry ("" when none)
    prefix: bytes = b""
    suffix: bytes = b""


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    path: str                                  # under the upstream's base URL, e.g. /chat/completions
    model: str = ""                            # the model served (after the global map); "" when none
    body: Mapping[str, Any] | None = None      # the client's body, parsed
    raw: bytes | None = None                   # its bytes, sent as they are when nothing differs
    extra: Mapping[str, Any] | None = None     # fields relay adds (stream_options.include_usage)
    content_type: str = "application/json"
    upload: Chunks | None = None               # a multipart upload, kept as it arrived
    model_field: ModelField | None = None      # where the upload names its model
    # (upstream name, key fingerprint): only that endpoint may serve it (a stored response lives
    # in the account that made it), tried once, with no failover.
    pinned: tuple[str, str] | None = None

    def render(self, upstream_model: str) -> Body | None:
        """The body for an endpoint that calls the model ``upstream_model`` (its own model_map)."""
        if self.upload is not None:
            f = self.model_field
            if f is None or upstream_model == f.sent:
                return self.upload.parts
            return self.upload.splice(f.start, f.end, f.prefix + upstream_model.encode() + f.suffix)
        if self.body is None:
            return self.raw
        if self.raw is not None and not self.extra and upstream_model == self.body.get("model"):
            return self.raw  # nothing to change: skip re-serialising
        return json.dumps({**self.body, "model": upstream_model, **(self.extra or {})},
                          separators=(",", ":")).encode()
