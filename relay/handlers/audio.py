"""POST /audio/transcriptions and /audio/translations (multipart uploads, priced per second of
audio or by reported tokens), and /audio/speech (JSON in, audio streamed out, per character)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from relay.errors import InvalidRequest
from relay.handlers.proxy import OFF_LOOP_REPLY_BYTES, ProxyHandler
from relay.handlers.upload import UploadHandler, fields, part_reader, text_field
from relay.metering.audio import file_seconds
from relay.metering.encodings import encoding_for
from relay.metering.media import quote_speech, quote_transcription, transcription_usage
from relay.metering.usage import Usage
from relay.proxy.transport import UpstreamResponse

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MAX_SPEECH_CHARS = 4096


class _AudioUploadHandler(UploadHandler):
    route = "audio"
    json_reply = False  # text, srt and vtt replies keep the upstream's Content-Type
    # OpenAI's limit for audio uploads: 25 MB (26,214,400 bytes), the whole request.
    max_body = 25 * 1024 * 1024
    keep_fields = frozenset({"model", "response_format", "stream"})

    async def post(self) -> None:
        body, parts = self.upload_parts()
        kept = fields(parts)
        values = {name: text_field(kept, name) for name in kept}
        if "model" not in values:
            raise InvalidRequest("You must provide a model parameter.", param="model")
        served = self.resolve_model({"model": values["model"]})
        files = [p for p in parts if p.name == "file"]
        if len(files) != 1:
            raise InvalidRequest("You must provide exactly one audio file." if files else
                                 "You must provide a file parameter.", param="file")
        fmt = values.get("response_format")
        if fmt is not None and fmt not in TRANSCRIPTION_FORMATS:
            raise InvalidRequest(f"'response_format' must be one of {', '.join(TRANSCRIPTION_FORMATS)}.",
                                 param="response_format")
        if values.get("stream") == "true":
            raise InvalidRequest("Streamed transcription is not supported by this relay.", param="stream")
        audio = files[0]
        # Seconds from the file's header; unreadable, its size at 8 kbit/s (metering.audio).
        seconds, _ = file_seconds(part_reader(body, audio), audio.size)
        quote = quote_transcription(self.services.config, served, seconds)
        await self.forward(self.upload_request(body, served, kept.get("model")), quote, False, {})

    async def reply_usage(self, data: bytes, resp: UpstreamResponse) -> Usage:
        quote = self.charge.quote
        encoding = encoding_for(quote.model, self.services.config.quota.encodings)
        if not resp.headers.get("Content-Type", "application/json").startswith("application/json"):
            return transcription_usage(None, data.decode("utf-8", "replace"), quote, encoding)  # text, srt, vtt
        reply = await asyncio.to_thread(_parse, data) if len(data) > OFF_LOOP_REPLY_BYTES else _parse(data)
        text = reply.get("text") if isinstance(reply, dict) else None
        return transcription_usage(reply, text if isinstance(text, str) else "", quote, encoding)


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None  # billed as the file's seconds: the reply is passed on as it is


class TranscriptionsHandler(_AudioUploadHandler):
    upstream_path = "/audio/transcriptions"


class TranslationsHandler(_AudioUploadHandler):
    upstream_path = "/audio/translations"


class SpeechHandler(ProxyHandler):
    upstream_path = "/audio/speech"
    route = "audio"
    streams_bytes = True

    async def post(self) -> None:
        body = self.parsed_body()
        served = self.resolve_model(body)
        text = body.get("input")
        if not isinstance(text, str) or not text:
            raise InvalidRequest("You must provide an input: the text to read aloud.", param="input")
        if len(text) > MAX_SPEECH_CHARS:
            raise InvalidRequest(f"'input' must be at most {MAX_SPEECH_CHARS} characters.", param="input")
        voice = body.get("voice")
        if not isinstance(voice, (str, dict)) or not voice:
            raise InvalidRequest("You must provide a voice.", param="voice")
        fmt = body.get("response_format")
        if fmt is not None and fmt not in SPEECH_FORMATS:
            raise InvalidRequest(f"'response_format' must be one of {', '.join(SPEECH_FORMATS)}.",
                                 param="response_format")
        speed = body.get("speed")
        if speed is not None and (not isinstance(speed, (int, float)) or isinstance(speed, bool)
                                  or not 0.25 <= speed <= 4.0):
            raise InvalidRequest("'speed' must be a number from 0.25 to 4.0.", param="speed")
        if body.get("stream_format") not in (None, "audio"):
            raise InvalidRequest("Only stream_format 'audio' is supported by this relay.", param="stream_format")
        await self.forward(self.upstream_request(body, served), quote_speech(self.services.config, served, text),
                           False, body)
