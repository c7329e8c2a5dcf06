"""The fake upstream's state: how it behaves (told by tests or ``POST /_fake/behaviour``), what
it was sent, and the replies it makes (deterministic, so token counts are predictable)."""
from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field
from typing import Any

PIECES = ["Hello", " from", " the", " fake", " upstream", ",", " relay", " says", " hi", "!"]
MODELS = ["gpt-3.5-turbo-1106", "gpt-3.5-turbo", "gpt-3.5-turbo-16k", "gpt-4", "gpt-4-32k",
          "gpt-4-1106-preview", "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini",
          "gpt-5", "gpt-5-mini", "gpt-5-nano", "text-embedding-ada-002", "text-embedding-3-small",
          "text-embedding-3-large", "gpt-3.5-turbo-instruct", "omni-moderation-latest", "text-moderation-latest"]


def reply_pieces(n: int) -> list[str]:
    return [PIECES[i % len(PIECES)] for i in range(n)]


@dataclass
class Behaviour:
    reply_tokens: int = 10           # pieces in a reply (each one token in cl100k)
    status: int | None = None        # answer every request with this error status
    error_code: str | None = None    # OpenAI error code in that body (invalid_api_key, ...)
    retry_after: int | None = None   # Retry-After header on errors
    first_byte_delay: float = 0.0    # seconds before the response starts
    chunk_delay: float = 0.0         # seconds between stream chunks
    stall_after_chunks: int | None = None     # stop sending (hang) after N content chunks
    truncate_after_chunks: int | None = None  # close the connection after N content chunks
    omit_usage: bool = False         # never report usage (relay must count itself)
    # Report exactly this as ``usage`` (JSON replies, the stream's usage chunk).
    usage_override: dict[str, Any] | None = None
    cached_tokens: int = 0           # this much of each prompt is reported as read from the cache
    reasoning_tokens: int = 0        # thinking before the reply: reported, billed, never shown
    key_status: dict[str, int] = field(default_factory=dict)  # per upstream key: answer with this status
    broken: str | None = None        # "invalid_json", "html" (a 200 error page), "sse_garbage"


def error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class FakeState:
    """``initial``: the behaviour it starts with and a reset returns to (the command line's delays)."""

    def __init__(self, keys: set[str] | None = None, max_records: int = 10_000,
                 initial: Behaviour | None = None) -> None:
        self.keys = keys
        self.initial = initial or Behaviour()
        self.behaviour = copy.deepcopy(self.initial)
        self.requests: deque[dict[str, Any]] = deque(maxlen=max_records)
        self.counter = 0
        # Stored responses by id, as an OpenAI account keeps them: each with the key that made it.
        self.responses: dict[str, dict[str, Any]] = {}

    def reset(self) -> None:
        self.behaviour = copy.deepcopy(self.initial)
        self.requests.clear()
        self.responses.clear()


def chat_usage(prompt: int, text: int, b: Behaviour) -> dict[str, Any]:
    """Usage as OpenAI reports it for today's models: the cached part of the prompt and the
    reasoning part of the completion in their details."""
    completion = text + b.reasoning_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(b.cached_tokens, prompt), "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": b.reasoning_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}

