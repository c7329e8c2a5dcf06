"""POST /moderations: free at OpenAI's prices, but authorized, priced, metered and in the ledger."""
from __future__ import annotations

from dataclasses import replace

from relay.errors import InvalidRequest
from relay.handlers.proxy import ProxyHandler
from relay.metering.quote import quote_moderation

# What OpenAI uses when a request names no model.
DEFAULT_MODEL = "omni-moderation-latest"


class ModerationsHandler(ProxyHandler):
    upstream_path = "/moderations"
    route = "moderations"

    async def post(self) -> None:
        body = self.parsed_body()
        defaulted = body.get("model") is None
        if defaulted:
            body["model"] = DEFAULT_MODEL
        served = self.resolve_model(body)
        value = body.get("input")
        if value is None:
            raise InvalidRequest("You must provide an input parameter.", param="input")
        if not isinstance(value, (str, list)) or value == []:
            raise InvalidRequest("'input' must be a string, an array of strings or an array of input parts.",
                                 param="input")
        if isinstance(value, list) and not all(isinstance(v, (str, dict)) for v in value):
            raise InvalidRequest("'input' items must be strings or objects.", param="input")
        request = self.upstream_request(body, served)
        if defaulted:  # the upstream is told the model relay priced, not left to its own default
            request = replace(request, raw=None)
        await self.forward(request, quote_moderation(self.services.config, served, body), False, body)
