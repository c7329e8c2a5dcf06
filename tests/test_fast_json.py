"""relay.fast_json gives what json.loads gives: the same value (types included) or the same error."""
import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from relay import fast_json

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)


def same(a, b) -> bool:
    """Equal, with the same types all the way down (1 is not 1.0 here), NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def outcome(parse, data):
    try:
        return "ok", parse(data)
    except ValueError as exc:
        return "error", type(exc).__name__


@settings(max_examples=400, deadline=None)
@given(values, st.booleans())
def test_any_json_parses_to_the_same_value_as_bytes_and_as_text(value, ascii_only):
    text = json.dumps(value, ensure_ascii=ascii_only)
    for data in (text, text.encode("utf-8", "surrogatepass")):
        assert same(fast_json.loads(data), json.loads(data)), data


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40) | st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_any_bytes_give_the_same_value_or_the_same_error(data):
    mine, theirs = outcome(fast_json.loads, data), outcome(json.loads, data)
    assert mine[0] == theirs[0] and (same(mine[1], theirs[1]) if mine[0] == "ok" else mine == theirs), data


def test_what_orjson_reads_otherwise_goes_to_json_loads():
    for data in (b'{"n": 18446744073709551616}', b'{"n": -9223372036854775809}', b'[1e400]', b'[NaN, -Infinity]',
                 b'"\\ud800"', b'\xef\xbb\xbf{"a": 1}', b'"\xed\xa0\x80"', b'{"a": 12345678901234567890123}'):
        assert same(fast_json.loads(data), json.loads(data)), data
    assert type(fast_json.loads(b'{"completion_tokens": 99999999999999999999}')["completion_tokens"]) is int
    for bad in (b'{"a": 1}x', b"", b"{", b'{"\xff": 1}'):
        assert outcome(fast_json.loads, bad) == outcome(json.loads, bad), bad
