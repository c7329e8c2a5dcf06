"""What a request used, in the parts that are priced apart, and how upstreams report it. Pure.

OpenAI reports chat usage as ``prompt_tokens``/``completion_tokens`` with details, the
Responses API (and gpt-image, and token-billed transcription) as ``input_tokens``/
``output_tokens`` with details. A count that is not a count (a boolean, a float, a negative
number) is ignored: relay then counts itself.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, TypeGuard

from relay.metering.bounds import MAX_TOKENS


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0         # every input token, those below included
    completion_tokens: int = 0     # every output token, those below included
    cached_tokens: int = 0         # of prompt_tokens: read from the upstream's prompt cache
    image_tokens: int = 0          # of prompt_tokens: input images
    audio_input_tokens: int = 0    # of prompt_tokens: input audio
    reasoning_tokens: int = 0      # of completion_tokens: thinking the client does not see
    audio_output_tokens: int = 0   # of completion_tokens: spoken output
    images: int = 0                # images generated (priced per image)
    seconds: int = 0               # seconds of audio transcribed (priced per second)
    characters: int = 0            # characters read aloud (priced per character)
    image_kind: str = ""           # the generated images' "size/quality", for their price

    @property
    def text_input(self) -> int:
        return max(self.prompt_tokens - self.cached_tokens - self.image_tokens - self.audio_input_tokens, 0)

    @property
    def text_output(self) -> int:
        return max(self.completion_tokens - self.reasoning_tokens - self.audio_output_tokens, 0)

    def clamped(self) -> Usage:
        """Every count within [0, MAX_TOKENS], and every part within its whole."""
        if self.within_bounds():
            return self  # what upstreams send: no copy
        c: dict[str, Any] = {f.name: min(max(getattr(self, f.name), 0), MAX_TOKENS) for f in fields(self)
                             if f.name != "image_kind"}
        c["image_kind"] = self.image_kind[:64]
        for part in ("cached_tokens", "image_tokens", "audio_input_tokens"):
            c[part] = min(c[part], c["prompt_tokens"])
        for part in ("reasoning_tokens", "audio_output_tokens"):
            c[part] = min(c[part], c["completion_tokens"])
        return Usage(**c)

    def within_bounds(self) -> bool:
        p, c = self.prompt_tokens, self.completion_tokens
        return (0 <= p <= MAX_TOKENS and 0 <= c <= MAX_TOKENS and len(self.image_kind) <= 64
                and 0 <= self.cached_tokens <= p and 0 <= self.image_tokens <= p and 0 <= self.audio_input_tokens <= p
                and 0 <= self.reasoning_tokens <= c and 0 <= self.audio_output_tokens <= c
                and 0 <= self.images <= MAX_TOKENS and 0 <= self.seconds <= MAX_TOKENS
                and 0 <= self.characters <= MAX_TOKENS)

    def with_completion(self, completion_tokens: int) -> Usage:
        """The same, with the output capped (its parts too)."""
        return replace(self, completion_tokens=completion_tokens,
                       reasoning_tokens=min(self.reasoning_tokens, completion_tokens),
                       audio_output_tokens=min(self.audio_output_tokens, completion_tokens))


def parse_usage(obj: object) -> Usage | None:
    """The usage in a reply, a stream's usage chunk or a ``response.completed`` event's
    response: None when there is none that counts."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage or "output_tokens" in usage:
        return _input_output(usage)
    return _prompt_completion(usage)


def _prompt_completion(usage: dict[str, Any]) -> Usage | None:
    """Chat completions, legacy completions, embeddings (no completion: total minus prompt)."""
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if c is None and _is_count(usage.get("total_tokens")) and _is_count(p):
        c = usage["total_tokens"] - p
    if not (_is_count(p) and _is_count(c)):
        return None
    prompt_details, completion_details = _details(usage, "prompt_tokens_details"), \
        _details(usage, "completion_tokens_details")
    return Usage(prompt_tokens=p, completion_tokens=c,
                 cached_tokens=_count(prompt_details, "cached_tokens"),
                 image_tokens=_count(prompt_details, "image_tokens"),
                 audio_input_tokens=_count(prompt_details, "audio_tokens"),
                 reasoning_tokens=_count(completion_details, "reasoning_tokens"),
                 audio_output_tokens=_count(completion_details, "audio_tokens"))


def _input_output(usage: dict[str, Any]) -> Usage | None:
    """The Responses API, gpt-image models, token-billed transcription."""
    i, o = usage.get("input_tokens"), usage.get("output_tokens", 0)
    if not (_is_count(i) and _is_count(o)):
        return None
    inp = _details(usage, "input_tokens_details") or _details(usage, "input_token_details")
    out = _details(usage, "output_tokens_details") or _details(usage, "output_token_details")
    return Usage(prompt_tokens=i, completion_tokens=o,
                 cached_tokens=_count(inp, "cached_tokens"), image_tokens=_count(inp, "image_tokens"),
                 audio_input_tokens=_count(inp, "audio_tokens"),
                 reasoning_tokens=_count(out, "reasoning_tokens"), audio_output_tokens=_count(out, "audio_tokens"))


def _details(usage: dict[str, Any], name: str) -> dict[str, Any]:
    value = usage.get(name)
    return value if isinstance(value, dict) else {}


def _count(details: dict[str, Any], name: str) -> int:
    value = details.get(name)
    return value if _is_count(value) else 0


def _is_count(value: object) -> TypeGuard[int]:
    return type(value) is int and value >= 0
