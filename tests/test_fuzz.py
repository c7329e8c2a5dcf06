"""Property-based fuzz over every client and admin route: never a 500, always OpenAI's shape."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ADMIN_TOKEN
from tests.helpers import TEST_KEY

# Integers up to and beyond what BSON can hold (int64), both ways.
EDGE_INTS = st.sampled_from([2**31, 2**53, 2**62, 2**63 - 1, 2**63, 2**64, 10**20, 10**30, -(2**63), -(2**63) - 1,
                             -(2**64)])
big_ints = EDGE_INTS | st.integers(-2**70, 2**70)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | big_ints | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
models = st.sampled_from(["gpt-4", "gpt-3.5-turbo", "text-embedding-ada-002", "", "x" * 300, "gpt-4\x00", "其他"])
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", 5, None])},
                                          optional={"content": json_values, "name": json_values}), max_size=3)
chat_bodies = st.fixed_dictionaries({}, optional={
    "model": models | json_values, "messages": messages | json_values, "stream": st.booleans() | json_values,
    "max_tokens": st.integers(-5, 10**9) | big_ints | json_values, "n": st.integers(-2, 300) | big_ints,
    "max_completion_tokens": st.integers(-5, 10**9) | big_ints,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values}) | json_values,
    "input": json_values | st.lists(st.text(max_size=10), max_size=3),
    "quota": st.integers(-10, 10**6) | big_ints | json_values,
    "note": json_values})
# JSON nested deeper than Python's recursion limit, as raw bytes; and a few hundred levels in an embedding input.
deep_bodies = st.integers(1_000, 100_000).map(lambda d: b"[" * d) | \
    st.integers(1_000, 50_000).map(lambda d: b'{"a":' * d) | \
    st.integers(300, 1_000).map(lambda d: b'{"model":"text-embedding-ada-002","input":' + b"[" * d + b"]" * d + b"}")
bodies = chat_bodies.map(lambda b: json.dumps(b).encode()) | json_values.map(lambda v: json.dumps(v).encode()) | \
    st.binary(max_size=200) | deep_bodies
ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/openai/v1/chat/completions"), ("POST", "/v1/embeddings"),
          ("GET", "/v1/models"), ("GET", "/dashboard/billing/subscription"),
          ("GET", "/v1/dashboard/billing/usage?start_date=2026-01-01&end_date=2026-02-01"),
          ("GET", "/usage/api/summary"), ("POST", "/admin/keys"), ("GET", "/admin/keys/ak-test0000"),
          ("POST", "/admin/keys/ak-test0000/topup"), ("POST", "/admin/keys/nokey/disable"),
          ("GET", "/admin/upstreams"), ("POST", "/admin/reload"), ("GET", "/v1/files"), ("DELETE", "/v1/models"),
          ("PUT", "/v1/chat/completions"),
          ("POST", "/v1/images/generations"), ("POST", "/v1/images/edits"), ("POST", "/openai/v1/images/variations"),
          ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/translations"), ("POST", "/v1/audio/speech")]
auths = st.sampled_from([None, f"Bearer {TEST_KEY}", f"Bearer {ADMIN_TOKEN}", "Bearer ak-" + "0" * 40, "Basic x",
                         "Bearer", "Bearer sk-upstream"])
queries = st.sampled_from(["", "?start_date=x&end_date=y", "?start_date=2026-13-01&end_date=2026-01-01",
                           "?start_date=2026-01-01"])

CASES = {"n": 0}


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), body=bodies, auth=auths, query=queries,
       content_type=st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=x"]))
def test_no_input_gets_a_500(http_server_client, services, io_loop, route, body, auth, query, content_type):
    services.throttle.delay_s = services.admin_throttle.delay_s = 0.0  # bad keys and tokens still turn into
    # 429s; the fuzz need not wait for them
    method, path = route
    if "usage?" in path:
        path = path.split("?")[0] + (query or "?start_date=2026-01-01&end_date=2026-02-01")
    headers = {"Content-Type": content_type}
    if auth:
        headers["Authorization"] = auth
    resp = io_loop.run_sync(lambda: http_server_client.fetch(
        path, method=method, headers=headers, raise_error=False, allow_nonstandard_methods=True,
        body=body if method in ("POST", "PUT", "DELETE") else None))
    CASES["n"] += 1
    assert resp.code != 500 and resp.code < 600, (resp.code, resp.body[:300])
    if resp.code >= 400:
        err = json.loads(resp.body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)


def test_fuzz_ran_its_cases():
    print(f"\nfuzz cases run: {CASES['n']}")
    assert CASES["n"] >= 1500
