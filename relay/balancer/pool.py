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


@dataclass
class Pool:
    config: Config
    endpoints: list[Endpoint] = field(default_factory=list)

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

    def tiers_for(self, model: str) -> list[list[Endpoint]]:
        """Endpoints that serve ``model`` (already mapped), lowest tier first."""
        by_tier: dict[int, list[Endpoint]] = {}
        for ep in self.endpoints:
            if ep.upstream.serves(model):
                by_tier.setdefault(ep.tier, []).append(ep)
        return [by_tier[t] for t in sorted(by_tier)]

    def serves(self, model: str) -> bool:
        return any(u.serves(model) for u in self.config.upstreams)

    def pinned(self, upstream: str, fingerprint: str) -> Endpoint | None:
        """The endpoint of that upstream whose key has that fingerprint, if the file still has it."""
        return next((ep for ep in self.endpoints
                     if ep.upstream.name == upstream and ep.fingerprint == fingerprint), None)

    def any_available(self, now: float) -> bool:
        return any(ep.state(self.config, now).available for ep in self.endpoints)
