"""Images and audio through relay, driven by the official openai SDK over real sockets against the
fake upstream: every route, charged exactly (hand-computed here), refunded on failure, conserved."""
import asyncio
import hashlib
import io
import json
import math
import wave
from fractions import Fraction

import pytest
from openai import AsyncOpenAI, InternalServerError
from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from relay.metering.tokens import count_text
from tests.conservation import assert_conserved, settled
from tests.helpers import TEST_KEY, UPSTREAM_KEY, eventually, relay_app

MEDIA_CONFIG = """
upstreams:
  - name: primary
    base_url: %s
    keys: [%s]
    model_map: %s
model_map:
  whisper: whisper-1
pricing:
  gpt-4: {input: 20, output: 40}
  dall-e-3:
    per_image: {"1024x1024/standard": "80000/3", "1024x1024/hd": "160000/3", "1024x1792/standard": "160000/3",
                "1792x1024/standard": "160000/3", "1024x1792/hd": 80000, "1792x1024/hd": 80000}
  dall-e-2:
    per_image: {"1024x1024": "40000/3", "512x512": 12000, "256x256": "32000/3"}
  gpt-image-1: {input: "10/3", image_input: "20/3", output: "80/3"}
  whisper-1: {per_second: "200/3"}
  whisper-large: {per_second: "200/3"}
  gpt-4o-transcribe: {input: "5/3", audio_input: 4, output: "20/3"}
  tts-1: {per_character: 10}
  tts-1-hd: {per_character: 20}
"""

A_CAT = "a cat in a hat"


@pytest.fixture
def relay(io_loop, fake, store):
    """Overrides conftest's: the media prices of the example file (and gpt-4o-transcribe's)."""
    app, services = relay_app(MEDIA_CONFIG % (fake.base_url, UPSTREAM_KEY, "{}"), store)
    yield app, services
    io_loop.run_sync(services.close)


def sdk(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url, api_key=TEST_KEY, max_retries=0)


def make_wav(seconds: float, rate: int = 16000) -> bytes:
    """A real WAV of a known duration, written with the standard library."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(2 * round(seconds * rate)))
    return out.getvalue()


async def ledger(store) -> list[dict]:
    await store.flush_ledger()
    return sorted(await store.ledger_entries(), key=lambda e: e["at"])


async def charged(store, services) -> list[dict]:
    """The ledger once everything settled, conservation checked."""
    await settled(store, services)
    await assert_conserved(store)
    return await ledger(store)


async def key_doc(store) -> dict:
    return await store.key_doc(hash_key(TEST_KEY))


# --- images -----------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
async def test_images_generate_is_charged_per_image_by_size_and_quality(http_server_client, fake, store, services,
                                                                        prefix):
    client = sdk(http_server_client.get_url(prefix))
    one = await client.images.generate(model="dall-e-3", prompt=A_CAT)
    assert one.data[0].url.endswith("/_fake/files/image.png") and one.data[0].revised_prompt == A_CAT
    hd = await client.images.generate(model="dall-e-3", prompt=A_CAT, size="1792x1024", quality="hd")
    small = await client.images.generate(model="dall-e-2", prompt=A_CAT, n=3, size="512x512",
                                         response_format="b64_json")
    assert len(small.data) == 3 and small.data[0].b64_json
    default = await client.images.generate(prompt=A_CAT)  # OpenAI's default model: dall-e-2, 1024x1024
    assert len(hd.data) == len(default.data) == 1
    entries = await charged(store, services)
    assert [e["cost"] for e in entries] == [26667, 80000, 3 * 12000, 13334]  # $0.04, $0.12, 3 × $0.018, $0.02
    assert [e["images"] for e in entries] == [1, 1, 3, 1]
    assert {e["api"] for e in entries} == {"images"}
    assert fake.requests[-1]["model"] == "dall-e-2", "the default model is sent explicitly"
    await client.close()


async def test_gpt_image_is_charged_by_the_tokens_it_reports(base_url, store, services):
    client = sdk(base_url)
    result = await client.images.generate(model="gpt-image-1", prompt=A_CAT, quality="high", n=2)
    u = result.usage
    text = count_text(A_CAT)
    assert (u.input_tokens, u.output_tokens, u.input_tokens_details.text_tokens) == (text, 2 * 4160, text)
    [entry] = await charged(store, services)
    assert entry["cost"] == math.ceil(Fraction(10, 3) * text + Fraction(80, 3) * 2 * 4160)
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["images"]) == (text, 8320, 2)
    await client.close()


async def test_images_edit_uploads_multipart_and_charges_the_image_input(base_url, fake, store, services):
    from relay.fake_upstream.images import png
    client = sdk(base_url)
    picture = png(512, 512)
    result = await client.images.edit(model="gpt-image-1", image=("cat.png", picture, "image/png"), prompt=A_CAT)
    assert result.data[0].b64_json
    seen = fake.requests[-1]
    assert seen["path"] == "/v1/images/edits" and seen["files"] == {"image": [len(picture)]}
    assert seen["fields"]["model"] == "gpt-image-1" and seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    text = count_text(A_CAT)
    [entry] = await charged(store, services)
    assert entry["cost"] == math.ceil(Fraction(10, 3) * text + Fraction(20, 3) * 323 + Fraction(80, 3) * 1056)
    assert entry["image_tokens"] == 323
    with pytest.warns(DeprecationWarning):  # the SDK marks variations deprecated; OpenAI still serves them
        variation = await client.images.create_variation(image=("cat.png", picture, "image/png"), n=2,
                                                         size="256x256")
    assert len(variation.data) == 2 and fake.requests[-1]["fields"]["model"] == "dall-e-2"
    assert (await charged(store, services))[-1]["cost"] == math.ceil(2 * Fraction(32000, 3))
    await client.close()


async def test_image_failure_upstream_is_refunded(base_url, fake, store, services):
    client = sdk(base_url)
    before = await key_doc(store)
    fake.state.behaviour.status = 500
    with pytest.raises(InternalServerError):
        await client.images.generate(model="dall-e-3", prompt=A_CAT)
    fake.state.behaviour.status = None
    fake.state.behaviour.broken = "invalid_json"
    with pytest.raises(InternalServerError):
        await client.images.generate(model="dall-e-3", prompt=A_CAT)
    assert await charged(store, services) == []
    assert (await key_doc(store))["balance"] == before["balance"]
    await client.close()


# --- audio ------------------------------------------------------------------------------------

async def test_transcription_of_a_wav_is_charged_by_its_seconds_read_from_the_file(base_url, fake, store, services):
    client = sdk(base_url)
    fake.state.behaviour.omit_usage = True  # nothing reported: relay's own reading of the header counts
    result = await client.audio.transcriptions.create(model="whisper-1", file=("hi.wav", make_wav(3.5), "audio/wav"))
    assert result.text == "Hello from the fake upstream, relay says hi!"
    text = await client.audio.transcriptions.create(model="whisper-1", file=("hi.wav", make_wav(10.0)),
                                                    response_format="text")
    assert text.startswith("Hello from the fake upstream")
    entries = await charged(store, services)
    assert [(e["seconds"], e["cost"], e["api"]) for e in entries] == [(4, 267, "audio"), (10, 667, "audio")]
    assert fake.requests[-1]["seconds"] == 10.0
    await client.close()


async def test_translation_and_verbose_json_bill_the_seconds_the_upstream_reports(base_url, fake, store, services):
    client = sdk(base_url)
    with pytest.warns(DeprecationWarning):  # the SDK marks translations deprecated; OpenAI still serves them
        result = await client.audio.translations.create(model="whisper", file=("hi.wav", make_wav(61.2)))
    assert result.text.startswith("Hello")
    assert fake.requests[-1]["fields"]["model"] == "whisper-1", "the global model_map renames the form's model"
    fake.state.behaviour.omit_usage = True
    verbose = await client.audio.transcriptions.create(model="whisper-1", file=("hi.wav", make_wav(2.2)),
                                                       response_format="verbose_json")
    assert verbose.duration == pytest.approx(2.2)
    entries = await charged(store, services)
    assert [(e["seconds"], e["cost"]) for e in entries] == [(62, math.ceil(62 * Fraction(200, 3))), (3, 200)]
    await client.close()


async def test_token_billed_transcription_is_charged_by_its_usage(base_url, store, services):
    client = sdk(base_url)
    result = await client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("hi.wav", make_wav(4.0)))
    assert result.usage.type == "tokens" and result.usage.input_tokens == 40
    out = count_text(result.text)
    [entry] = await charged(store, services)
    assert entry["cost"] == math.ceil(4 * 40 + Fraction(20, 3) * out)  # 40 audio tokens at 4, the text at 20/3
    assert (entry["prompt_tokens"], entry["audio_tokens"], entry["completion_tokens"]) == (40, 40, out)
    await client.close()


async def test_speech_streams_audio_as_it_arrives_and_is_charged_per_character(base_url, fake, store, services):
    client = sdk(base_url)
    words = "relay reads this aloud. " * 20
    fake.state.behaviour.chunk_delay = 0.05
    first_at, got = None, b""
    async with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=words) as resp:
        assert resp.headers["content-type"] == "audio/mpeg"
        async for chunk in resp.iter_bytes():
            first_at = first_at or asyncio.get_running_loop().time()
            got += chunk
    sent = fake.requests[-1]["chunks_sent_at"]
    assert len(sent) > 3 and first_at < sent[-1] - 0.1, "the first bytes arrive long before the upstream's last"
    assert len(got) == fake.requests[-1]["audio_bytes"] and got[:2] == b"\xff\xfb"
    wav_reply = await client.audio.speech.create(model="tts-1-hd", voice="nova", input="Hi!", response_format="wav")
    assert wav_reply.content[:4] == b"RIFF"
    entries = await charged(store, services)
    assert [(e["characters"], e["cost"]) for e in entries] == [(len(words), 10 * len(words)), (3, 60)]
    await client.close()


async def test_speech_refunded_when_the_upstream_fails(base_url, fake, store, services):
    client = sdk(base_url)
    fake.state.behaviour.status = 503
    with pytest.raises(InternalServerError):
        await client.audio.speech.create(model="tts-1", voice="alloy", input="Hello")
    assert await charged(store, services) == []
    await client.close()


# --- uploads as bytes -------------------------------------------------------------------------

def form(fields: dict, files: dict, boundary: str = "relay-test-boundary") -> tuple[bytes, dict]:
    """A multipart/form-data body written by hand, and its headers."""
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, (filename, data) in files.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, {"Authorization": f"Bearer {TEST_KEY}", "Content-Type": f"multipart/form-data; boundary={boundary}"}


def port_of(http_server_client) -> int:
    return int(http_server_client.get_url("/").split(":")[2].split("/")[0])


async def post(url: str, body: bytes, headers: dict):
    return await AsyncHTTPClient().fetch(url, method="POST", body=body, headers=headers, raise_error=False)


async def test_an_upload_goes_upstream_byte_for_byte_its_model_renamed_only_where_an_endpoint_names_it(
        http_server_client, fake, store, services):
    from tests.helpers import add_key, mock_store, serve
    body, headers = form({"model": "whisper-1", "response_format": "json"}, {"file": ("a.wav", make_wav(1.0))})
    resp = await post(http_server_client.get_url("/v1/audio/transcriptions"), body, headers)
    assert resp.code == 200, resp.body
    assert fake.requests[-1]["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert fake.requests[-1]["content_type"] == headers["Content-Type"]
    # An upstream that calls whisper-1 by its own name gets just that field rewritten.
    own = mock_store()  # a relay of its own (its own process identity, so its own store)
    await add_key(own)
    url, server, other = await serve(MEDIA_CONFIG % (fake.base_url, UPSTREAM_KEY, "{whisper-1: whisper-large}"), own)
    resp = await post(url + "/v1/audio/transcriptions", body, headers)
    assert resp.code == 200, resp.body
    renamed = body.replace(b"\r\n\r\nwhisper-1\r\n", b"\r\n\r\nwhisper-large\r\n")
    assert fake.requests[-1]["body_sha256"] == hashlib.sha256(renamed).hexdigest()
    assert fake.requests[-1]["fields"]["model"] == "whisper-large"
    # No model in an image upload: OpenAI's default (dall-e-2) is added, first, for the upstream.
    body, headers = form({"n": "1"}, {"image": ("a.png", b"\x89PNG not really")})
    resp = await post(url + "/v1/images/variations", body, headers)
    assert resp.code == 200 and fake.requests[-1]["fields"] == {"model": "dall-e-2", "n": "1"}
    assert [(e["model"], e["cost"]) for e in await charged(own, other)] == [("whisper-large", 67), ("dall-e-2", 13334)]
    server.stop()
    await other.close()
    assert [(e["model"], e["cost"]) for e in await charged(store, services)] == [("whisper-1", 67)]


BAD_JSON = [
    ("/v1/images/generations", {"model": "dall-e-3", "prompt": "x", "n": 11}, "n"),
    ("/v1/images/generations", {"model": "dall-e-3", "prompt": "x", "n": 0}, "n"),
    ("/v1/images/generations", {"model": "dall-e-3", "prompt": "x", "n": True}, "n"),
    ("/v1/images/generations", {"model": "dall-e-3", "prompt": "x", "size": "huge"}, "size"),
    ("/v1/images/generations", {"model": "dall-e-3", "prompt": "x", "size": "1024x1024x1"}, "size"),
    ("/v1/images/generations", {"model": "dall-e-3", "prompt": "x", "quality": "HD!"}, "quality"),
    ("/v1/images/generations", {"model": "dall-e-3", "prompt": "x", "response_format": "png"}, "response_format"),
    ("/v1/images/generations", {"model": "dall-e-3"}, "prompt"),
    ("/v1/images/generations", {"model": "gpt-image-1", "prompt": "x", "stream": True}, "stream"),
    ("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": "x" * 4097}, "input"),
    ("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": ""}, "input"),
    ("/v1/audio/speech", {"model": "tts-1", "input": "hi"}, "voice"),
    ("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": "hi", "speed": 5}, "speed"),
    ("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": "hi", "response_format": "ogg"},
     "response_format"),
    ("/v1/audio/speech", {"voice": "alloy", "input": "hi"}, "model"),
]


@pytest.mark.parametrize("path,body,param", BAD_JSON)
async def test_bad_json_input_is_a_clear_400(http_server_client, fake, store, services, path, body, param):
    resp = await post(http_server_client.get_url(path), json.dumps(body).encode(),
                      {"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"})
    assert resp.code == 400, resp.body
    error = json.loads(resp.body)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert fake.requests == [] and await charged(store, services) == []


WAV = make_wav(1.0)
BAD_FORMS = [
    ("/v1/audio/transcriptions", form({"model": "whisper-1", "response_format": "mp4"}, {"file": ("a.wav", WAV)}),
     "response_format"),
    ("/v1/audio/transcriptions", form({"model": "whisper-1"}, {}), "file"),
    ("/v1/audio/transcriptions", form({"response_format": "json"}, {"file": ("a.wav", WAV)}), "model"),
    ("/v1/audio/transcriptions", form({"model": "whisper-1", "stream": "true"}, {"file": ("a.wav", WAV)}), "stream"),
    ("/v1/images/edits", form({"model": "dall-e-2", "prompt": "x"}, {}), "image"),
    ("/v1/images/edits", form({"model": "dall-e-2", "n": "11"}, {"image": ("a.png", b"x")}), "n"),
    ("/v1/images/variations", form({"model": "dall-e-2", "size": "big"}, {"image": ("a.png", b"x")}), "size"),
]


@pytest.mark.parametrize("path,made,param", BAD_FORMS)
async def test_bad_form_fields_are_a_clear_400(http_server_client, fake, store, services, path, made, param):
    resp = await post(http_server_client.get_url(path), *made)
    assert resp.code == 400, resp.body
    assert json.loads(resp.body)["error"]["param"] == param
    assert fake.requests == [] and await charged(store, services) == []


def _twice(name: str) -> bytes:
    body, _ = form({"model": "whisper-1"}, {"file": ("a.wav", WAV)})
    extra = f'--relay-test-boundary\r\nContent-Disposition: form-data; name="{name}"\r\n\r\nwhisper-1\r\n'
    return extra.encode() + body


MALFORMED = [
    ("application/json", b'{"model": "whisper-1"}'),
    ("multipart/form-data", form({"model": "whisper-1"}, {"file": ("a.wav", WAV)})[0]),  # no boundary
    ("multipart/form-data; boundary=relay-test-boundary", form({"model": "whisper-1"},
                                                               {"file": ("a.wav", WAV)})[0][:-30]),  # cut short
    ("multipart/form-data; boundary=relay-test-boundary", _twice("model")),
    ("multipart/form-data; boundary=relay-test-boundary",
     form({"model": "whisper-1"}, {"file": ("a.wav", WAV)})[0].replace(b'form-data; name="model"', b"form-data")),
    ("multipart/form-data; boundary=relay-test-boundary",
     form({"model": "whisper-1"}, {"file": ("a.wav", WAV)})[0].replace(b'name="model"', b"name*=utf-8''model")),
    ("multipart/form-data; boundary=relay-test-boundary", b"--relay-test-boundary\r\n\r\n\r\n--relay-test-boundary--"),
    ("multipart/form-data; boundary=relay-test-boundary", b"no boundary anywhere" * 100),
]


@pytest.mark.parametrize("content_type,body", MALFORMED)
async def test_malformed_multipart_is_a_400_never_a_500(http_server_client, fake, store, services, content_type,
                                                        body):
    resp = await post(http_server_client.get_url("/v1/audio/transcriptions"), body,
                      {"Authorization": f"Bearer {TEST_KEY}", "Content-Type": content_type})
    assert resp.code == 400, resp.body
    error = json.loads(resp.body)["error"]
    assert error["type"] == "invalid_request_error" and "multipart" in error["message"]
    assert fake.requests == [] and await charged(store, services) == []


async def test_two_audio_files_are_refused(http_server_client, fake):
    body, headers = form({"model": "whisper-1"}, {"file": ("a.wav", WAV)})
    second = b'--relay-test-boundary\r\nContent-Disposition: form-data; name="file"; filename="b.wav"\r\n\r\n'
    resp = await post(http_server_client.get_url("/v1/audio/transcriptions"), second + WAV + b"\r\n" + body, headers)
    assert resp.code == 400 and json.loads(resp.body)["error"]["param"] == "file"
    assert fake.requests == []


async def test_an_audio_upload_over_25_mb_is_a_413_while_it_arrives(http_server_client, fake, store, services):
    limit = 25 * 1024 * 1024
    for announced in (True, False):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(http_server_client))
        head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
                f"Content-Type: multipart/form-data; boundary=b\r\n")
        # Announced: only the headers are sent, so a 413 proves the size is refused before the body.
        # Chunked: just over the limit and never terminated, so relay must not wait for the end.
        head += f"Content-Length: {limit + 1}\r\n\r\n" if announced else "Transfer-Encoding: chunked\r\n\r\n"
        writer.write(head.encode())
        piece = b"x" * (1 << 20)
        for _ in range(0 if announced else 25):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        if not announced:
            writer.write(b"10\r\n" + b"y" * 16 + b"\r\n")
        answer = await asyncio.wait_for(reader.read(), 20)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b'"request_too_large"' in answer and b"26214400" in answer
        writer.close()
        await writer.wait_closed()
    assert fake.requests == [] and await charged(store, services) == []


# --- hang-ups, a mixed workload ---------------------------------------------------------------

async def _speech_on_a_raw_socket(port: int, text: str):
    body = json.dumps({"model": "tts-1", "voice": "alloy", "input": text}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    await writer.drain()
    return reader, writer


async def test_a_client_hanging_up_mid_speech_cancels_the_upstream_and_pays_for_the_whole_input(
        http_server_client, fake, store, services):
    text = "A long text read aloud, slowly. " * 40
    fake.state.behaviour.chunk_delay = 0.05
    reader, writer = await _speech_on_a_raw_socket(port_of(http_server_client), text)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"audio/mpeg" in head
    assert await reader.read(1024), "some audio arrived"
    writer.close()
    await writer.wait_closed()
    seen = await eventually(lambda: fake.requests and fake.requests[-1]["aborted"] and fake.requests[-1],
                            message="the upstream's request is cancelled")
    assert len(seen["chunks_sent_at"]) < math.ceil(seen["audio_bytes"] / 4096), "it stopped before the end"
    [entry] = await charged(store, services)
    assert (entry["characters"], entry["cost"]) == (len(text), 10 * len(text))


async def test_a_client_leaving_before_any_audio_is_refunded(http_server_client, fake, store, services):
    fake.state.behaviour.first_byte_delay = 0.5
    _, writer = await _speech_on_a_raw_socket(port_of(http_server_client), "Hello there")
    await eventually(lambda: fake.requests, message="relay forwarded the request")
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: fake.requests[-1]["aborted"] or not services.quota.busy(), message="ended")
    assert await charged(store, services) == []


async def test_a_mixed_workload_is_charged_exactly_and_shows_in_billing_metrics_and_usage_page(
        http_server_client, base_url, fake, store, services):
    from relay.fake_upstream.images import png
    client = sdk(base_url)
    calls = [client.images.generate(model="dall-e-3", prompt=A_CAT) for _ in range(3)]
    calls += [client.images.edit(model="dall-e-2", image=("a.png", png(), "image/png"), prompt=A_CAT, n=2,
                                 size="256x256") for _ in range(2)]
    calls += [client.audio.transcriptions.create(model="whisper-1", file=("a.wav", make_wav(s))) for s in (1, 2.5)]
    calls += [client.audio.speech.create(model="tts-1-hd", voice="alloy", input="x" * k) for k in (5, 50, 500)]
    calls += [client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])]
    results = await asyncio.gather(*calls)
    assert len(results) == 11
    expected = 3 * 26667 + 2 * math.ceil(2 * Fraction(32000, 3)) + 67 + 200 + 20 * 555 + (8 * 20 + 10 * 40)
    entries = await charged(store, services)
    assert sum(e["cost"] for e in entries) == expected
    assert sorted({e["api"] for e in entries}) == ["audio", "chat", "images"]
    doc = await key_doc(store)
    assert doc["used"] == expected and doc["granted"] == doc["balance"] + expected
    auth = {"Authorization": f"Bearer {TEST_KEY}"}
    fetch = http_server_client.fetch
    import datetime as dt
    today = dt.datetime.now(dt.UTC).date()
    usage = json.loads((await fetch(f"/dashboard/billing/usage?start_date={today}&end_date="
                                    f"{today + dt.timedelta(days=1)}", headers=auth)).body)
    assert usage["total_usage"] == expected * 100
    summary = json.loads((await fetch("/usage/api/summary", headers=auth)).body)
    assert {(r["api"], r["characters"]) for r in summary["recent"] if r["api"] == "audio" and r["characters"]} == \
        {("audio", 5), ("audio", 50), ("audio", 500)}
    metrics = (await fetch("/metrics")).body.decode()
    assert 'relay_requests_total{model="dall-e-3",route="images",status_class="2xx"}' in metrics
    assert 'relay_media_metered_total{kind="characters",model="tts-1-hd"}' in metrics
    assert 'relay_media_metered_total{kind="seconds",model="whisper-1"}' in metrics
    await client.close()


# --- memory -----------------------------------------------------------------------------------

def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def test_a_20_mb_upload_is_held_once_not_twice(embedded, tmp_path, fake):
    """relay's peak resident memory grows by about the file, not twice it: the body is kept as the
    chunks it arrived in and sent upstream from them (the fake, in this process, parses its own copy)."""
    import uuid

    from relay.store.connect import close_client, open_store
    from tests.helpers import add_key
    from tests.processes import RelayProcess, db_uri
    uri = db_uri(embedded, "upload" + uuid.uuid4().hex[:6])
    own = await open_store(uri)
    await add_key(own, quota=10**9)
    relay = await RelayProcess(MEDIA_CONFIG % (fake.base_url, UPSTREAM_KEY, "{}"), tmp_path, "--mongodb-uri",
                               uri).start()
    url = relay.url + "/v1/audio/transcriptions"
    body, headers = form({"model": "whisper-1"}, {"file": ("warm.wav", make_wav(1.0))})
    assert (await post(url, body, headers)).code == 200  # warm: imports, connections, the slice
    audio = make_wav(655.36)  # 20 MiB of 16 kHz 16-bit mono
    body, headers = form({"model": "whisper-1"}, {"file": ("big.wav", audio)})
    pid = relay.proc.pid
    before = _status_kb(pid, "VmRSS")
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")  # resets the peak (VmHWM) to the current resident size
    resp = await AsyncHTTPClient().fetch(url, method="POST", body=body, headers=headers, raise_error=False,
                                         request_timeout=60)
    assert resp.code == 200, resp.body
    assert fake.requests[-1]["files"] == {"file": [len(audio)]}
    growth = (_status_kb(pid, "VmHWM") - before) / 1024
    size = len(audio) / (1 << 20)
    print(f"relay's peak RSS grew {growth:.1f} MiB for a {size:.1f} MiB upload")
    assert growth < 1.5 * size, f"relay's peak RSS grew {growth:.1f} MiB for a {size:.1f} MiB upload"
    await relay.stop()
    await settled(own)
    await assert_conserved(own)
    entries = await ledger(own)
    assert [e["seconds"] for e in entries] == [1, 656]
    await close_client(own.client)


async def test_an_upload_failing_over_is_sent_again_whole_to_the_next_upstream(store):
    from tests.helpers import serve, start_fake
    bad, good = start_fake(), start_fake()
    bad.state.behaviour.status = 502
    url, server, services = await serve(_with_backup(bad.base_url, good.base_url), store)
    body, headers = form({"model": "whisper-1"}, {"file": ("a.wav", make_wav(2.0))})
    resp = await post(url + "/v1/audio/transcriptions", body, headers)
    assert resp.code == 200, resp.body
    assert len(bad.requests) == 1 and bad.requests[0]["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert good.requests[-1]["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert [e["cost"] for e in await charged(store, services)] == [134]
    server.stop()
    await services.close()
    bad.stop()
    good.stop()


def _with_backup(primary: str, backup: str) -> str:
    text = MEDIA_CONFIG % (primary, UPSTREAM_KEY, "{}")
    return text.replace("model_map:\n  whisper:", f"  - {{name: backup, base_url: '{backup}', keys: [sk-backup], "
                                                  f"priority: 1}}\nmodel_map:\n  whisper:")
