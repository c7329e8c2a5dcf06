"""upstreams.yaml → frozen, typed configuration; every error names its key path.

Pure: no I/O beyond what the caller hands in (text and an environment mapping).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

import yaml

ANY_MODEL = "*"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Upper bounds: far beyond any sensible setting, low enough that no arithmetic on them breaks.
MAX_SECONDS = 86_400                # timeouts and intervals: longer than a day is a typo
MAX_WHOLE = 2**31 - 1               # counts and sizes: times a bounded price, costs stay inside int64
MAX_WEIGHT = 1_000_000              # weighted draws turn the sum of weights into a float
MAX_PRICE = 1_000_000               # units per token (gpt-4-32k output is 80)
MAX_PRICE_DENOMINATOR = 1_000_000   # six decimals, or a fraction like "2/3": exact costs stay small
_PRICE_TEXT = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,20})?(?:/[0-9]{1,20})?")  # no exponents: "1e999999999"


class ConfigError(ValueError):
    """A config problem at a key path, e.g. ``upstreams[1].base_url: not an http(s) URL``."""

    def __init__(self, path: str, reason: str, source: str | None = None):
        self.path, self.reason, self.source = path, reason, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {reason}" if path else f"{where}{reason}")


@dataclass(frozen=True)
class Price:
    """Quota units per token: one unit is one gpt-3.5-turbo (4k) input token."""

    input: Fraction
    output: Fraction = Fraction(0)


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str  # without trailing slash, e.g. https://api.openai.com/v1
    keys: tuple[str, ...]
    disabled_keys: frozenset[str] = frozenset()  # disabled by the operator in the file
    weight: int = 1
    priority: int = 0
    models: tuple[str, ...] | None = None  # None means any model
    model_map: Mapping[str, str] = field(default_factory=dict)

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models


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
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_upstream_connections: int = 512
    max_response_bytes: int = 32 * 1024 * 1024  # a non-streamed upstream reply, read whole
    max_event_bytes: int = 4 * 1024 * 1024      # one event of an upstream stream


@dataclass(frozen=True)
class Quota:
    # Completion allowance reserved when a request does not set max_tokens.
    default_max_tokens: int = 1024
    # Each process spends a leased slice of a key's balance locally, committing in groups
    # (relay/quota/lease_book.py), so requests wait for no store round trip. Read at start-up. False:
    # one reservation and one settlement in the store per request.
    leases: bool = True


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

    def map_model(self, model: str) -> str:
        return self.model_map.get(model, model)

    def price_of(self, model: str) -> Price | None:
        return self.pricing.get(model, self.default_price)

    def client_model_names(self) -> list[str]:
        """Model names clients may ask for: served names and aliases that reach them."""
        named: set[str] = set()
        any_upstream = any(u.models is None for u in self.upstreams)
        for u in self.upstreams:
            named.update(u.models or ())
        if any_upstream:
            named.update(self.pricing)
        named.update(a for a, target in self.model_map.items()
                     if any(u.serves(target) for u in self.upstreams))
        return sorted(n for n in named if any(u.serves(self.map_model(n)) for u in self.upstreams))


# --- parsing -------------------------------------------------------------------------

def parse_config(text: str, env: Mapping[str, str], source: str | None = None) -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise ConfigError(where, f"not valid YAML ({getattr(exc, 'problem', exc)})", source) from None
    try:
        return _config(data, env)
    except ConfigError as exc:
        raise ConfigError(exc.path, exc.reason, source) from None


def load_config(path: str, env: Mapping[str, str]) -> Config:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read file ({exc.strerror})", path) from None
    return parse_config(text, env, source=path)


def _mapping(value: Any, path: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(path, f"must be a mapping, got {_kind(value)}")
    for key in value:
        if key not in allowed:
            raise ConfigError(_join(path, str(key)), f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for key in sorted(required):
        if key not in value:
            raise ConfigError(_join(path, key), "required")
    return value


def _config(data: Any, env: Mapping[str, str]) -> Config:
    if data is None:
        raise ConfigError("", "empty file: expected a mapping with 'upstreams'")
    top = _mapping(data, "", {"upstreams", "model_map", "pricing", "timeouts", "limits", "quota", "health",
                              "retries", "site"}, {"upstreams"})
    raw_ups = top["upstreams"]
    if not isinstance(raw_ups, list) or not raw_ups:
        raise ConfigError("upstreams", "must be a non-empty list")
    upstreams = tuple(_upstream(u, f"upstreams[{i}]", env) for i, u in enumerate(raw_ups))
    seen: set[str] = set()
    for i, u in enumerate(upstreams):
        if u.name in seen:
            raise ConfigError(f"upstreams[{i}].name", f"duplicate name {u.name!r}")
        seen.add(u.name)
    pricing, default_price = _pricing(top.get("pricing", {}), "pricing")
    return Config(
        upstreams=upstreams,
        model_map=_str_map(top.get("model_map", {}), "model_map"),
        pricing=pricing,
        default_price=default_price,
        timeouts=_numbers(top.get("timeouts", {}), "timeouts", Timeouts),
        limits=_numbers(top.get("limits", {}), "limits", Limits),
        quota=_numbers(top.get("quota", {}), "quota", Quota),
        health=_numbers(top.get("health", {}), "health", HealthPolicy),
        retries=_numbers(top.get("retries", {}), "retries", Retries),
        site=_site(top.get("site", {}), "site"),
    )


_HOST = re.compile(r"(?=.{1,253}(:|$))[A-Za-z0-9]([A-Za-z0-9-]{0,62})"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*(:[0-9]{1,5})?")


def _site(raw: Any, path: str) -> Site:
    if raw is None:
        return Site()
    values = _mapping(raw, path, {"primary_host", "backup_host", "usage_host", "shop_url", "scheme"})
    out = {}
    for key in ("primary_host", "backup_host", "usage_host"):
        if key in values:
            host = values[key]
            if not isinstance(host, str) or not _HOST.fullmatch(host):
                raise ConfigError(f"{path}.{key}", "must be a hostname such as api.example.com (a port may follow)")
            out[key] = host.lower()
    if "shop_url" in values:
        url = values["shop_url"]
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{path}.shop_url", "not an http(s) URL")
        out["shop_url"] = url
    if "scheme" in values:
        if values["scheme"] not in ("http", "https"):
            raise ConfigError(f"{path}.scheme", "must be http or https")
        out["scheme"] = values["scheme"]
    return Site(**out)


def _upstream(raw: Any, path: str, env: Mapping[str, str]) -> Upstream:
    u = _mapping(raw, path, {"name", "base_url", "keys", "weight", "priority", "models", "model_map"},
                 {"name", "base_url", "keys"})
    name = u["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(f"{path}.name", "must be 1-64 letters, digits, '_', '.' or '-'")
    if name.startswith(("sk-", "ak-")):
        raise ConfigError(f"{path}.name", "must not look like a key: names appear in logs and metrics")
    base_url = u["base_url"]
    parts = urlsplit(base_url) if isinstance(base_url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{path}.base_url", "not an http(s) URL")
    if parts.query or parts.fragment:
        raise ConfigError(f"{path}.base_url", "must not carry a query or fragment")
    if "@" in parts.netloc:  # said without echoing them: this message reaches logs and the admin API
        raise ConfigError(f"{path}.base_url", "must not carry credentials (user:password@): relay authenticates "
                                              "with the upstream's keys, sent as a bearer header")
    keys = u["keys"]
    if not isinstance(keys, list) or not keys:
        raise ConfigError(f"{path}.keys", "must be a non-empty list of strings")
    expanded, disabled = [], set()
    for i, k in enumerate(keys):
        kp = f"{path}.keys[{i}]"
        if isinstance(k, dict):  # {key: ..., disabled: true}: kept in the file, out of rotation
            entry = _mapping(k, kp, {"key", "disabled"}, {"key"})
            if not isinstance(entry.get("disabled", False), bool):
                raise ConfigError(f"{kp}.disabled", "must be true or false")
            k, off = entry["key"], entry.get("disabled", False)
            kp = f"{kp}.key"
        else:
            off = False
        if not isinstance(k, str) or not k.strip():
            raise ConfigError(kp, "must be a non-empty string")
        expanded.append(_expand(k.strip(), kp, env))
        if off:
            disabled.add(expanded[-1])
    if len(set(expanded)) != len(expanded):
        raise ConfigError(f"{path}.keys", "lists the same key twice")
    weight = u.get("weight", 1)
    if not _is_int(weight) or not 1 <= weight <= MAX_WEIGHT:
        raise ConfigError(f"{path}.weight", f"must be a whole number >= 1 and <= {MAX_WEIGHT}")
    priority = u.get("priority", 0)
    if not _is_int(priority) or priority < 0:
        raise ConfigError(f"{path}.priority", "must be a whole number >= 0 (0 = primary tier)")
    models = u.get("models", ANY_MODEL)
    if models == ANY_MODEL:
        model_tuple = None
    elif isinstance(models, list) and models and all(isinstance(m, str) and m for m in models):
        model_tuple = tuple(models)
    else:
        raise ConfigError(f"{path}.models", "must be \"*\" or a non-empty list of model names")
    return Upstream(name=name, base_url=base_url.rstrip("/"), keys=tuple(expanded),
                    disabled_keys=frozenset(disabled), weight=weight,
                    priority=priority, models=model_tuple,
                    model_map=_str_map(u.get("model_map", {}), f"{path}.model_map"))


def _expand(value: str, path: str, env: Mapping[str, str]) -> str:
    """``${VAR}`` or ``${VAR:-default}``, as in the shell."""

    def sub(m: re.Match) -> str:
        value = env.get(m.group(1))
        if value:
            return value
        if m.group(2) is not None:
            return m.group(2)
        raise ConfigError(path, f"environment variable {m.group(1)} is not set")

    return _ENV_REF.sub(sub, value)


def _str_map(raw: Any, path: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"must be a mapping of model name to model name, got {_kind(raw)}")
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str) or not v:
            raise ConfigError(_join(path, str(k)), "must map a model name to a model name")
    return dict(raw)


def _pricing(raw: Any, path: str) -> tuple[dict[str, Price], Price | None]:
    if raw is None:
        return {}, None
    if not isinstance(raw, dict):
        raise ConfigError(path, f"must be a mapping of model name to {{input, output}}, got {_kind(raw)}")
    prices = {}
    for model, entry in raw.items():
        p = _join(path, str(model))
        e = _mapping(entry, p, {"input", "output"}, {"input"})
        prices[str(model)] = Price(_fraction(e["input"], f"{p}.input"),
                                   _fraction(e.get("output", 0), f"{p}.output"))
    default = prices.pop(ANY_MODEL, None)
    return prices, default


def _fraction(value: Any, path: str) -> Fraction:
    """Multipliers are exact: an int, a decimal as written, or a fraction string like "2/3"."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, "must be a finite number")
    frac = None
    if _is_int(value) or isinstance(value, float) or (isinstance(value, str) and _PRICE_TEXT.fullmatch(value)):
        try:
            frac = Fraction(str(value))
        except (ValueError, ZeroDivisionError):
            pass
    if frac is None or frac < 0:
        raise ConfigError(path, "must be a number >= 0 or a fraction like \"2/3\"")
    if frac > MAX_PRICE:
        raise ConfigError(path, f"must be at most {MAX_PRICE} units per token")
    if frac.denominator > MAX_PRICE_DENOMINATOR:
        raise ConfigError(path, f"too fine: use at most six decimals, or a fraction like \"2/3\" with a "
                                f"denominator up to {MAX_PRICE_DENOMINATOR}")
    return frac


def _numbers(raw: Any, path: str, cls: type):
    """A section of positive numbers; each field's type follows its default (int or float)."""
    if raw is None:
        return cls()
    defaults = cls()
    values = _mapping(raw, path, set(defaults.__dataclass_fields__))
    out = {}
    for key, value in values.items():
        kind = type(getattr(defaults, key))
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{path}.{key}", "must be true or false")
            out[key] = value
            continue
        out[key] = _positive(value, f"{path}.{key}", kind)
    return cls(**out)


def _positive(value: Any, path: str, kind: type) -> int | float:
    """A number > 0 of the field's kind, finite and within the bound its name implies."""
    if kind is int:
        if not _is_int(value) or value <= 0:
            raise ConfigError(path, "must be a whole number > 0")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(path, "must be a finite number > 0")  # `not 0 < nan` holds: nan lands here
    most, why = _upper_bound(path, kind)
    if value > most:
        raise ConfigError(path, f"must be at most {most}{why}")
    return kind(value)


def _upper_bound(path: str, kind: type) -> tuple[float, str]:
    if kind is int:
        return MAX_WHOLE, ""
    if path.endswith("_s"):
        return MAX_SECONDS, " seconds (a day)"
    if path.endswith("_ratio"):
        return 1, " (a share of requests)"
    return math.inf, ""  # no other float setting exists; a new one names its bound here


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(type(v), type(v).__name__)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
