"""POST /v1/embeddings: a deterministic vector per input."""
from __future__ import annotations

import base64
import hashlib
import json
import struct

from relay.fake_upstream.base import FakeHandler
from relay.metering.tokens import count_embedding_input

EMBEDDING_DIM = 8


class EmbeddingsHandler(FakeHandler):
    async def post(self) -> None:
        body = self.parse()
        self.record(body)
        if body is None or not await self.check():
            return
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) and not all(isinstance(x, int) for x in inputs) else [inputs]
        data = []
        for i, item in enumerate(items):
            seed = hashlib.sha256(json.dumps(item).encode()).digest()
            vector = [((seed[j] / 255.0) * 2 - 1) for j in range(EMBEDDING_DIM)]
            value: str | list[float]
            if body.get("encoding_format") == "base64":
                value = base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vector)).decode()
            else:
                value = vector
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = count_embedding_input(inputs)
        usage = self.state.behaviour.usage_override
        self.write_json({"object": "list", "data": data, "model": body.get("model"),
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens} if usage is None else usage})

