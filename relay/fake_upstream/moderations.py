"""POST /v1/moderations: OpenAI's result shape, flagged by a keyword so tests can tell."""
from __future__ import annotations

from typing import Any

from relay.fake_upstream.base import FakeHandler
from relay.fake_upstream.state import MODELS, error_body

CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
              "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
              "violence/graphic")
# A text holding one of these words is flagged in that category; every other score is tiny.
KEYWORDS = {"kill": "violence", "hate": "hate"}


def result(texts: list[str], images: bool) -> dict[str, Any]:
    text = " ".join(texts).lower()
    hit = {KEYWORDS[w] for w in KEYWORDS if w in text}
    kinds = ["text", "image"] if images else ["text"]
    return {"flagged": bool(hit), "categories": {c: c in hit for c in CATEGORIES},
            "category_scores": {c: 0.91 if c in hit else 1e-05 for c in CATEGORIES},
            "category_applied_input_types": {c: kinds if c in ("violence", "violence/graphic", "self-harm",
                                                               "sexual") else ["text"] for c in CATEGORIES}}


class ModerationsHandler(FakeHandler):
    async def post(self) -> None:
        body = self.parse()
        self.record(body)
        if body is None or not await self.check():
            return
        model = body.get("model") or "omni-moderation-latest"
        if model not in MODELS:
            return self.write_json(error_body(f"The model `{model}` does not exist", "invalid_request_error",
                                               "model_not_found"), 404)
        value = body.get("input")
        if isinstance(value, str):
            results = [result([value], False)]
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            results = [result([v], False) for v in value]
        elif isinstance(value, list) and value:  # multimodal parts: one input, one result
            parts = [p for p in value if isinstance(p, dict)]
            results = [result([p["text"] for p in parts if isinstance(p.get("text"), str)],
                              any(p.get("type") == "image_url" for p in parts))]
        else:
            return self.write_json(error_body("'input' is a required property", "invalid_request_error", None),
                                   400)
        reply: dict[str, Any] = {"id": f"modr-fake{self.state.counter}", "model": model, "results": results}
        if self.state.behaviour.usage_override is not None:
            reply["usage"] = self.state.behaviour.usage_override
        self.write_json(reply)
