"""The prompt estimate: offline tables, encodings per model, OpenAI's published counts, images, audio."""
import base64
import binascii
import functools
import gzip
import io
import json
import socket
import struct
import wave
import zlib

import hypothesis.strategies as st
import pytest
import tiktoken
from hypothesis import given, settings

from relay.metering import b64, encodings
from relay.metering.audio import audio_tokens
from relay.metering.encodings import (
    CL100K,
    CL100K_PAT_CANONICAL,
    O200K,
    TokenizerDataError,
    count_tokens,
    encoding_for,
    get_encoding,
    load_encoding,
    read_ranks,
)
from relay.metering.images import image_size, image_tokens
from relay.metering.prompt import TOKENS_PER_TOOL_CALL, PromptEstimate, count_chat_request, count_responses_request
from relay.metering.tokens import count_chat_prompt

# OpenAI cookbook, "How to count tokens with tiktoken", inputs copied exactly.
COOKBOOK_MESSAGES = [
    {"role": "system",
     "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user",
     "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user",
     "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
]
WEATHER_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "description": "The unit of temperature to return",
                         "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}]
WEATHER_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


# ---- OpenAI's published counts -------------------------------------------------------------------

@pytest.mark.parametrize("model, expected", [("gpt-3.5-turbo", 129), ("gpt-4", 129), ("gpt-4-0613", 129),
                                             ("gpt-4o", 124), ("gpt-4o-mini", 124)])
def test_cookbook_messages_count_what_the_api_reported(model, expected):
    assert count_chat_request({"model": model, "messages": COOKBOOK_MESSAGES}, model) == PromptEstimate(expected)


@pytest.mark.parametrize("model, expected", [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101),
                                             ("gpt-4o-mini", 101)])
def test_cookbook_weather_tool_counts_what_the_api_reported(model, expected):
    body = {"model": model, "messages": WEATHER_MESSAGES, "tools": WEATHER_TOOLS}
    assert count_chat_request(body, model).total == expected


def test_the_same_tool_counts_the_same_in_every_shape():
    function = WEATHER_TOOLS[0]["function"]
    chat = count_chat_request({"messages": WEATHER_MESSAGES, "tools": WEATHER_TOOLS}, "gpt-4o").total
    legacy = count_chat_request({"messages": WEATHER_MESSAGES, "functions": [function]}, "gpt-4o").total
    responses = count_responses_request({"input": WEATHER_MESSAGES, "tools": [{"type": "function", **function}]},
                                        "gpt-4o").total
    assert chat == legacy == responses == 101


def test_count_chat_prompt_is_still_the_messages_part():
    assert count_chat_prompt(COOKBOOK_MESSAGES) == 129
    assert count_chat_prompt(COOKBOOK_MESSAGES, encoding=O200K) == 124


# ---- tables: offline, hash-checked, right ids ----------------------------------------------------

@pytest.mark.parametrize("text, ids", [
    # OpenAI cookbook outputs (o200k_base: gpt-4o-mini's encoding)
    ("tiktoken is great!", [83, 8251, 2488, 382, 2212, 0]),
    ("antidisestablishmentarianism", [493, 129901, 376, 160388, 21203, 2367]),
    ("2 + 2 = 4", [17, 659, 220, 17, 314, 220, 19]),
    ("お誕生日おめでとう", [8930, 9697, 243, 128225, 8930, 17693, 4344, 48669]),
    ("hello world", [24912, 2375]),  # openai/harmony's tests, whose encoding shares o200k_base's table
])
def test_o200k_matches_published_token_ids(text, ids):
    assert get_encoding(O200K).encode_ordinary(text) == ids


@pytest.mark.parametrize("text, ids", [
    ("hello world", [15339, 1917]),  # tiktoken's tests
    ("rer", [38149]), ("'rer", [2351, 81]), ("today\n ", [31213, 198, 220]), ("today\n \n", [31213, 27907]),
    ("today\n  \n", [31213, 14211]), (" \x850", [220, 126, 227, 15]),
    ("antidisestablishmentarianism", [519, 85342, 34500, 479, 8997, 2191]),  # the cookbook's
    ("2 + 2 = 4", [17, 489, 220, 17, 284, 220, 19]),
    ("お誕生日おめでとう", [33334, 45918, 243, 21990, 9080, 33334, 62004, 16556, 78699]),
])
def test_cl100k_matches_published_token_ids(text, ids):
    assert get_encoding(CL100K).encode_ordinary(text) == ids


@pytest.fixture(scope="module")
def canonical_cl100k():
    from relay.metering.encodings import SPECS, locate, read_ranks
    spec = SPECS[CL100K]
    ranks = read_ranks(locate(spec.sources), spec.sha256)
    return tiktoken.Encoding("cl100k_canonical", pat_str=CL100K_PAT_CANONICAL, mergeable_ranks=ranks,
                             special_tokens={})


TRICKY = st.text(alphabet=st.sampled_from(list(" \t\r\n\x0b'sdmtlvreSDMT Aé中9０!?.,-_/\u00a0\u2028\u0301😀")),
                 max_size=60)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(TRICKY, st.text(max_size=60)))
def test_faster_cl100k_pattern_splits_exactly_like_the_canonical_one(canonical_cl100k, text):
    assert get_encoding(CL100K).encode_ordinary(text) == canonical_cl100k.encode_ordinary(text)


def test_tables_load_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried the network")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in (CL100K, O200K):
        assert load_encoding(name).encode_ordinary("hello world")


def test_loader_rejects_a_table_whose_hash_does_not_match(tmp_path):
    good = encodings.locate(encodings.SPECS[CL100K].sources).read_bytes()
    sha = encodings.SPECS[CL100K].sha256
    assert len(read_ranks(_write(tmp_path / "ok.tiktoken", good), sha)) == 100256
    tampered = good.replace(b"IQ== 0", b"Ig== 0", 1)  # token 0 now means '"'
    with pytest.raises(TokenizerDataError, match="SHA-256"):
        read_ranks(_write(tmp_path / "bad.tiktoken", tampered), sha)
    with pytest.raises(TokenizerDataError, match="SHA-256"):
        read_ranks(_write(tmp_path / "bad.tiktoken.gz", gzip.compress(tampered)), sha)
    with pytest.raises(TokenizerDataError, match="gzip"):
        read_ranks(_write(tmp_path / "junk.tiktoken.gz", b"not gzip"), sha)
    with pytest.raises(TokenizerDataError, match="no installed package"):
        encodings.locate((("no_such_package_xyz", "data/x.tiktoken"), ("tiktoken_ext", "data/missing")))


def _write(path, data):
    path.write_bytes(data)
    return path


def test_special_token_text_counts_as_text():
    assert count_tokens("<|endoftext|>", O200K) == 7
    assert count_tokens("", O200K) == 0


# ---- encoding per model --------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4o-mini-2024-07-18", "gpt-4.1-nano", "gpt-4.5-preview", "o1",
                                   "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "chatgpt-4o-latest", "gpt-image-1",
                                   "omni-moderation-latest", "ft:gpt-4o-mini:acme::abc", "openai/gpt-4o", "GPT-4o"])
def test_o200k_families(model):
    assert encoding_for(model) == O200K


@pytest.mark.parametrize("model", ["gpt-3.5-turbo", "gpt-3.5-turbo-16k", "gpt-4", "gpt-4-0613", "gpt-4-turbo",
                                   "gpt-4-1106-preview", "text-embedding-3-small", "text-embedding-ada-002",
                                   "some-local-model", ""])
def test_cl100k_families_and_fallback(model):
    assert encoding_for(model) == CL100K


def test_encoding_overrides_exact_then_longest_glob():
    overrides = {"my-*": O200K, "my-old-*": CL100K, "gpt-4o-legacy": CL100K, "x*": "no_such_encoding"}
    assert encoding_for("my-model", overrides) == O200K
    assert encoding_for("my-old-model", overrides) == CL100K
    assert encoding_for("gpt-4o-legacy", overrides) == CL100K
    assert encoding_for("gpt-4o", overrides) == O200K
    assert encoding_for("xyz", overrides) == CL100K  # an unknown encoding name is not used
    assert encoding_for("gpt-4o", {"gpt-4o": ["cl100k_base"], "gpt-*": None}) == O200K
    assert encoding_for(None, overrides) == CL100K


def test_the_estimate_uses_the_override():
    body = {"messages": COOKBOOK_MESSAGES}
    assert count_chat_request(body, "house-model").total == 129
    assert count_chat_request(body, "house-model", {"house-*": O200K}).total == 124


# ---- images --------------------------------------------------------------------------------------

@functools.cache
def png(width, height):
    """A complete, valid grayscale PNG (all black)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = (b"\x00" * (width + 1)) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def data_url(data, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def jpeg(width, height, sof=0xC0, exif_bytes=40_000):
    def segment(marker, body):
        return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body
    app0 = segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    app1 = segment(0xE1, b"Exif\x00\x00" + b"\xff\xd8\xff\xc0" * (exif_bytes // 4))  # a thumbnail's markers
    dqt = segment(0xDB, b"\x00" + bytes(range(64)))
    dht = segment(0xC4, b"\x00" + b"\x01" * 16 + b"\x00" * 12)
    frame = segment(sof, struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01")
    return b"\xff\xd8" + app0 + app1 + dqt + b"\xff" + dht + frame + b"\xff\xda" + b"\x00" * 100


def gif(width, height):
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\xf7\x00\x00" + b"\x00" * 64


def webp(kind, width, height):
    if kind == "VP8 ":
        body = b"\x50\x02\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height)  # frame tag, start code
    elif kind == "VP8L":
        bits = (width - 1) | (height - 1) << 14
        body = b"\x2f" + bits.to_bytes(4, "little")
    else:
        body = b"\x10\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body += b"\x00" * 32
    chunk = kind.encode() + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


@pytest.mark.parametrize("width, height, detail, expected", [
    (1024, 1024, "high", 765), (1024, 1024, "auto", 765), (1024, 1024, None, 765), (1024, 1024, "low", 85),
    (2048, 4096, "high", 1105), (512, 512, "high", 255), (100, 100, "high", 255), (768, 2048, "high", 1445),
])
def test_gpt_4o_tiles(width, height, detail, expected):
    url = data_url(png(width, height))
    assert image_size(url) == (width, height)
    assert image_tokens("gpt-4o", url, detail) == expected


def test_gpt_4o_mini_tiles():
    assert image_tokens("gpt-4o-mini", data_url(png(1024, 1024)), "high") == 2833 + 5667 * 4
    assert image_tokens("gpt-4o-mini", data_url(png(2048, 4096)), "high") == 2833 + 5667 * 6
    assert image_tokens("gpt-4o-mini-2024-07-18", data_url(png(1024, 1024)), "low") == 2833


def test_patch_models():
    assert image_tokens("gpt-4.1-mini", data_url(png(1024, 1024)), "high") == 1659  # 1024 patches x 1.62
    assert image_tokens("gpt-4.1-nano", "https://example.com/cat.png", "auto") == 3779  # 1536 x 2.46
    assert image_tokens("o4-mini", data_url(png(4096, 4096)), "high") == 2642  # capped at 1536 x 1.72


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://x/y.jpg", None, 42, {"url": "x"}, "",
                                 "data:image/png;base64,", "data:image/png;base64,!!!!****", "data:,hello",
                                 "data:image/png;base64,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                                 "data:image/png;base64," + base64.b64encode(png(8, 8)[:20]).decode(),
                                 "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff\xe0\x00").decode(),
                                 "data:image/png;base64,éé" + "A" * 50, "data:image/png;base64," + "A" * 3])
def test_unreadable_or_remote_images_count_the_maximum(url):
    assert image_tokens("gpt-4o", url, "high") == 85 + 170 * 8
    assert image_tokens("gpt-4o", url, "auto") == 1445
    assert image_tokens("gpt-4o", url, "low") == 85
    assert image_tokens("gpt-4o-mini", url, "high") == 2833 + 5667 * 8


@pytest.mark.parametrize("data, size", [
    (jpeg(1024, 768), (1024, 768)), (jpeg(4000, 3000, sof=0xC2), (4000, 3000)), (jpeg(7, 5, exif_bytes=0), (7, 5)),
    (gif(640, 480), (640, 480)),
    (webp("VP8 ", 1920, 1080), (1920, 1080)), (webp("VP8L", 300, 200), (300, 200)),
    (webp("VP8X", 5000, 2000), (5000, 2000)),
])
def test_jpeg_gif_and_webp_sizes(data, size):
    assert image_size(data_url(data, "image/whatever")) == size


def test_only_the_header_of_an_image_is_decoded(monkeypatch):
    big = data_url(jpeg(2048, 4096, exif_bytes=60_000) + b"\x00" * 3_000_000, "image/jpeg")
    decoded = []
    real = binascii.a2b_base64
    monkeypatch.setattr(b64.binascii, "a2b_base64", lambda s: decoded.append(len(s)) or real(s))
    assert image_tokens("gpt-4o", big, "high") == 1105
    assert 0 < sum(decoded) < 400  # characters, out of four million


def test_mime_wrapped_base64_still_reads():
    encoded = base64.encodebytes(png(1024, 1024)).decode()  # 76-character lines
    assert image_size("data:image/png;base64," + encoded) == (1024, 1024)


# ---- audio ---------------------------------------------------------------------------------------

def wav(seconds, rate=16000, channels=1, width=2):
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(b"\x00" * int(seconds * rate) * channels * width)
    return out.getvalue()


def b64s(data):
    return base64.b64encode(data).decode()


def test_wav_duration_from_its_header():
    assert audio_tokens(b64s(wav(2.5)), "wav") == 25
    assert audio_tokens(b64s(wav(1.01, rate=44100, channels=2)), "wav") == 11
    assert audio_tokens(b64s(wav(3)), None) == 30  # sniffed


def test_wav_with_other_chunks_and_a_streamed_size():
    data = wav(2.0)
    fmt_end = data.index(b"data")
    extra = b"LIST" + struct.pack("<I", 5) + b"abcde" + b"\x00"  # odd size, padded
    with_list = data[:fmt_end] + extra + data[fmt_end:]
    with_list = with_list[:4] + struct.pack("<I", len(with_list) - 8) + with_list[8:]
    assert audio_tokens(b64s(with_list), "wav") == 20
    streamed = data[:fmt_end + 4] + b"\xff\xff\xff\xff" + data[fmt_end + 8:]
    assert audio_tokens(b64s(streamed), "wav") == 20


def test_a_header_cannot_claim_more_time_than_its_bytes_hold():
    data = bytearray(wav(1.0))
    data[28:32] = struct.pack("<I", 1)  # a byte rate of 1
    assert audio_tokens(b64s(bytes(data)), "wav") == -(-len(data) * 10 // 1000)
    liar = mp3_frames(3, xing_frames=10**9)
    assert audio_tokens(b64s(liar), "mp3") == -(-len(liar) * 10 // 1000)


def mp3_frames(count, xing_frames=None, frame_bytes=417):
    header = b"\xff\xfb\x90\x64"  # MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, joint stereo
    frame = header + b"\x00" * (frame_bytes - 4)
    first = frame
    if xing_frames is not None:
        first = header + b"\x00" * 32 + b"Xing" + struct.pack(">II", 1, xing_frames)
        first += b"\x00" * (frame_bytes - len(first))
    id3 = b"ID3\x04\x00\x00" + bytes([0, 0, 0x17, 0x38]) + b"\x00" * 3000  # synchsafe 3000
    return id3 + first + frame * (count - 1)


def test_mp3_duration_cbr_and_xing():
    cbr = mp3_frames(100)
    assert audio_tokens(b64s(cbr), "mp3") == -(-(100 * 417 * 8 * 10) // 128_000)  # 26.06 -> 27
    vbr = mp3_frames(500, xing_frames=500, frame_bytes=208)  # half the bytes the header's bitrate implies
    assert audio_tokens(b64s(vbr), "mp3") == 131  # 500 x 1152 / 44100 s = 13.06 s, not 6.5


@pytest.mark.parametrize("data", ["", None, 5, "!!!!", b64s(b"\x00" * 4000), b64s(b"RIFF\x00\x00\x00\x00WAVE"),
                                  b64s(b"ID3\x04\x00\x00\x7f\x7f\x7f\x7f")])
def test_unreadable_audio_is_timed_at_8_kbit(data):
    tokens = audio_tokens(data, "wav")
    size = b64.decoded_size(data) if isinstance(data, str) else 0
    assert tokens == -(-size * 10 // 1000)


# ---- whole requests ------------------------------------------------------------------------------

def test_breakdown_separates_text_image_and_audio():
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image and this clip?"},
        {"type": "image_url", "image_url": {"url": data_url(png(1024, 1024)), "detail": "high"}},
        {"type": "input_audio", "input_audio": {"data": b64s(wav(2.0)), "format": "wav"}},
    ]}]}
    estimate = count_chat_request(body, "gpt-4o-audio-preview")
    assert estimate.image == 765 and estimate.audio == 20
    assert estimate.text == 3 + 3 + 1 + count_tokens("What is in this image and this clip?", O200K)
    assert estimate.total == estimate.text + 785


def test_tool_calls_and_results_are_counted():
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_current_weather", "arguments": '{"location": "Paris, FR"}'}}]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}
    base = count_chat_request({"messages": WEATHER_MESSAGES}, "gpt-4o").text
    with_call = count_chat_request({"messages": WEATHER_MESSAGES + [call, result]}, "gpt-4o").text
    expected = (3 + 1 + TOKENS_PER_TOOL_CALL + count_tokens("get_current_weather", O200K)
                + count_tokens('{"location": "Paris, FR"}', O200K) + 3 + 1 + count_tokens('{"temperature": 21}', O200K))
    assert with_call - base == expected


def test_response_format_counts_its_schema():
    schema = {"name": "answer", "strict": True, "schema": {
        "type": "object", "properties": {"city": {"type": "string"}, "temperature": {"type": "number"}},
        "required": ["city", "temperature"], "additionalProperties": False}}
    base = count_chat_request({"messages": WEATHER_MESSAGES}, "gpt-4o").text
    chat = count_chat_request({"messages": WEATHER_MESSAGES,
                               "response_format": {"type": "json_schema", "json_schema": schema}}, "gpt-4o").text
    assert chat - base == count_tokens(json.dumps(schema, separators=(",", ":")), O200K)
    responses = count_responses_request({"input": WEATHER_MESSAGES,
                                         "text": {"format": {"type": "json_schema", **schema}}}, "gpt-4o").text
    assert responses == chat
    assert count_chat_request({"messages": WEATHER_MESSAGES, "response_format": {"type": "json_object"}},
                              "gpt-4o").text == base


def test_responses_input_string_instructions_and_items():
    assert count_responses_request({"input": "Say hello"}, "gpt-4o") == \
        count_chat_request({"messages": [{"role": "user", "content": "Say hello"}]}, "gpt-4o")
    with_instructions = count_responses_request({"instructions": "Be brief.", "input": "Say hello"}, "gpt-4o")
    as_chat = count_chat_request({"messages": [{"role": "developer", "content": "Be brief."},
                                               {"role": "user", "content": "Say hello"}]}, "gpt-4o")
    assert with_instructions == as_chat
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"},
                                     {"type": "input_image", "image_url": data_url(png(2048, 4096)), "detail": "high"},
                                     {"type": "input_image", "file_id": "file-123"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_current_weather", "arguments": '{"location":"Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "21 C"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is 21 C."}]},
        {"type": "item_reference", "id": "msg_1"},
    ]
    estimate = count_responses_request({"input": items}, "gpt-4o")
    assert estimate.image == 1105 + 1445  # the file_id's size is unknown: the maximum
    expected_text = (3 + (3 + 1 + count_tokens("Weather in Paris?", O200K))
                     + (3 + TOKENS_PER_TOOL_CALL + count_tokens("get_current_weather", O200K)
                        + count_tokens('{"location":"Paris"}', O200K))
                     + (3 + 1 + count_tokens("21 C", O200K)) + (3 + 1 + count_tokens("It is 21 C.", O200K)))
    assert estimate.text == expected_text


def test_an_image_inside_an_unknown_item_is_an_image_not_text():
    item = {"type": "computer_call_output", "call_id": "c", "output": {
        "type": "computer_screenshot", "image_url": data_url(png(1024, 1024) + b"\x00" * 500_000)}}
    estimate = count_responses_request({"input": [item]}, "gpt-4o")
    assert estimate.image == 765 and estimate.text < 40


DEEP = []
_node = DEEP
for _ in range(100_000):
    _node.append([])
    _node = _node[0]


@pytest.mark.parametrize("body", [
    None, [], "messages", {"messages": None}, {"messages": "hi"}, {"messages": [None, 3, "x", ["a"], {}]},
    {"messages": [{"role": 5, "content": 7, "name": ["n"], "tool_calls": "x", "function_call": 3}]},
    {"messages": [{"role": "user", "content": [None, 1, "bare", {"type": "text"}, {"type": "image_url"},
                                               {"type": "image_url", "image_url": 5}, {"type": "input_audio"},
                                               {"type": "input_audio", "input_audio": {"data": 5}},
                                               {"type": "file", "file": "x"}, {"type": "mystery", "x": [1]}]}]},
    {"messages": WEATHER_MESSAGES, "tools": "not a list"},
    {"messages": WEATHER_MESSAGES, "tools": {"type": "function", "function": {"name": "f"}}},
    {"messages": WEATHER_MESSAGES, "tools": [None, 5, "x", {}, {"type": "web_search_preview"},
                                             {"type": "function", "function": "f"},
                                             {"type": "function", "function": {"name": 5, "description": ["d"],
                                                                               "parameters": "not a dict"}},
                                             {"type": "function", "function": {"name": "f", "parameters": {
                                                 "properties": ["a", "b"]}}},
                                             {"type": "function", "function": {"name": "f", "parameters": {
                                                 "properties": {"a": 5, "b": {"enum": "x", "type": ["string", "null"]},
                                                                "c": {"enum": [1, None, {"x": 2}]},
                                                                "d": {"type": "array", "items": DEEP}}}}}]},
    {"messages": [{"role": "user", "content": DEEP}], "response_format": {"type": "json_schema", "json_schema": DEEP}},
    {"messages": WEATHER_MESSAGES, "functions": 5, "response_format": "json"},
])
def test_malformed_chat_bodies_get_a_sane_estimate(body):
    estimate = count_chat_request(body, "gpt-4o")
    assert isinstance(estimate, PromptEstimate)
    assert 3 <= estimate.total < 100_000


@pytest.mark.parametrize("body", [
    None, {"input": None}, {"input": 5}, {"input": [None, 5, "x", {"type": "function_call"},
                                                   {"type": "function_call_output", "output": [1]},
                                                   {"type": "reasoning", "summary": "s", "encrypted_content": "xx"},
                                                   {"type": "weird", "nested": DEEP}]},
    {"instructions": ["x"], "input": [], "tools": [{"type": "function"}], "text": {"format": "json"}},
    {"input": "x", "text": {"format": {"type": "json_schema", "schema": DEEP}}},
])
def test_malformed_responses_bodies_get_a_sane_estimate(body):
    estimate = count_responses_request(body, "gpt-4.1-mini")
    assert isinstance(estimate, PromptEstimate)
    assert 3 <= estimate.total < 100_000


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(
                        st.sampled_from(["role", "content", "type", "text", "name", "tool_calls", "function",
                                         "arguments", "image_url", "url", "detail", "input_audio", "data", "format",
                                         "parameters", "properties", "enum", "description", "output", "summary"]),
                        children, max_size=5), max_leaves=25)


@settings(max_examples=200, deadline=None)
@given(messages=JSON, tools=JSON, items=JSON)
def test_any_json_gets_an_estimate(messages, tools, items):
    assert count_chat_request({"messages": messages, "tools": tools, "functions": tools,
                               "response_format": {"type": "json_schema", "json_schema": tools}}, "gpt-4o").total >= 3
    assert count_responses_request({"input": items, "tools": tools, "instructions": messages}, "o4-mini").total >= 3


def _config(upstreams: str, extra: str = ""):
    from relay.config import parse_config
    return parse_config("upstreams:\n" + upstreams + extra, {})


def test_the_tables_loaded_at_start_up_are_those_of_the_configured_models():
    four_o = _config("  - {name: a, base_url: 'http://x/v1', keys: [k], models: [gpt-4o, gpt-4.1-mini]}\n")
    assert four_o.named_models() == {"gpt-4o", "gpt-4.1-mini"}
    assert encodings.encodings_for_models(four_o.named_models()) == {O200K}, "no cl100k: 24 MB spared"
    mapped = _config("  - {name: a, base_url: 'http://x/v1', keys: [k], models: [gpt-4o],"
                     " model_map: {gpt-4o: gpt-35-turbo-deploy}}\n", "model_map: {gpt-3.5-turbo: gpt-4o}\n")
    assert mapped.named_models() == {"gpt-4o", "gpt-35-turbo-deploy", "gpt-3.5-turbo"}
    assert encodings.encodings_for_models(mapped.named_models()) == {O200K, CL100K}
    for anything in ("  - {name: a, base_url: 'http://x/v1', keys: [k]}\n",
                     "  - {name: a, base_url: 'http://x/v1', keys: [k], models: ['gpt-4o*']}\n"):
        assert _config(anything).named_models() is None
        assert encodings.encodings_for_models(None) == encodings.ENCODINGS, "any model may come: every table"
    assert encodings.encodings_for_models(["gpt-4o"], {"gpt-4o": CL100K}) == {CL100K}, "an override decides"
    assert encodings.encodings_for_models([]) == {CL100K}


def test_a_table_is_loaded_once_however_many_threads_ask(monkeypatch):
    import threading
    import time
    loads = []

    def slow_load(name):
        loads.append(name)
        time.sleep(0.05)
        return object()
    monkeypatch.setattr(encodings, "_loaded", {})
    monkeypatch.setattr(encodings, "load_encoding", slow_load)
    got = []
    threads = [threading.Thread(target=lambda: got.append(encodings.get_encoding(O200K))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [O200K] and len({id(g) for g in got}) == 1
    assert encodings.loaded_encodings() == {O200K}


async def test_a_reload_that_names_a_new_family_loads_its_table_off_the_loop(monkeypatch, io_loop):
    import asyncio
    import threading

    from relay import reload
    threads = []

    def record(name):
        threads.append((name, threading.current_thread() is threading.main_thread()))
    monkeypatch.setattr(reload, "get_encoding", record)
    monkeypatch.setattr(reload, "loaded_encodings", lambda: frozenset({O200K}))
    reload.load_tables(_config("  - {name: a, base_url: 'http://x/v1', keys: [k], models: [gpt-4o, gpt-3.5-turbo]}\n"))
    for _ in range(100):
        if threads:
            break
        await asyncio.sleep(0.01)
    assert threads == [(CL100K, False)], "cl100k only, loaded in a thread"
    threads.clear()
    reload.load_tables(_config("  - {name: a, base_url: 'http://x/v1', keys: [k], models: [gpt-4o]}\n"))
    await asyncio.sleep(0.05)
    assert threads == [], "nothing missing: nothing loaded"
