"""POST /images/generations (JSON), /images/edits and /images/variations (multipart uploads),
priced per image or by the tokens a gpt-image model reports."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from relay.errors import InvalidRequest, UpstreamError
from relay.handlers.proxy import OFF_LOOP_REPLY_BYTES, ProxyHandler
from relay.handlers.upload import MB, UploadHandler, fields, part_reader, text_field
from relay.metering.images import size_from_header
from relay.metering.media import (
    DEFAULT_IMAGE_MODEL,
    DEFAULT_QUALITY,
    DEFAULT_SIZE,
    ImageRequest,
    image_usage,
    quote_images,
)
from relay.metering.usage import Usage
from relay.proxy.transport import UpstreamResponse

MAX_IMAGES = 10
MAX_PROMPT_CHARS = 32000  # gpt-image-1's limit (dall-e-3: 4000, dall-e-2: 1000; the upstream checks those)
_SIZE = re.compile(r"auto|[1-9][0-9]{1,4}x[1-9][0-9]{1,4}")
_QUALITY = re.compile(r"[a-z]{1,16}")
RESPONSE_FORMATS = ("url", "b64_json")
IMAGE_FIELDS = ("image", "image[]")


class _ImagesMixin(ProxyHandler):
    route = "images"

    def image_request(self, get: dict[str, Any], form: bool) -> ImageRequest:
        """The options that set the price, validated; ``form``: the values are multipart text."""
        n = get.get("n")
        if form and isinstance(n, str):
            n = int(n) if n.isdigit() and len(n) <= 3 else n
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_IMAGES):
            raise InvalidRequest(f"'n' must be a whole number from 1 to {MAX_IMAGES}.", param="n")
        size, quality, prompt = get.get("size"), get.get("quality"), get.get("prompt")
        if size is not None and (not isinstance(size, str) or not _SIZE.fullmatch(size)):
            raise InvalidRequest("'size' must be 'auto' or WIDTHxHEIGHT, such as '1024x1024'.", param="size")
        if quality is not None and (not isinstance(quality, str) or not _QUALITY.fullmatch(quality)):
            raise InvalidRequest("'quality' must be a word such as 'standard', 'hd', 'low' or 'high'.",
                                 param="quality")
        fmt = get.get("response_format")
        if fmt is not None and fmt not in RESPONSE_FORMATS:
            raise InvalidRequest("'response_format' must be 'url' or 'b64_json'.", param="response_format")
        if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS):
            raise InvalidRequest(f"'prompt' must be a string of at most {MAX_PROMPT_CHARS} characters.",
                                 param="prompt")
        if get.get("stream") in (True, "true"):
            raise InvalidRequest("Streamed image generation is not supported by this relay.", param="stream")
        self.images_asked = n or 1
        return ImageRequest(n=self.images_asked, size=size or DEFAULT_SIZE, quality=quality or DEFAULT_QUALITY,
                            prompt=prompt or "", high_fidelity=get.get("input_fidelity") == "high")

    async def reply_usage(self, data: bytes, resp: UpstreamResponse) -> Usage:
        # A reply of ten base64 images is tens of megabytes: parsed off the loop.
        parse = _parse_reply
        reply = await asyncio.to_thread(parse, data) if len(data) > OFF_LOOP_REPLY_BYTES else parse(data)
        if reply is None:
            raise UpstreamError(f"upstream {resp.endpoint.upstream.name} sent a reply that is not JSON")
        return image_usage(reply, self.charge.quote, self.images_asked)


def _parse_reply(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


class ImageGenerationsHandler(_ImagesMixin):
    upstream_path = "/images/generations"

    async def post(self) -> None:
        body = self.parsed_body()
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            raise InvalidRequest("You must provide a prompt.", param="prompt")
        # OpenAI's default model, sent explicitly so the upstream and the price agree.
        served = self.resolve_model({**body, "model": body.get("model", DEFAULT_IMAGE_MODEL)})
        req = self.image_request(body, form=False)
        await self.forward(self.upstream_request(body, served), quote_images(self.services.config, served, req),
                           False, body)


class _ImageUploadHandler(_ImagesMixin, UploadHandler):
    # OpenAI takes gpt-image-1's images up to 50 MB each (dall-e-2's up to 4 MB): one of them,
    # or several that together stay within it, with the form's other fields.
    max_body = 50 * MB + 64 * 1024
    keep_fields = frozenset({"model", "n", "size", "quality", "response_format", "prompt", "input_fidelity",
                             "stream"})

    async def post(self) -> None:
        body, parts = self.upload_parts()
        kept = fields(parts)
        values = {name: text_field(kept, name) for name in kept}
        model_part = kept.get("model")
        served = self.resolve_model({"model": values.get("model", DEFAULT_IMAGE_MODEL)})
        images = [p for p in parts if p.name in IMAGE_FIELDS]
        if not images:
            raise InvalidRequest("You must provide an image.", param="image")
        req = self.image_request(values, form=True)
        sizes = tuple(size_from_header(part_reader(body, p)) for p in images)
        quote = quote_images(self.services.config, served, ImageRequest(
            req.n, req.size, req.quality, req.prompt, sizes, req.high_fidelity))
        await self.forward(self.upload_request(body, served, model_part), quote, False, {})


class ImageEditsHandler(_ImageUploadHandler):
    upstream_path = "/images/edits"


class ImageVariationsHandler(_ImageUploadHandler):
    upstream_path = "/images/variations"
