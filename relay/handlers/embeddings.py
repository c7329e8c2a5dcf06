"""POST /embeddings."""
from __future__ import annotations

from relay.errors import InvalidRequest
from relay.handlers.proxy import ProxyHandler
from relay.metering.quote import quote_embedding


class EmbeddingsHandler(ProxyHandler):
    upstream_path = "/embeddings"
    route = "embeddings"

    async def post(self) -> None:
        body = self.parsed_body()
        served = self.resolve_model(body)
        value = body.get("input")
        if value is None:
            raise InvalidRequest("You must provide an input parameter.", param="input")
        if not isinstance(value, (str, list)) or value == [] or value == "":
            raise InvalidRequest("'input' must be a non-empty string or array.", param="input")
        await self.forward(self.upstream_request(body, served), quote_embedding(self.services.config, served, body),
                           False, body)

