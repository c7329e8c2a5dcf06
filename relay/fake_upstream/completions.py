"""POST /v1/completions (legacy text completions), JSON and server-sent events, as OpenAI sends them."""
from __future__ import annotations

import json
import time
from typing import Any

from relay.fake_upstream.base import HangUpRecorded
from relay.fake_upstream.state import MODELS, error_body, reply_pieces
from relay.metering.completions import DEFAULT_MAX_TOKENS, count_completion_prompt
from relay.metering.tokens import count_text, encoder


def prompts_of(prompt: Any) -> list[str]:
    """Each prompt as text (token arrays decoded), one per prompt the request sends."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [encoder().decode(prompt)]
    if isinstance(prompt, list):
        return [p if isinstance(p, str) else encoder().decode(p) for p in prompt]
    return [""]


class CompletionsHandler(HangUpRecorded):
    async def post(self) -> None:
        body = self.parse()
        self.record(body)
        if body is None or not await self.check():
            return
        model, prompt = body.get("model"), body.get("prompt")
        if prompt is None:
            return self.write_json(error_body("you must provide a prompt parameter", "invalid_request_error",
                                               None), 400)
        if model not in MODELS:
            return self.write_json(error_body(f"The model `{model}` does not exist", "invalid_request_error",
                                               "model_not_found"), 404)
        b = self.state.behaviour
        limit = body.get("max_tokens")
        limit = DEFAULT_MAX_TOKENS if limit is None else limit
        pieces = reply_pieces(min(b.reply_tokens, limit))
        n, best_of = body.get("n") or 1, body.get("best_of") or 1
        echo = body.get("echo") is True
        try:
            prompts = prompts_of(prompt)
        except (KeyError, TypeError, ValueError):
            return self.write_json(error_body("Invalid token in prompt.", "invalid_request_error", None), 400)
        # Every prompt's tokens once (token arrays as given), with its suffix; every generated
        # completion's tokens, the best_of ones not returned included.
        counted = count_completion_prompt(body, "cl100k_base")
        prompt_tokens = counted.tokens + counted.suffix * counted.prompts
        completion = count_text("".join(pieces)) * max(n, best_of) * len(prompts)
        usage: dict[str, Any] | None = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                        "total_tokens": prompt_tokens + completion}
        if b.usage_override is not None:
            usage = b.usage_override
        finish = "length" if len(pieces) < b.reply_tokens else "stop"
        cid, created = f"cmpl-fake{self.state.counter}", int(time.time())
        texts = [(p if echo else "") for p in prompts for _ in range(n)]
        if body.get("stream") is True:
            opts = body.get("stream_options") or {}
            with_usage = bool(opts.get("include_usage")) and not b.omit_usage
            await self.stream(cid, created, model, texts, pieces, finish, usage if with_usage else None, with_usage)
            return
        self.write_json({
            "id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": echoed + "".join(pieces), "index": i, "logprobs": None, "finish_reason": finish}
                        for i, echoed in enumerate(texts)],
            "usage": None if b.omit_usage else usage, "system_fingerprint": "fp_fake"})

    async def stream(self, cid: str, created: int, model: str, echoed: list[str], pieces: list[str], finish: str,
                     usage: dict[str, Any] | None, with_usage: bool) -> None:
        def chunk(choices: list[dict[str, Any]], usage_value: dict[str, Any] | None = None) -> bytes:
            obj: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model,
                                   "system_fingerprint": "fp_fake", "choices": choices}
            if with_usage:
                obj["usage"] = usage_value
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        def choice(i: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
            return {"text": text, "index": i, "logprobs": None, "finish_reason": finish_reason}

        # OpenAI interleaves the choices: each event carries one choice's next piece.
        events = [chunk([choice(i, text)]) for i, text in enumerate(echoed) if text]
        events += [chunk([choice(i, p)]) for p in pieces for i in range(len(echoed))]
        events += [chunk([choice(i, "", finish)]) for i in range(len(echoed))]
        if with_usage:
            events.append(chunk([], usage))
        events.append(b"data: [DONE]\n\n")
        await self.send_events(events)
