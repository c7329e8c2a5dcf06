"""The pure parts of uploads and media metering: the streaming multipart parser (strict, split
anywhere), the body as chunks, audio durations from file headers, and the media quotes."""
import io
import math
import random
import wave
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import parse_config
from relay.metering.audio import file_seconds
from relay.metering.media import (
    ImageRequest,
    image_usage,
    quote_images,
    quote_speech,
    quote_transcription,
    transcription_usage,
)
from relay.proxy.chunks import Chunks
from relay.proxy.multipart import MultipartError, MultipartParser, boundary_of
from relay.proxy.request import ModelField, UpstreamRequest

B = b"xYz-boundary"


def body(*parts: tuple[str, bytes, str | None], preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += b"--" + B + f"\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + b"--" + B + b"--\r\n" + epilogue


def parse(data: bytes, cuts=(), keep=("model", "n")):
    p = MultipartParser(B, keep)
    at = 0
    for cut in sorted(cuts):
        p.feed(data[at:cut])
        at = cut
    p.feed(data[at:])
    return p, p.close()


FILE = bytes(range(256)) * 64 + b"\r\n--xYz-boundar"  # a near-delimiter inside the file


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(body(("model", b"whisper-1", None),
                                                                 ("file", FILE, "a.wav"), ("n", b"2", None))) - 1),
                     max_size=12))
def test_parts_are_found_however_the_body_is_split(cuts):
    data = body(("model", b"whisper-1", None), ("file", FILE, "a.wav"), ("n", b"2", None), preamble=b"ignored\r\n")
    p, parts = parse(data, cuts)
    assert [(x.name, x.filename, x.value) for x in parts] == [("model", None, b"whisper-1"), ("file", "a.wav", None),
                                                             ("n", None, b"2")]
    assert data[parts[1].start:parts[1].end] == FILE, "files are located, never copied"
    assert data[p.first_part_at:].startswith(b"Content-Disposition")


def test_chunks_read_anywhere_and_splice_only_the_ends():
    data = bytes(range(200)) * 5
    pieces = [data[i:i + 37] for i in range(0, len(data), 37)]
    c = Chunks(pieces)
    for offset, length in ((0, 10), (30, 50), (999, 5), (1000, 1), (-1, 3), (36, 2)):
        assert c.read(offset, length) == (data[offset:offset + length] if offset >= 0 else b"")
    for start, end, new in ((0, 0, b"x"), (10, 80, b"model"), (999, 1000, b""), (37, 74, b"yy")):
        spliced = c.splice(start, end, new)
        assert b"".join(spliced) == data[:start] + new + data[end:]
        assert sum(1 for p in spliced if any(p is q for q in pieces)) >= len(pieces) - 3, "the rest is shared"


def test_an_upload_is_rendered_as_its_chunks_or_with_its_model_renamed():
    data = body(("model", b"whisper-1", None), ("file", b"RIFF....", "a.wav"))
    pieces = [data[:50], data[50:]]
    _, parts = parse(data)
    request = UpstreamRequest("POST", "/audio/transcriptions", "whisper-1", upload=Chunks(pieces),
                              model_field=ModelField(parts[0].start, parts[0].end, sent="whisper-1"))
    assert request.render("whisper-1") == tuple(pieces)
    assert b"".join(request.render("whisper-large")) == data.replace(b"whisper-1", b"whisper-large")


@pytest.mark.parametrize("bad", [
    body(("model", b"a", None), ("model", b"b", None)),                       # a kept field twice
    body(("model", b"a", None))[:-6],                                         # no closing delimiter
    b"--" + B + b"\r\nContent-Disposition: form-data\r\n\r\nx\r\n--" + B + b"--",           # no name
    b"--" + B + b"\r\nContent-Disposition: form-data; name*=utf-8''model\r\n\r\nx\r\n--" + B + b"--",
    b"--" + B + b"\r\nContent-Disposition: attachment; name=\"x\"\r\n\r\nx\r\n--" + B + b"--",
    b"--" + B + b"\r\nContent-Disposition: form-data;\r\n name=\"x\"\r\n\r\nx\r\n--" + B + b"--",  # folded
    b"--" + B + b"\r\nContent-Disposition: form-data; name=\"x\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"eA==\r\n--" + B + b"--",
    b"--" + B + b"\r\n\r\nx\r\n--" + B + b"--",                                # no headers
    b"--" + B + b"garbage\r\n",                                                 # a malformed boundary line
    b"--" + B + b"\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\n",            # headers too long
    body(("model", b"m" * 70000, None)),                                        # a kept field too long
    body(*[(f"f{i}", b"", None) for i in range(300)]),                          # too many parts
])
def test_bodies_an_upstream_could_read_otherwise_are_refused(bad):
    with pytest.raises(MultipartError):
        parse(bad)


def test_the_boundary_comes_from_a_multipart_content_type_only():
    assert boundary_of('multipart/form-data; charset=utf-8; boundary="a b"') == b"a b"
    webkit = "----WebKitFormBoundary7MA4YWxk"
    assert boundary_of(f"Multipart/Form-Data; boundary={webkit}") == webkit.encode()
    for bad in (None, "application/json", "multipart/form-data", "multipart/form-data; boundary=" + "a" * 71,
                "multipart/form-data; boundary=a\u00e9", "multipart/mixed; boundary=x"):
        with pytest.raises(MultipartError):
            boundary_of(bad)


# --- audio and the media quotes -----------------------------------------------------------------

def wav(seconds: float, rate: int = 8000, channels: int = 1) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(2 * channels * round(seconds * rate)))
    return out.getvalue()


def reader_of(data: bytes, piece: int = 333):
    c = Chunks([data[i:i + piece] for i in range(0, len(data), piece)])
    return c.read, c.size


def test_file_seconds_are_read_from_wav_and_mp3_headers_across_chunks():
    assert file_seconds(*reader_of(wav(3.25))) == (3.25, True)
    assert file_seconds(*reader_of(wav(2.0, 44100, 2))) == (2.0, True)
    frame = b"\xff\xfb\x90\xc4" + bytes(413)  # MPEG-1 Layer III, 128 kbit/s, 44.1 kHz: 1152 samples
    seconds, known = file_seconds(*reader_of(frame * 100))
    assert known and seconds == pytest.approx(100 * 417 * 8 / 128000)


def test_an_unreadable_file_is_timed_at_8_kbits_a_bound_not_nothing():
    webm = b"\x1aE\xdf\xa3" + bytes(24_996)  # a Matroska header: not read, so 25,000 bytes at 1,000 a second
    assert file_seconds(*reader_of(webm)) == (25.0, False)
    # A header claiming more than its bytes can hold is capped by the same bound.
    lying = bytearray(wav(1.0))
    lying[28:32] = (1).to_bytes(4, "little")  # a byte rate of 1
    assert file_seconds(*reader_of(bytes(lying)))[0] == len(lying) / 1000


CONFIG = parse_config("""
upstreams: [{name: a, base_url: "http://127.0.0.1:1/v1", keys: [sk-x]}]
pricing:
  dall-e-3: {per_image: {"1024x1024/standard": "80000/3", "1024x1024/hd": "160000/3", "1792x1024/hd": 80000}}
  gpt-image-1: {input: "10/3", image_input: "20/3", output: "80/3"}
  whisper-1: {per_second: "200/3"}
  gpt-4o-transcribe: {input: "5/3", audio_input: 4, output: "20/3"}
  tts-1: {per_character: 10}
""", {})


def test_images_reserve_n_at_their_price_or_the_dearest():
    assert quote_images(CONFIG, "dall-e-3", ImageRequest(n=2)).full == math.ceil(2 * Fraction(80000, 3))
    hd = quote_images(CONFIG, "dall-e-3", ImageRequest(n=3, quality="hd"))
    assert hd.full == hd.minimum == 160000
    assert quote_images(CONFIG, "dall-e-3", ImageRequest(size="4096x4096")).full == 80000  # not in the table
    q = quote_images(CONFIG, "gpt-image-1", ImageRequest(n=2, quality="low", prompt="a cat"))
    assert q.allowance == 2 * 272 and q.full == math.ceil(Fraction(10, 3) * 2 + Fraction(80, 3) * 544)
    edit = quote_images(CONFIG, "gpt-image-1", ImageRequest(quality="auto", input_images=((512, 512), None),
                                                           high_fidelity=True))
    assert edit.prompt.image_tokens == (85 + 170 * 1 + 6240) + (85 + 170 * 8 + 6240) and edit.allowance == 6240


def test_image_replies_bill_what_was_delivered():
    q = quote_images(CONFIG, "dall-e-3", ImageRequest(n=2))
    assert image_usage({"data": [{}, {}, {}]}, q, 2).images == 2, "never more than asked"
    assert image_usage({"data": [{}]}, q, 2).images == 1
    reported = image_usage({"data": [{}], "usage": {"input_tokens": 9, "output_tokens": 272,
                                                    "input_tokens_details": {"image_tokens": 4}}}, q, 1)
    assert (reported.prompt_tokens, reported.image_tokens, reported.completion_tokens) == (9, 4, 272)
    assert reported.images == 1


def test_transcription_is_billed_from_the_best_duration_known():
    q = quote_transcription(CONFIG, "whisper-1", 3.2)
    assert q.full == q.minimum == math.ceil(4 * Fraction(200, 3)) and q.prompt.prompt_tokens == 0
    assert transcription_usage({"text": "hi"}, "hi", q, "cl100k_base").seconds == 4
    assert transcription_usage({"text": "hi", "usage": {"type": "duration", "seconds": 7}}, "hi", q,
                               "cl100k_base").seconds == 7
    assert transcription_usage({"text": "hi", "duration": 2.5}, "hi", q, "cl100k_base").seconds == 3
    assert transcription_usage({"usage": {"type": "duration", "seconds": True}}, "", q, "cl100k_base").seconds == 4
    tokens = quote_transcription(CONFIG, "gpt-4o-transcribe", 4.0)
    assert tokens.prompt.audio_input_tokens == 40 and tokens.allowance == 1024
    used = transcription_usage({"text": "hi", "usage": {"type": "tokens", "input_tokens": 30, "output_tokens": 2,
                                                        "input_token_details": {"audio_tokens": 30}}}, "hi", tokens,
                               "o200k_base")
    assert (used.prompt_tokens, used.audio_input_tokens, used.completion_tokens, used.seconds) == (30, 30, 2, 4)


def test_speech_holds_every_character():
    q = quote_speech(CONFIG, "tts-1", "héllo ✓")
    assert q.full == q.minimum == 70 and q.prompt.characters == 7


def test_random_binary_files_never_break_the_parser():
    rng = random.Random(7)
    for _ in range(50):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(2000)))
        p, parts = parse(body(("file", blob, "x.bin")), cuts=(rng.randrange(1, 100),))
        assert parts[0].size == len(blob)


VALID = body(("model", b"whisper-1", None), ("file", b"RIFF\x00\x01", "a.wav"), ("n", b"2", None))


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 8), st.binary(max_size=8)),
                      max_size=6),
       cuts=st.lists(st.integers(1, len(VALID)), max_size=5))
def test_a_mangled_form_is_parsed_or_refused_never_anything_else(edits, cuts):
    data = VALID
    for at, cut, insert in edits:
        data = data[:at] + insert + data[at + cut:]
    try:
        _, parts = parse(data, [c for c in cuts if c < len(data)])
    except MultipartError:
        return
    for part in parts:
        assert 0 <= part.start <= part.end <= len(data)
