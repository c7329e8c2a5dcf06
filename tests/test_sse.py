"""SSE framing without quadratic copies, and token counting a bounded slice at a time. Pure parts."""
import json
import random
import re
import time

from relay.metering.encodings import CL100K, O200K
from relay.metering.tokens import MAX_SLICE_CHARS, TokenTally, count_long_text, count_text
from relay.proxy.sse import SSEDecoder, StreamMeter


def _decode_all(d: SSEDecoder, pieces) -> list[bytes]:
    return [e for p in pieces for e in d.decode(p)]


def _cut(stream: bytes, rnd: random.Random, most: int) -> list[bytes]:
    """``stream`` cut at 1 to ``most`` random points, as network reads."""
    cuts = sorted(rnd.sample(range(1, len(stream)), rnd.randint(1, most)))
    return [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)], strict=True)]


# --- the decoder ---------------------------------------------------------------------

def test_a_boundary_split_across_two_chunks_completes_the_event():
    d = SSEDecoder()
    assert d.decode(b"data: a\n") == [] and d.pending == len(b"data: a\n")
    assert d.decode(b"\ndata: b\n") == [b"data: a\n\n"]
    assert d.pending == len(b"data: b\n")
    assert d.decode(b"\n") == [b"data: b\n\n"] and d.pending == 0 and d.flush() == b""


def test_crlf_split_across_chunks_is_still_a_line_end():
    stream = b"data: one\r\n\r\ndata: two\r\n\r\n: ping\r\n\r\n"
    for cut in range(1, len(stream)):
        for cut2 in range(cut, len(stream)):
            d = SSEDecoder()
            events = _decode_all(d, [stream[:cut], stream[cut:cut2], stream[cut2:]])
            assert events == [b"data: one\n\n", b"data: two\n\n", b": ping\n\n"], (cut, cut2)
            assert d.pending == 0 and d.flush() == b""


def test_a_lone_cr_at_the_end_is_kept_for_flush():
    d = SSEDecoder()
    assert d.decode(b"data: x\r") == [] and d.pending == len(b"data: x\r")
    assert d.flush() == b"data: x\r" and d.pending == 0
    assert d.decode(b"data: y\r") == [] and d.decode(b"z\n\n") == [b"data: y\rz\n\n"]


def test_same_events_as_one_piece_whatever_the_cuts():
    rnd = random.Random(7)
    events = [b"data: {\"n\": %d}\n\n" % i for i in range(200)] + [b": keep-alive\n\n", b"data: [DONE]\n\n"]
    stream = b"".join(events).replace(b"\n", b"\r\n")
    for _ in range(200):
        d = SSEDecoder()
        assert _decode_all(d, _cut(stream, rnd, 40)) == events and d.pending == 0


def test_blank_runs_between_events_are_skipped_as_before_and_nothing_stays_pending():
    d = SSEDecoder()
    assert d.decode(b"data: a\n\n\n\ndata: b\n\n") == [b"data: a\n\n", b"data: b\n\n"]
    assert d.pending == 0
    assert d.decode(b"data: c\n\n\n") == [b"data: c\n\n\n"] and d.pending == 0, "as the one-buffer decoder did"


def test_long_digit_runs_cut_across_reads_still_reach_json_loads():
    """The decoder looks for 19 digits in a row once per read (fast_json.loads's short_digits):
    wherever the reads cut a usage chunk's huge counts, the meter reads what json.loads reads."""
    rnd = random.Random(19)
    for _ in range(300):
        prompt, completion = rnd.choice([9, 10 ** 18, 10 ** 19, 3 * 10 ** 22]), rnd.randrange(10 ** rnd.randint(1, 24))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        stream = (b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
                  + b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
        d, batched, one_by_one = SSEDecoder(), StreamMeter(False), StreamMeter(False)
        for piece in _cut(stream, rnd, 12):
            events = d.decode(piece)
            if d.short_digits:
                assert not any(re.search(rb"[0-9]{19}", e) for e in events)
            for event in events:
                assert batched.accept(event, d.short_digits) == one_by_one.accept(event)
        assert batched.done and batched.usage == one_by_one.usage
        if one_by_one.usage is not None:
            assert type(batched.usage.completion_tokens) is int


def test_pending_counts_the_unfinished_event_across_many_chunks():
    d = SSEDecoder()
    piece = b"x" * 4096
    d.decode(b"data: ")
    for i in range(1, 101):
        assert d.decode(piece) == []
        assert d.pending == 6 + i * 4096
    [event] = d.decode(b"\n\n")
    assert len(event) == 6 + 100 * 4096 + 2 and d.pending == 0


def _decode_in_pieces(size: int, piece: int = 4096) -> float:
    chunk = b"y" * piece
    d = SSEDecoder()
    started = time.perf_counter()
    d.decode(b"data: ")
    for _ in range(size // piece):
        d.decode(chunk)
    [event] = d.decode(b"\n\n")
    elapsed = time.perf_counter() - started
    assert len(event) == 6 + size + 2
    return elapsed


def test_one_huge_event_in_small_chunks_is_decoded_in_linear_time():
    """20 MB in 4 KB pieces: each piece used to copy the whole pending buffer (quadratic)."""
    small = min(_decode_in_pieces(5 << 20) for _ in range(2))
    large = min(_decode_in_pieces(20 << 20) for _ in range(2))
    # Linear: 4 times the data, about 4 times the time. The copy-per-chunk decoder took 16 times.
    assert large < 8 * small + 0.05, (small, large)


# --- counting tokens a slice at a time -------------------------------------------------

ENGLISH = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
           "of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season "
           "of Light, it was the season of Darkness... \"Don't\" they'd say; we'll see what you've got.\n\n")
CHINESE = ("天下大势，分久必合，合久必分。周末七国分争，并入于秦。及秦灭之后，楚、汉分争，又并入于汉。"
           "汉朝自高祖斩白蛇而起义，一统天下，后来光武中兴，传至献帝，遂分为三国。推其致乱之由，"
           "殆始于桓、灵二帝。“你好吗？”他问道。\n")
CODE = '''def tally(parts: list[str], limit: int = 4_096) -> dict[str, int]:
    """Count words; 3.14 and 1,000 are numbers."""
    seen = {}
    for i, p in enumerate(parts):
        if p and not p.isspace():\t# tab here
            seen[p] = seen.get(p, 0) + i ** 2  # x**2
    return {k: v for k, v in sorted(seen.items()) if v >= limit}   \r\n
'''
MIXED = "Emoji 😀👍🏽 and café, naïve — «quotes» 1234567 ١٢٣ नमस्ते दुनिया _under_score__ $%^&*()\t\n"


def _pieces(text: str, rnd: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rnd.choice((1, 2, 3, 4, 7, 16, 50))
        out.append(text[i:i + n])
        i += n
    return out


def _tally(pieces, encoding=CL100K) -> TokenTally:
    tally = TokenTally(encoding)
    for p in pieces:
        tally.add(p)
        while tally.ready:
            tally.count_slice()
    return tally


def test_incremental_count_equals_counting_the_whole_text():
    rnd = random.Random(3)
    for name, unit in (("english", ENGLISH), ("chinese", CHINESE), ("code", CODE), ("mixed", MIXED)):
        text = unit * (120_000 // len(unit) + 1)
        tally = _tally(_pieces(text, rnd))
        assert tally.tokens > 0 and tally.pending < 2 * MAX_SLICE_CHARS, name  # counted as it went
        assert tally.close() == count_text(text), name


def test_o200k_counts_a_slice_at_a_time_as_the_whole_text():
    """Delivered text is counted with its model's table: o200k's words keep their marks and
    contractions, so its cuts are its own; sliced counting equals counting the whole."""
    rnd = random.Random(5)
    units = [ENGLISH, CHINESE, CODE, MIXED, " ", "\n\n", "x", "1", "？", "it's", "We'LL", "don't ",
             "e\u0301", "n\u0303o", "CamelCaseWord", "\u0915\u093f", "(x)", "a_b", "12345", "'s"]
    for _ in range(25):
        text = "".join(rnd.choice(units)[:rnd.randint(1, 300)] for _ in range(400))
        assert _tally(_pieces(text, rnd), O200K).close() == count_text(text, O200K)
        assert count_long_text(text, O200K) == count_text(text, O200K)
        assert count_long_text(text, CL100K) == count_text(text, CL100K)


def test_a_stream_meter_counts_with_the_table_it_is_given():
    text = "日本語のテキストです。" * 3000
    delta = json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode()
    for encoding in (O200K, CL100K):
        m = StreamMeter(forward_usage_chunk=False)
        m.count_with(encoding)
        m.accept(b"data: " + delta + b"\n\n")
        while m.text.ready:
            m.text.count_slice()
        assert m.text.close() == count_text(text, encoding)
    assert count_text(text, O200K) < count_text(text, CL100K), "the tables differ: which one counts matters"


def test_random_mixtures_count_the_same_too():
    rnd = random.Random(11)
    units = [ENGLISH, CHINESE, CODE, MIXED, " ", "\n\n", "   ", "x", "1", "？"]
    for _ in range(20):
        text = "".join(rnd.choice(units)[:rnd.randint(1, 300)] for _ in range(400))
        assert _tally(_pieces(text, rnd)).close() == count_text(text)
        assert count_long_text(text) == count_text(text)


def test_a_long_run_without_spaces_is_cut_at_the_hard_maximum():
    text = "a" * (1 << 20)
    tally = TokenTally()
    tally.add(text)
    before = tally.pending
    while tally.ready:
        tally.count_slice()
        assert before - tally.pending <= MAX_SLICE_CHARS, "no single count is longer than a slice"
        before = tally.pending
    assert tally.pending <= MAX_SLICE_CHARS
    assert abs(tally.close() - count_text(text)) <= len(text) // MAX_SLICE_CHARS, "a token at most per cut"


def test_text_is_held_only_until_it_is_counted():
    m = StreamMeter(forward_usage_chunk=False)
    delta = b'data: {"choices":[{"index":0,"delta":{"content":" lorem ipsum dolor"}}]}\n\n'
    for _ in range(20_000):
        m.accept(delta)
        while m.text.ready:
            m.text.count_slice()
    assert m.text.pending < 2 * MAX_SLICE_CHARS, "counted text is not kept"
    assert m.text.close() == count_text(" lorem ipsum dolor" * 20_000)


def test_ten_megabytes_without_a_space_count_a_slice_at_a_time():
    tally = TokenTally()
    tally.add("x" * (10 << 20))
    calls = 0
    while tally.ready:
        tally.count_slice()
        calls += 1
    assert calls >= (10 << 20) // MAX_SLICE_CHARS - 1
    assert tally.close() > 0 and tally.pending == 0


def _event_data_line_by_line(event: bytes) -> bytes:
    return b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))


def test_an_events_data_is_read_the_same_by_the_shortcut_and_line_by_line():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from relay.proxy.sse import event_data
    line = st.sampled_from([b"data:", b"data: ", b"data:  ", b"event: x", b"event:", b": ping", b"id: 1", b"",
                            b"data", b"dat", b"retry: 5"])
    tail = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"|")) | st.sampled_from([b"{}", b"[DONE]", b""])

    @settings(max_examples=2000, deadline=None)
    @given(st.lists(st.tuples(line, tail), max_size=4), st.sampled_from([b"\n\n", b"\n", b"", b"\n\n\n"]))
    def check(lines, end):
        event = b"\n".join(a + b for a, b in lines) + end
        assert event_data(event) == _event_data_line_by_line(event), event
    check()
    assert event_data(b"event: response.output_text.delta\ndata: {\"a\":1}\n\n") == b'{"a":1}'
    assert event_data(b"data:  [DONE]\n\n") == b"[DONE]"
