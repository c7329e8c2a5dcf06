"""Client address behind reverse proxies: X-Forwarded-* is believed only from trusted hops. Pure."""
from __future__ import annotations

import ipaddress
from typing import TypeAlias

# The trusted proxies' networks, as ``parse_trusted`` makes them.
Networks: TypeAlias = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def _trusted(ip: str, trusted: Networks) -> bool:
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def parse_trusted(specs: list[str]) -> Networks:
    return tuple(ipaddress.ip_network(s.strip(), strict=False) for s in specs if s.strip())


def client_address(remote_ip: str, forwarded_for: str | None, forwarded_proto: str | None,
                   scheme: str, trusted: Networks) -> tuple[str, str]:
    """(client ip, scheme): walk X-Forwarded-For from the right, skipping trusted proxies."""
    if not trusted or not _trusted(remote_ip, trusted):
        return remote_ip, scheme
    ip = remote_ip
    for hop in reversed([h.strip() for h in (forwarded_for or "").split(",") if h.strip()]):
        ip = hop
        if not _trusted(hop, trusted):
            break
    proto = (forwarded_proto or "").split(",")[-1].strip().lower()
    return ip, proto if proto in ("http", "https") else scheme
