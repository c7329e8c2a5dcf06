"""Images, transcriptions and speech: what a request holds before it is forwarded, and what its
reply delivered. Pure."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from math import ceil
from typing import Any

from relay.config import Config, Price
from relay.metering.audio import TOKENS_PER_SECOND
from relay.metering.encodings import count_tokens, encoding_for
from relay.metering.images import DEFAULT_PROFILE, MAX_TILES, tile_count
from relay.metering.quote import Quote, price_for, quote_tokens
from relay.metering.usage import Usage, parse_usage

# OpenAI's defaults when a request leaves them out.
DEFAULT_IMAGE_MODEL = "dall-e-2"
DEFAULT_SIZE = "1024x1024"
DEFAULT_QUALITY = "standard"

# gpt-image-1's output tokens per image, by quality and size (OpenAI's published table). Any
# other quality or size ("auto", "medium" at 2048x2048, ...) reserves the most in it.
OUTPUT_TOKENS_PER_IMAGE = {
    ("low", "1024x1024"): 272, ("low", "1024x1536"): 408, ("low", "1536x1024"): 400,
    ("medium", "1024x1024"): 1056, ("medium", "1024x1536"): 1584, ("medium", "1536x1024"): 1568,
    ("high", "1024x1024"): 4160, ("high", "1024x1536"): 6240, ("high", "1536x1024"): 6208,
}
MOST_OUTPUT_TOKENS_PER_IMAGE = max(OUTPUT_TOKENS_PER_IMAGE.values())
# An input image of an edit, reserved by the tile rule on its header's size (the most tiles
# when unreadable), plus this much more with input_fidelity "high". Settled from ``usage``.
HIGH_FIDELITY_TOKENS = 6240


@dataclass(frozen=True)
class ImageRequest:
    n: int = 1
    size: str = DEFAULT_SIZE
    quality: str = DEFAULT_QUALITY
    prompt: str = ""
    input_images: tuple[tuple[int, int] | None, ...] = ()  # (width, height) of each image sent, when readable
    high_fidelity: bool = False

    @property
    def kind(self) -> str:
        """The ``per_image`` key of these images: "size/quality"."""
        return f"{self.size}/{self.quality}"


def token_priced(price: Price) -> bool:
    """Whether the model has per-token prices (gpt-image, gpt-4o-transcribe), not only per-unit ones."""
    return bool(price.input or price.output or price.image_input or price.audio_input or price.tiers)


def quote_images(config: Config, model: str, req: ImageRequest) -> Quote:
    """n images at their size's and quality's price (the dearest when the table has neither);
    for a token-priced model also the prompt, the input images and n × the output tokens an
    image of that quality and size takes (the most of the table when it is not in it)."""
    price = price_for(config, model)
    prompt = Usage(images=req.n, image_kind=req.kind)
    allowance = 0
    if token_priced(price):
        text = count_tokens(req.prompt, encoding_for(model, config.quota.encodings))
        images = sum(_input_image_tokens(size, req.high_fidelity) for size in req.input_images)
        prompt = replace(prompt, prompt_tokens=text + images, image_tokens=images)
        allowance = req.n * OUTPUT_TOKENS_PER_IMAGE.get((req.quality, req.size), MOST_OUTPUT_TOKENS_PER_IMAGE)
    return quote_tokens(model, price, prompt, allowance)


def _input_image_tokens(size: tuple[int, int] | None, high_fidelity: bool) -> int:
    tiles = tile_count(*size) if size else MAX_TILES
    return DEFAULT_PROFILE.base + DEFAULT_PROFILE.per_tile * tiles + (HIGH_FIDELITY_TOKENS if high_fidelity else 0)


def image_usage(reply: Any, quote: Quote, n: int) -> Usage:
    """The images a reply delivered (at most the n asked for) and, for gpt-image models, the
    tokens it reports; without a report, the reservation's estimate for each image delivered."""
    data = reply.get("data") if isinstance(reply, dict) else None
    images = min(len(data), n) if isinstance(data, list) else 0
    reported = parse_usage(reply)
    if reported is not None:
        return replace(reported, images=images, image_kind=quote.prompt.image_kind)
    per_image = quote.allowance // n if n else 0
    return replace(quote.prompt, images=images, completion_tokens=per_image * images)


def quote_transcription(config: Config, model: str, seconds: float) -> Quote:
    """The audio's seconds (rounded up) at ``per_second``; for a token-priced model also its
    audio tokens (10 a second) and the model's completion allowance for the transcript."""
    price = price_for(config, model)
    prompt = Usage(seconds=ceil(seconds))
    allowance = 0
    if token_priced(price):
        audio = ceil(seconds * TOKENS_PER_SECOND)
        prompt = replace(prompt, prompt_tokens=audio, audio_input_tokens=audio)
        allowance = config.quota.allowance_for(model)
    return quote_tokens(model, price, prompt, allowance)


def transcription_usage(reply: Any, text: str, quote: Quote, encoding: str) -> Usage:
    """What a transcription used: the upstream's ``usage`` (tokens, or a duration in seconds),
    else verbose_json's ``duration``, else the seconds read from the file; tokens not reported
    are the audio as estimated and the transcript ``text`` as counted."""
    usage = reply.get("usage") if isinstance(reply, dict) else None
    seconds = quote.prompt.seconds
    reported_seconds = _seconds(usage.get("seconds")) if isinstance(usage, dict) else None
    duration = _seconds(reply.get("duration")) if isinstance(reply, dict) else None
    seconds = next((s for s in (reported_seconds, duration) if s is not None), seconds)
    tokens = parse_usage(reply)
    if tokens is not None:
        return replace(tokens, seconds=seconds)
    if not quote.prompt.prompt_tokens:  # priced per second only
        return replace(quote.prompt, seconds=seconds)
    return replace(quote.prompt, seconds=seconds, completion_tokens=count_tokens(text, encoding))


def _seconds(value: Any) -> int | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        return None
    return ceil(value)


def quote_speech(config: Config, model: str, text: str) -> Quote:
    """Every character of the input, at ``per_character``: what the request holds and, once any
    audio has reached the client, what it pays."""
    return quote_tokens(model, price_for(config, model), Usage(characters=len(text)), 0, limited=True)
