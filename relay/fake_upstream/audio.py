"""POST /v1/audio/transcriptions and /translations (multipart; json, text, srt, vtt, verbose_json,
with ``usage`` as OpenAI reports it), and /v1/audio/speech: a small valid audio file, streamed
in chunks (mp3: silent MPEG frames; wav; pcm; other formats get a WAV)."""
from __future__ import annotations

import asyncio
import io
import math
import time
import wave
from typing import Any

from tornado.iostream import StreamClosedError

from relay.fake_upstream.base import HangUpRecorded
from relay.fake_upstream.images import _ImagesHandler
from relay.fake_upstream.state import error_body
from relay.http_server import hang_up
from relay.metering.tokens import count_text

TRANSCRIPT = "Hello from the fake upstream, relay says hi!"
SPEECH_SECONDS_PER_CHAR = 0.01
SPEECH_CHUNK = 4096
SAMPLE_RATE = 8000
# One silent MPEG-1 Layer III frame: 128 kbit/s, 44.1 kHz, mono, no padding; 1152 samples.
MP3_FRAME = b"\xff\xfb\x90\xc4" + bytes(413)
MP3_FRAME_SECONDS = 1152 / 44100


def wav_seconds(data: bytes) -> float | None:
    """The fake's own reading (the standard library's), apart from relay's."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            return float(w.getnframes() / w.getframerate())
    except (wave.Error, EOFError, ZeroDivisionError):
        return None


def wav(seconds: float) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(bytes(2 * int(seconds * SAMPLE_RATE)))
    return out.getvalue()


class TranscriptionsHandler(_ImagesHandler):
    async def post(self) -> None:
        parsed = await self.upload()
        if parsed is None:
            return
        fields, files = parsed
        audio = files.get("file")
        if not audio:
            return self.write_json(error_body("Missing required parameter: 'file'.", "invalid_request_error",
                                               None), 400)
        seconds = wav_seconds(audio[0].body)
        self.rec["seconds"] = seconds
        model, fmt = fields.get("model", ""), fields.get("response_format", "json")
        b = self.state.behaviour
        usage: dict[str, Any] | None = None
        if model.startswith("gpt-4o"):
            heard = math.ceil((seconds or 1) * 10)
            out = count_text(TRANSCRIPT)
            usage = {"type": "tokens", "input_tokens": heard, "output_tokens": out, "total_tokens": heard + out,
                     "input_token_details": {"text_tokens": 0, "audio_tokens": heard}}
        elif seconds is not None:
            usage = {"type": "duration", "seconds": math.ceil(seconds)}
        if b.omit_usage:
            usage = None
        if b.usage_override is not None:
            usage = b.usage_override
        if fmt in ("text", "srt", "vtt"):
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            end = time.strftime("%H:%M:%S", time.gmtime(seconds or 1)) + ",000"
            text = {"text": TRANSCRIPT + "\n", "srt": f"1\n00:00:00,000 --> {end}\n{TRANSCRIPT}\n\n",
                    "vtt": f"WEBVTT\n\n00:00:00.000 --> {end.replace(',', '.')}\n{TRANSCRIPT}\n\n"}[fmt]
            self.finish(text)
            return
        reply: dict[str, Any] = {"text": TRANSCRIPT}
        if fmt == "verbose_json":
            reply = {"task": "translate" if self.request.path.endswith("translations") else "transcribe",
                     "language": "english", "duration": seconds or 1.0, "text": TRANSCRIPT,
                     "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds or 1.0, "text": TRANSCRIPT}]}
        if usage is not None:
            reply["usage"] = usage
        self.write_json(reply)


class SpeechHandler(HangUpRecorded, _ImagesHandler):
    async def post(self) -> None:
        body = self.parse()
        self.record(body)
        if body is None or not await self.check():
            return
        text = body.get("input")
        if not isinstance(text, str) or not text or not body.get("voice"):
            return self.write_json(error_body("'input' and 'voice' are required.", "invalid_request_error", None),
                                   400)
        seconds = max(len(text) * SPEECH_SECONDS_PER_CHAR, 0.1)
        fmt = body.get("response_format") or "mp3"
        if fmt == "mp3":
            data, kind = MP3_FRAME * math.ceil(seconds / MP3_FRAME_SECONDS), "audio/mpeg"
        elif fmt == "pcm":
            data, kind = bytes(2 * int(seconds * 24000)), "audio/pcm"
        else:
            data, kind = wav(seconds), "audio/wav"
        self.rec["audio_bytes"] = len(data)
        await self.stream_audio(data, kind)

    async def stream_audio(self, data: bytes, kind: str) -> None:
        b = self.state.behaviour
        sent_at = self.rec["chunks_sent_at"]
        self.set_header("Content-Type", kind)
        try:
            for i in range(0, len(data), SPEECH_CHUNK):
                sent = i // SPEECH_CHUNK
                if sent and b.chunk_delay:
                    await asyncio.sleep(b.chunk_delay)
                if b.stall_after_chunks is not None and sent >= b.stall_after_chunks:
                    await asyncio.sleep(3600)
                if b.truncate_after_chunks is not None and sent >= b.truncate_after_chunks:
                    hang_up(self.request.connection)
                    return
                self.write(data[i:i + SPEECH_CHUNK])
                await self.flush()
                sent_at.append(time.monotonic())
            self.finish()
        except StreamClosedError:
            self.rec["aborted"] = True
