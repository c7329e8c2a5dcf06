"""GET /v1/models (relay's health probe)."""
from __future__ import annotations

from relay.fake_upstream.base import FakeHandler
from relay.fake_upstream.state import MODELS


class ModelsHandler(FakeHandler):
    async def get(self) -> None:
        self.record(None)
        if not await self.check():
            return
        self.write_json({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1686935002, "owned_by": "openai"} for m in MODELS]})

