"""Pure logic without sockets: SSE framing and metering, selection, tokens, prices, addresses."""
import ipaddress
import json
import random
from collections import Counter
from fractions import Fraction

import pytest

from relay.balancer.pool import Pool
from relay.balancer.selection import pick
from relay.config import Price, parse_config
from relay.errors import NoEndpoint
from relay.metering.pricing import cost
from relay.metering.tokens import count_chat_prompt, count_embedding_input, count_text
from relay.metering.usage import Usage
from relay.net import client_address, parse_trusted
from relay.proxy.responses_sse import ResponsesStreamMeter
from relay.proxy.router import Router
from relay.proxy.sse import SSEDecoder, StreamMeter
from relay.redact import mask_key, redact_path, scrub


def _chunk(content=None, usage=None, choices=True, finish=None):
    obj = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content} if content
                                                           else {}, "finish_reason": finish}] if choices else []}
    if usage is not None or not choices:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_sse_decoder_reassembles_events_split_anywhere():
    stream = _chunk("Hel") + _chunk("lo") + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        d = SSEDecoder()
        events = d.decode(stream[:cut]) + d.decode(stream[cut:])
        assert b"".join(events) == stream and d.flush() == b""


def test_sse_decoder_accepts_crlf_and_keeps_a_partial_tail():
    d = SSEDecoder()
    assert d.decode(b"data: a\r\n\r\ndata: b") == [b"data: a\n\n"]
    assert d.flush() == b"data: b"


def test_meter_drops_the_usage_chunk_unless_asked_and_collects_text():
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    events = [_chunk("Hi"), _chunk(" there", finish="stop"), _chunk(usage=usage, choices=False), b"data: [DONE]\n\n"]
    quiet = StreamMeter(forward_usage_chunk=False)
    assert [quiet.accept(e) for e in events] == [True, True, False, True]
    assert quiet.usage.prompt_tokens == 5 and quiet.usage.completion_tokens == 2
    assert quiet.delivered_text == "Hi there" and quiet.done
    asked = StreamMeter(forward_usage_chunk=True)
    assert all(asked.accept(e) for e in events)


def _typed(kind, **fields):
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


def test_responses_meter_reads_usage_text_and_the_id_and_passes_every_event():
    usage = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 7,
             "output_tokens_details": {"reasoning_tokens": 3}}
    events = [_typed("response.created", response={"id": "resp_1", "usage": None}),
              _typed("response.output_text.delta", delta="Hel"), _typed("response.refusal.delta", delta="lo"),
              _typed("response.function_call_arguments.delta", delta='{"a"'), b": keep-alive\n\n",
              _typed("response.output_text.done", text="Hello"),
              _typed("response.completed", response={"id": "resp_1", "usage": usage})]
    named = []
    meter = ResponsesStreamMeter()
    meter.on_response_id = named.append
    assert [meter.accept(e) for e in events] == [True] * len(events)
    assert named == ["resp_1"] and meter.response_id == "resp_1" and meter.done and not meter.failed
    assert meter.delivered_text == 'Hello{"a"'
    assert (meter.usage.prompt_tokens, meter.usage.cached_tokens, meter.usage.completion_tokens,
            meter.usage.reasoning_tokens) == (9, 4, 7, 3)


@pytest.mark.parametrize("last", ["response.incomplete", "response.failed", "error"])
def test_responses_meter_ends_on_every_terminal_event_and_drops_garbage(last):
    meter = ResponsesStreamMeter()
    assert not meter.accept(b"data: {oops\n\n") and not meter.accept(b"event: x\ndata: [1]\n\n")
    assert not meter.accept(b"event: response.in_progress\n\n"), "an event without data is of no use"
    assert meter.malformed == 2 and not meter.done and not meter.started
    assert meter.accept(_typed(last, response={"usage": {"input_tokens": 1, "output_tokens": 0}}))
    assert meter.done and meter.failed == (last != "response.incomplete")
    assert meter.started == (last != "error")


def test_meter_drops_garbage_events():
    m = StreamMeter(False)
    assert not m.accept(b"data: {oops\n\n") and not m.accept(b"data: 42\n\n") and not m.accept(b"hello\n\n")
    assert m.malformed == 3 and m.usage is None and m.accept(_chunk("ok"))
    assert m.accept(b": keep-alive\n\n"), "comment-only events (keep-alives) pass"


def _pool(text):
    return Pool.from_config(parse_config(text, {}))


TWO_TIERS = """
upstreams:
  - {name: heavy, base_url: 'http://a', keys: [k1], weight: 3}
  - {name: light, base_url: 'http://b', keys: [k2], weight: 1}
  - {name: spare, base_url: 'http://c', keys: [k3], priority: 1}
  - {name: only4, base_url: 'http://d', keys: [k4], models: [gpt-4], priority: 2}
"""


def test_tiers_are_lowest_first_and_respect_models():
    pool = _pool(TWO_TIERS)
    assert [[e.upstream.name for e in t] for t in pool.tiers_for("gpt-4")] == [["heavy", "light"], ["spare"], ["only4"]]
    assert len(pool.tiers_for("gpt-3.5-turbo")) == 2


def test_weighted_choice_follows_weights_when_load_is_even():
    tier = _pool(TWO_TIERS).tiers_for("gpt-4")[0]
    rng = random.Random(7)
    counts = Counter(pick(tier, rng).upstream.name for _ in range(4000))
    share = counts["heavy"] / 4000
    assert 0.70 < share < 0.95  # P2C over weights 3:1 leans to the heavy endpoint


def test_choice_prefers_the_endpoint_with_fewer_requests_in_flight():
    tier = _pool(TWO_TIERS).tiers_for("gpt-4")[0]
    tier[0].health.in_flight = 50  # heavy is swamped
    rng = random.Random(1)
    counts = Counter(pick(tier, rng).upstream.name for _ in range(1000))
    assert counts["light"] > counts["heavy"]


def test_router_with_nothing_to_offer_raises_no_endpoint():
    router = Router(_pool("upstreams:\n  - {name: d, base_url: 'http://d', keys: [k], models: [gpt-4]}"),
                    transport=None)
    assert router.choose("gpt-4").upstream.name == "d"
    with pytest.raises(NoEndpoint) as info:
        router.choose("gpt-3.5-turbo")
    assert info.value.status == 503


def test_prompt_tokens_match_openai_cookbook_example():
    messages = [
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
                                      "jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant",
         "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
                                                             "base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how "
                                                                  "to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                    "deliverable."},
    ]
    assert count_chat_prompt(messages) == 129  # OpenAI's published count for gpt-3.5-turbo-0613 / gpt-4


def test_token_counting_edge_cases():
    assert count_text("") == 0
    assert count_text("<|endoftext|>") > 1  # special tokens in user text count as text
    assert count_chat_prompt([{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                           {"type": "image_url", "image_url": {"url": "x"}}]}]) == 8
    assert count_embedding_input([1, 2, 3]) == 3
    assert count_embedding_input(["hello", "hello"]) == 2


def test_cost_is_exact_and_rounds_up_once():
    assert cost(Price(Fraction(2, 3), Fraction(4, 3)), Usage(3, 3)) == 6
    assert cost(Price(Fraction(2, 3), Fraction(4, 3)), Usage(1, 1)) == 2  # 2/3 + 4/3 = 2 exactly, no float drift
    assert cost(Price(Fraction(2, 3), Fraction(4, 3)), Usage(1, 0)) == 1
    assert cost(Price(Fraction(20), Fraction(40)), Usage(129, 10)) == 2980
    assert cost(Price(Fraction(1, 15)), Usage(16, 0)) == 2


def test_forwarded_headers_believed_only_from_trusted_proxies():
    trusted = parse_trusted(["127.0.0.1", "10.0.0.0/8"])
    assert client_address("127.0.0.1", "203.0.113.9, 10.1.2.3", "https", "http", trusted) == ("203.0.113.9", "https")
    assert client_address("198.51.100.7", "203.0.113.9", "https", "http", trusted) == ("198.51.100.7", "http")
    assert client_address("127.0.0.1", None, None, "http", ()) == ("127.0.0.1", "http")
    assert isinstance(trusted[1], ipaddress.IPv4Network)


def test_scrub_removes_keys_whole_or_masked():
    body = b'{"error":{"message":"Incorrect API key provided: sk-ab********wxyz. key sk-secret-123"}}'
    out = scrub(body, ("sk-secret-123",))
    assert b"sk-" not in out and b"wxyz" not in out
    assert mask_key("sk-abcdefghijklmnop") == "sk-...mnop"
    key = "ak-" + "Q" * 40
    assert redact_path(f"/admin/keys/{key}/topup") == "/admin/keys/ak-QQQQQQQ.../topup"


def test_pure_modules_import_no_io_frameworks():
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "relay"
    pure = ["config", "errors.py", "keys.py", "net.py", "redact.py", "bounded_json.py", "balancer", "metering",
            "proxy/sse.py", "proxy/request.py", "proxy/multipart.py", "proxy/chunks.py", "quota/charge.py",
            "proxy/responses_sse.py"]
    banned = {"tornado", "aiohttp", "motor", "pymongo", "prometheus_client", "asyncio"}
    files = [p for name in pure for p in ((root / name).rglob("*.py") if (root / name).is_dir() else [root / name])]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert n.split(".")[0] not in banned, f"{path.name} imports {n}"
