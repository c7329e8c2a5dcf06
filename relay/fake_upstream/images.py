"""POST /v1/images/generations, /edits, /variations as OpenAI answers them: small valid PNGs as
base64 (b64_json) or URLs this fake serves, and gpt-image models' token ``usage``."""
from __future__ import annotations

import base64
import hashlib
import struct
import time
import zlib
from typing import Any

import tornado.web
from tornado.httputil import HTTPFile, parse_body_arguments

from relay.fake_upstream.base import FakeHandler
from relay.fake_upstream.state import error_body
from relay.metering.tokens import count_text

# gpt-image-1's output tokens per 1024x1024 image by quality (1.5 times that for other sizes).
OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160}
INPUT_IMAGE_TOKENS = 323  # what the fake reports per input image of an edit


def png(width: int = 2, height: int = 2, rgb: tuple[int, int, int] = (64, 128, 255)) -> bytes:
    """A valid PNG of one colour."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


IMAGE = png()


class _ImagesHandler(FakeHandler):
    async def upload(self) -> tuple[dict[str, Any], dict[str, list[HTTPFile]]] | None:
        """A multipart body's fields and files, recorded and checked as any request is; None
        when answered (a 400 for a body that is not multipart, or what ``check`` answered)."""
        args: dict[str, list[bytes]] = {}
        files: dict[str, list[HTTPFile]] = {}
        parse_body_arguments(self.request.headers.get("Content-Type", ""), self.request.body, args, files)
        if not args and not files:
            self.write_json(error_body("Invalid multipart form data.", "invalid_request_error", None), 400)
            return None
        fields = {k: v[0].decode() for k, v in args.items()}
        self.record(fields)
        self.rec.update(fields=fields, files={k: [len(f.body) for f in v] for k, v in files.items()},
                        body_sha256=hashlib.sha256(self.request.body).hexdigest(),
                        content_type=self.request.headers.get("Content-Type"))
        if not await self.check():
            return None
        return fields, files

    def answer(self, body: dict[str, Any], input_images: int = 0) -> None:
        b = self.state.behaviour
        if b.broken == "invalid_json":
            self.set_header("Content-Type", "application/json")
            self.finish(b'{"created": 1, "data": [')
            return
        model = str(body.get("model") or "dall-e-2")
        try:
            n = int(body.get("n") or 1)
        except ValueError:
            n = 0
        if not 1 <= n <= 10:
            return self.write_json(error_body("Invalid value for 'n'.", "invalid_request_error", None), 400)
        gpt_image = model.startswith("gpt-image")
        b64 = gpt_image or body.get("response_format") == "b64_json"
        url = f"{self.request.protocol}://{self.request.host}/_fake/files/image.png"
        item = {"b64_json": base64.b64encode(IMAGE).decode()} if b64 else {"url": url}
        if model == "dall-e-3":
            item["revised_prompt"] = str(body.get("prompt", ""))
        reply: dict[str, Any] = {"created": int(time.time()), "data": [dict(item) for _ in range(n)]}
        if gpt_image and not b.omit_usage:
            size, quality = str(body.get("size") or "1024x1024"), str(body.get("quality") or "medium")
            per_image = OUTPUT_TOKENS.get(quality, OUTPUT_TOKENS["medium"])
            per_image = per_image if size == "1024x1024" else per_image * 3 // 2
            text, images = count_text(str(body.get("prompt", ""))), INPUT_IMAGE_TOKENS * input_images
            reply["usage"] = {"input_tokens": text + images, "output_tokens": per_image * n,
                              "total_tokens": text + images + per_image * n,
                              "input_tokens_details": {"text_tokens": text, "image_tokens": images}}
        if b.usage_override is not None:
            reply["usage"] = b.usage_override
        self.write_json(reply)


class GenerationsHandler(_ImagesHandler):
    async def post(self) -> None:
        body = self.parse()
        self.record(body)
        if body is None or not await self.check():
            return
        self.answer(body)


class UploadsHandler(_ImagesHandler):
    """Edits and variations: an image (or several) and the fields, as multipart/form-data."""

    async def post(self) -> None:
        parsed = await self.upload()
        if parsed is None:
            return
        fields, files = parsed
        images = files.get("image", []) + files.get("image[]", [])
        if not images:
            return self.write_json(error_body("Missing required parameter: 'image'.", "invalid_request_error",
                                               None), 400)
        self.answer(fields, len(images))


class FileHandler(tornado.web.RequestHandler):
    """The URLs of url-format images."""

    def get(self, name: str) -> None:
        self.set_header("Content-Type", "image/png")
        self.finish(IMAGE)
