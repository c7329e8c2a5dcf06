"""The stream meters, without sockets: chat's and the Responses API's (usage, text, end, garbage)."""
import json

import pytest

from relay.proxy.responses_sse import ResponsesStreamMeter
from relay.proxy.sse import SSEDecoder, StreamMeter


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

