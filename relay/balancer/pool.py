"""The pool: endpoints (upstream × key) grouped by tier for each model, with their health. Pure."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

from relay.balancer.health import EndpointHealth, HealthState, UpstreamHealth, endpoint_state
from relay.config import Config, Upstream


@dataclass(eq=False)
class Endpoint:
    upstream: Upstream
    key: str
    key_id: str  # "k0", "k1"...: names the key in logs and metrics without revealing anything of it
    health: EndpointHealth
    upstream_health: UpstreamHealth
    # Names the endpoint in rendezvous hashing (balancer/affinity.py): the same on every process and
    # machine, and unchanged when other keys are added, removed or reordered. One-way: the key stays secret.
    seed: bytes = b""

    def __post_init__(self) -> None:
        if not self.seed:
            self.seed = hashlib.blake2b(f"{self.upstream.name}\0{self.key}".encode(), digest_size=16).digest()

    @property
    def name(self) -> str:
        return f"{self.upstream.name}/{self.key_id}"

    @cached_property
    def fingerprint(self) -> str:
        """Which upstream account the key is, never the key: the first 16 hex digits of its SHA-256."""
        return hashlib.sha256(self.key.encode()).hexdigest()[:16]

    @property
    def tier(self) -> int:
        return self.upstream.priority

    @property
    def weight(self) -> int:
        return self.upstream.weight

    @property
    def in_flight(self) -> int:
        return self.health.in_flight

    @property
    def operator_disabled(self) -> bool:
        return self.key in self.upstream.disabled_keys

    def upstream_model(self, model: str) -> str:
        return self.upstream.model_map.get(model, model)

    def state(self, config: Config, now: float) -> HealthState:
        return endpoint_state(self.health, self.upstream_health, self.operator_disabled, config.health, now)


# tiers_for's answers kept per pool; a pool serving "*" could otherwise keep one per junk model name.
MAX_CACHED_TIERS = 1024


@dataclass
class Pool:
    config: Config
    endpoints: list[Endpoint] = field(default_factory=list)
    _tiers: dict[tuple[str, str | None], list[list[Endpoint]]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, config: Config, previous: Pool | None = None) -> Pool:
        """A pool for ``config``; health carries over for endpoints that did not change.

        An endpoint is the same when its upstream's name and base URL and its key are; new
        endpoints start healthy but unproven.
        """
        old_ep = {(e.upstream.name, e.upstream.base_url, e.key): e.health for e in previous.endpoints} \
            if previous else {}
        old_up = {(e.upstream.name, e.upstream.base_url): e.upstream_health for e in previous.endpoints} \
            if previous else {}
        endpoints = []
        for u in config.upstreams:
            up_health = old_up.get((u.name, u.base_url)) or UpstreamHealth()
            for i, key in enumerate(u.keys):
                health = old_ep.get((u.name, u.base_url, key)) or EndpointHealth()
                endpoints.append(Endpoint(u, key, f"k{i}", health, up_health))
        return cls(config, endpoints)

    def tiers_for(self, model: str, api: str | None = None) -> list[list[Endpoint]]:
        """Endpoints that serve ``model`` (already mapped) on ``api`` (any when None), lowest tier first;
        those the operator disabled in the file are never tried, so they are left out.

        The same for the pool's whole life (health is judged apart), so computed once per model and API."""
        tiers = self._tiers.get((model, api))
        if tiers is None:
            by_tier: dict[int, list[Endpoint]] = {}
            for ep in self.endpoints:
                if ep.upstream.serves(model, api) and not ep.operator_disabled:
                    by_tier.setdefault(ep.tier, []).append(ep)
            tiers = [by_tier[t] for t in sorted(by_tier)]
            if len(self._tiers) >= MAX_CACHED_TIERS:
                self._tiers.clear()
            self._tiers[(model, api)] = tiers
        return tiers

    def serves(self, model: str, api: str | None = None) -> bool:
        return any(u.serves(model, api) for u in self.config.upstreams)

    def pinned(self, upstream: str, fingerprint: str) -> Endpoint | None:
        """The endpoint of that upstream whose key has that fingerprint, if the file still has it."""
        return next((ep for ep in self.endpoints
                     if ep.upstream.name == upstream and ep.fingerprint == fingerprint), None)

    def any_available(self, now: float) -> bool:
        return any(ep.state(self.config, now).available for ep in self.endpoints)
