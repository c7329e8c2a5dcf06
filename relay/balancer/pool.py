"""The pool: endpoints (upstream × key) grouped by tier for each model. Pure."""
from __future__ import annotations

from dataclasses import dataclass, field

from relay.config import Config, Upstream


@dataclass(eq=False)
class Endpoint:
    upstream: Upstream
    key: str
    key_id: str  # "k0", "k1"...: names the key in logs and metrics without revealing it
    in_flight: int = 0

    @property
    def name(self) -> str:
        return f"{self.upstream.name}/{self.key_id}"

    @property
    def tier(self) -> int:
        return self.upstream.priority

    @property
    def weight(self) -> int:
        return self.upstream.weight

    def upstream_model(self, model: str) -> str:
        return self.upstream.model_map.get(model, model)


@dataclass
class Pool:
    config: Config
    endpoints: list[Endpoint] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: Config) -> "Pool":
        endpoints = [Endpoint(u, key, f"k{i}") for u in config.upstreams for i, key in enumerate(u.keys)]
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
