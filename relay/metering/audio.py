"""Durations of audio, read from the WAV or MP3 header: of an input_audio part (its prompt
tokens, at a rate) and of an uploaded file (its seconds, for transcription).

Only the header bytes are decoded. An unreadable clip is timed as if it were 8 kbit/s, the
lowest MP3 bitrate, which no real clip undercuts much."""
from __future__ import annotations

from math import ceil
from typing import Any

from relay.metering.b64 import Reader, data_url_payload, decoded_size, reader

# OpenAI bills user audio at one token per 100 ms (gpt-4o-audio / realtime models: "about 10 a
# second"), rounded up to whole tokens here.
TOKENS_PER_SECOND = 10
FALLBACK_BYTES_PER_SECOND = 1000
MAX_CHUNKS = 32
MP3_SYNC_SCAN = 4096

_MP3_BITRATES_V1 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_MP3_BITRATES_V2 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
_MP3_RATES = (44100, 48000, 32000)


def audio_tokens(data: Any, fmt: Any = None) -> int:
    """Tokens of base64 audio data in format "wav" or "mp3" (sniffed when not given)."""
    if not isinstance(data, str) or not data:
        return 0
    return ceil(audio_seconds(data, fmt) * TOKENS_PER_SECOND)


def audio_seconds(data: str, fmt: Any = None) -> float:
    text, start = data_url_payload(data) or (data, 0)  # raw base64, or a data URL from lenient clients
    return file_seconds(reader(text, start), decoded_size(text, start), fmt)[0]


def file_seconds(read: Reader, size: int, fmt: Any = None) -> tuple[float, bool]:
    """(seconds, read from its header) of an audio file of ``size`` bytes; when the header
    cannot be read, the bound: its size at 8 kbit/s, and False."""
    head = read(0, 12)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        seconds = wav_seconds(read, size)
    elif fmt == "mp3" or head[:3] == b"ID3" or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xfa"):
        seconds = mp3_seconds(read, size)
    else:
        seconds = None
    # A header's claims (a byte rate of 1, a billion frames) are capped by the payload's own size.
    most = size / FALLBACK_BYTES_PER_SECOND
    return (most, False) if seconds is None else (max(0.0, min(seconds, most)), True)


def wav_seconds(read: Reader, size: int) -> float | None:
    offset, byte_rate = 12, 0
    for _ in range(MAX_CHUNKS):
        head = read(offset, 20)  # chunk id, size, and for "fmt " its byte rate at 16..20
        if len(head) < 8:
            return None
        chunk, length = head[:4], int.from_bytes(head[4:8], "little")
        if chunk == b"fmt ":
            byte_rate = int.from_bytes(head[16:20], "little")
        elif chunk == b"data":
            available = size - offset - 8
            # Streamed WAVs leave the size 0 or 0xFFFFFFFF: then the payload's end is the end.
            data_bytes = length if 0 < length <= available else available
            return data_bytes / byte_rate if byte_rate > 0 else None
        offset += 8 + length + (length & 1)
    return None


def mp3_seconds(read: Reader, size: int) -> float | None:
    start = _skip_id3(read)
    window = read(start, MP3_SYNC_SCAN)
    i = window.find(b"\xff")
    while 0 <= i < len(window) - 3:
        frame = _mp3_frame(window[i:i + 4]) if window[i + 1] & 0xE0 == 0xE0 else None
        if frame:
            return _mp3_duration(read, start + i, frame, size)
        i = window.find(b"\xff", i + 1)
    return None


def _skip_id3(read: Reader) -> int:
    head = read(0, 10)
    if head[:3] != b"ID3" or len(head) < 10:
        return 0
    tag = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | head[9] & 0x7F
    return 10 + tag + (10 if head[5] & 0x10 else 0)


def _mp3_frame(header: bytes) -> tuple[int, int, int, int] | None:
    """(bitrate bit/s, sample rate, samples per frame, side-info bytes) of a Layer III header."""
    version, layer = header[1] >> 3 & 3, header[1] >> 1 & 3
    bitrate_index, rate_index = header[2] >> 4, header[2] >> 2 & 3
    if version == 1 or layer != 1 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    mono = header[3] >> 6 == 3
    if version == 3:  # MPEG-1
        return _MP3_BITRATES_V1[bitrate_index] * 1000, _MP3_RATES[rate_index], 1152, 17 if mono else 32
    divisor = 2 if version == 2 else 4  # MPEG-2, MPEG-2.5
    return (_MP3_BITRATES_V2[bitrate_index] * 1000, _MP3_RATES[rate_index] // divisor, 576,
            9 if mono else 17)


def _mp3_duration(read: Reader, offset: int, frame: tuple[int, int, int, int], size: int) -> float:
    bitrate, rate, samples, side = frame
    # A VBR file says its frame count in a Xing/Info or VBRI tag in the first frame; without
    # one it is constant-bitrate and the byte count gives the time.
    xing = read(offset + 4 + side, 12)
    if xing[:4] in (b"Xing", b"Info") and int.from_bytes(xing[4:8], "big") & 1 and len(xing) == 12:
        return int.from_bytes(xing[8:12], "big") * samples / rate
    vbri = read(offset + 36, 18)
    if vbri[:4] == b"VBRI" and len(vbri) == 18:
        return int.from_bytes(vbri[14:18], "big") * samples / rate
    return (size - offset) * 8 / bitrate
