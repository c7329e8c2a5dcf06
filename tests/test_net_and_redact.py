"""Who the client is (forwarded headers from trusted proxies only) and what never leaves relay (keys)."""
import ipaddress

from relay.net import client_address, parse_trusted
from relay.redact import mask_key, redact_path, scrub


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

