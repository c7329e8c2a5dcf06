"""The configuration as relay uses it: frozen, typed, built only by ``relay.config.parse``. Pure."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cached_property

from relay.config.fields import ANY_MODEL
from relay.config.prices import Price

__all__ = ["ANY_MODEL", "APIS", "Config", "HealthPolicy", "Limits", "Quota", "Retries", "Routing", "Site", "Timeouts",
           "Upstream"]

# The APIs an upstream may serve (its ``apis``); each proxy handler's ``route`` is one of them.
APIS = ("chat", "completions", "embeddings", "responses", "images", "audio", "moderations")

_GLOB_CHARS = frozenset("*?[")


def is_pattern(name: str) -> bool:
    """A model name with glob characters (``gpt-4o*``, ``o?-mini``) stands for every name it matches."""
    return not _GLOB_CHARS.isdisjoint(name)


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str  # without trailing slash, e.g. https://api.openai.com/v1
    keys: tuple[str, ...]
    disabled_keys: frozenset[str] = frozenset()  # disabled by the operator in the file
    weight: int = 1
    priority: int = 0
    models: tuple[str, ...] | None = None  # names or glob patterns (gpt-4o*); None means any model
    model_map: Mapping[str, str] = field(default_factory=dict)
    apis: frozenset[str] | None = None     # the APIs it serves (chat, embeddings, ...); None means all

    def serves(self, model: str, api: str | None = None) -> bool:
        """Whether requests for ``model`` (after the global map) on ``api`` may come here."""
        if api is not None and self.apis is not None and api not in self.apis:
            return False
        if self.models is None:
            return True
        names, patterns = self._model_matchers
        return model in names or any(fnmatchcase(model, p) for p in patterns)

    def serves_api(self, api: str | None) -> bool:
        return api is None or self.apis is None or api in self.apis

    @cached_property
    def _model_matchers(self) -> tuple[frozenset[str], tuple[str, ...]]:
        """Literal names for a set lookup, patterns apart (computed once: ``serves`` runs per request)."""
        models = self.models or ()
        return frozenset(m for m in models if not is_pattern(m)), tuple(m for m in models if is_pattern(m))


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 10.0
    first_byte_s: float = 120.0
    idle_s: float = 60.0  # longest silence between two stream chunks


@dataclass(frozen=True)
class HealthPolicy:
    interval_s: float = 10.0          # active probe (GET {base_url}/models) per endpoint
    probe_timeout_s: float = 5.0
    unhealthy_after: int = 2          # consecutive failed probes make an endpoint unavailable
    eject_after: int = 3              # consecutive connect errors, timeouts or 5xx eject an upstream
    base_ejection_s: float = 30.0     # ejection lasts base × times ejected ...
    max_ejection_s: float = 300.0     # ... capped here
    default_cooldown_s: float = 10.0  # a 429 without Retry-After rests the key this long
    max_cooldown_s: float = 300.0     # cap on Retry-After
    recheck_disabled_s: float = 60.0  # how often an auto-disabled key is retested


@dataclass(frozen=True)
class Retries:
    max_attempts: int = 3       # attempts per request, the first included
    budget_ratio: float = 0.2   # retries at most this share of recent requests ...
    budget_floor: int = 3       # ... but always at least this many per window
    budget_window_s: float = 10.0


@dataclass(frozen=True)
class Routing:
    # Cache affinity: requests that share a prompt prefix (or a prompt_cache_key) go to the same
    # endpoint of their tier, chosen by weighted rendezvous hashing, so the upstream's prompt cache
    # is warm. False: every request is placed by load alone (weighted power of two choices).
    affinity: bool = True
    # An endpoint with more than this multiple of its fair share (by weight) of the tier's requests
    # in flight takes no affinity traffic: the next endpoint in the key's ranking does.
    overload_factor: float = 2.0


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_upstream_connections: int = 512
    max_response_bytes: int = 32 * 1024 * 1024  # a non-streamed upstream reply, read whole
    max_event_bytes: int = 4 * 1024 * 1024      # one event of an upstream stream


@dataclass(frozen=True)
class Quota:
    # Completion allowance reserved when a request does not set max_tokens.
    default_max_tokens: int = 1024
    # The same by model pattern (``o*: 32768``), first match in file order, before the default.
    max_tokens_by_model: tuple[tuple[str, int], ...] = ()
    # Send the allowance relay reserved for as the request's max_tokens when the client set none
    # (off: it changes what the upstream does).
    forward_max_tokens: bool = False
    # Tokenizer by model pattern (``my-model*: o200k_base``), before the defaults by family.
    encodings: Mapping[str, str] = field(default_factory=dict)
    # Each process spends a leased slice of a key's balance locally, committing in groups
    # (relay/quota/lease_book.py), so requests wait for no store round trip. Read at start-up. False:
    # one reservation and one settlement in the store per request.
    leases: bool = True

    def allowance_for(self, model: str) -> int:
        """The completion tokens reserved for a request to ``model`` that set no limit."""
        for pattern, tokens in self.max_tokens_by_model:
            if fnmatchcase(model, pattern):
                return tokens
        return self.default_max_tokens


@dataclass(frozen=True)
class Site:
    """What the key holder's page shows: where to reach relay and where to buy keys."""

    primary_host: str | None = None   # e.g. api.example.com (snippets use it)
    backup_host: str | None = None    # e.g. api-backup.example.net
    usage_host: str | None = None     # "/" of this host serves the usage page
    shop_url: str | None = None       # where keys are bought and topped up
    scheme: str = "https"             # of the hostnames above


@dataclass(frozen=True)
class Config:
    upstreams: tuple[Upstream, ...]
    model_map: Mapping[str, str] = field(default_factory=dict)
    pricing: Mapping[str, Price] = field(default_factory=dict)
    default_price: Price | None = None
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    quota: Quota = Quota()
    health: HealthPolicy = HealthPolicy()
    retries: Retries = Retries()
    site: Site = Site()
    routing: Routing = Routing()

    def named_models(self) -> frozenset[str] | None:
        """Every model name a request may be served and counted under: the upstreams' models and
        both sides of every model map. None when an upstream serves any model, or a pattern of
        them: then any name may come."""
        names: set[str] = set(self.model_map) | set(self.model_map.values())
        for u in self.upstreams:
            if u.models is None or any(is_pattern(m) for m in u.models):
                return None
            names.update(u.models)
            names.update(u.model_map)
            names.update(u.model_map.values())
        return frozenset(names)

    def map_model(self, model: str) -> str:
        return self.model_map.get(model, model)

    def price_of(self, model: str) -> Price | None:
        return self.pricing.get(model, self.default_price)

    def client_model_names(self, api: str | None = None) -> list[str]:
        """Model names clients may ask for (on ``api``, or any): served names, the priced names an
        upstream's patterns (or "*") match, and aliases that reach them."""
        ups = [u for u in self.upstreams if u.serves_api(api)]
        named: set[str] = set()
        for u in ups:
            if u.models is None:
                named.update(self.pricing)
                continue
            for m in u.models:
                if is_pattern(m):
                    named.update(n for n in self.pricing if fnmatchcase(n, m))
                else:
                    named.add(m)
        named.update(a for a, target in self.model_map.items() if any(u.serves(target) for u in ups))
        return sorted(n for n in named if any(u.serves(self.map_model(n)) for u in ups))

    def warnings(self) -> list[str]:
        """What is valid but likely a mistake, as ``key.path: reason`` lines (``relay check-config``)."""
        out = []
        priced = set(self.pricing)
        for i, u in enumerate(self.upstreams):
            for j, m in enumerate(u.models or ()):
                if is_pattern(m) and not any(fnmatchcase(n, m) for n in priced):
                    out.append(f"upstreams[{i}].models[{j}]: pattern {m!r} matches no priced model "
                               f"(GET /models lists nothing for it)")
        return out
