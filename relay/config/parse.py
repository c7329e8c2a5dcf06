"""upstreams.yaml → the frozen config of ``relay.config.model``; every error names its key path.

Pure: no I/O beyond reading the file it is given.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar, overload
from urllib.parse import urlsplit

import yaml

from relay.config.fields import ConfigError, is_int, join, kind, mapping
from relay.config.model import (
    ANY_MODEL,
    APIS,
    Config,
    HealthPolicy,
    Limits,
    Quota,
    Retries,
    Routing,
    Site,
    Timeouts,
    Upstream,
)
from relay.config.prices import parse_pricing

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    D = TypeVar("D", bound=DataclassInstance)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Upper bounds: far beyond any sensible setting, low enough that no arithmetic on them breaks.
MAX_SECONDS = 86_400                # timeouts and intervals: longer than a day is a typo
MAX_WHOLE = 2**31 - 1               # counts and sizes: times a bounded price, costs stay inside int64
MAX_WEIGHT = 1_000_000              # weighted draws turn the sum of weights into a float
MAX_FACTOR = 1_000                  # routing.overload_factor: beyond it, overload never moves a request
ENCODINGS = ("cl100k_base", "o200k_base")  # the tokenizers relay ships (relay.metering.encodings)


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


def _config(data: Any, env: Mapping[str, str]) -> Config:
    if data is None:
        raise ConfigError("", "empty file: expected a mapping with 'upstreams'")
    top = mapping(data, "", {"upstreams", "model_map", "pricing", "timeouts", "limits", "quota", "health",
                              "retries", "site", "routing"}, {"upstreams"})
    raw_ups = top["upstreams"]
    if not isinstance(raw_ups, list) or not raw_ups:
        raise ConfigError("upstreams", "must be a non-empty list")
    upstreams = tuple(_upstream(u, f"upstreams[{i}]", env) for i, u in enumerate(raw_ups))
    seen: set[str] = set()
    for i, u in enumerate(upstreams):
        if u.name in seen:
            raise ConfigError(f"upstreams[{i}].name", f"duplicate name {u.name!r}")
        seen.add(u.name)
    pricing, default_price = parse_pricing(top.get("pricing", {}), "pricing")
    return Config(
        upstreams=upstreams,
        model_map=_str_map(top.get("model_map", {}), "model_map"),
        pricing=pricing,
        default_price=default_price,
        timeouts=_numbers(top.get("timeouts", {}), "timeouts", Timeouts),
        limits=_numbers(top.get("limits", {}), "limits", Limits),
        quota=_quota(top.get("quota", {}), "quota"),
        health=_numbers(top.get("health", {}), "health", HealthPolicy),
        retries=_numbers(top.get("retries", {}), "retries", Retries),
        site=_site(top.get("site", {}), "site"),
        routing=_routing(top.get("routing", {}), "routing"),
    )


def _routing(raw: Any, path: str) -> Routing:
    routing = _numbers(raw, path, Routing)
    if routing.overload_factor < 1:
        raise ConfigError(f"{path}.overload_factor", "must be at least 1 (a multiple of an endpoint's fair share)")
    return routing


def _site(raw: Any, path: str) -> Site:
    if raw is None:
        return Site()
    values = mapping(raw, path, {"primary_host", "backup_host", "usage_host", "shop_url", "scheme"})
    out: dict[str, str] = {}
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


_HOST = re.compile(r"(?=.{1,253}(:|$))[A-Za-z0-9]([A-Za-z0-9-]{0,62})"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*(:[0-9]{1,5})?")


def _upstream(raw: Any, path: str, env: Mapping[str, str]) -> Upstream:
    u = mapping(raw, path, {"name", "base_url", "keys", "weight", "priority", "models", "model_map", "apis"},
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
            entry = mapping(k, kp, {"key", "disabled"}, {"key"})
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
    if not is_int(weight) or not 1 <= weight <= MAX_WEIGHT:
        raise ConfigError(f"{path}.weight", f"must be a whole number >= 1 and <= {MAX_WEIGHT}")
    priority = u.get("priority", 0)
    if not is_int(priority) or priority < 0:
        raise ConfigError(f"{path}.priority", "must be a whole number >= 0 (0 = primary tier)")
    models = u.get("models", ANY_MODEL)
    if models == ANY_MODEL:
        model_tuple = None
    elif isinstance(models, list) and models and all(isinstance(m, str) and m for m in models):
        model_tuple = None if ANY_MODEL in models else tuple(models)  # ["*"]: every model, as "*"
    else:
        raise ConfigError(f"{path}.models", "must be \"*\" or a non-empty list of model names or patterns "
                                            "(gpt-4o*)")
    return Upstream(name=name, base_url=base_url.rstrip("/"), keys=tuple(expanded),
                    disabled_keys=frozenset(disabled), weight=weight,
                    priority=priority, models=model_tuple,
                    model_map=_str_map(u.get("model_map", {}), f"{path}.model_map"),
                    apis=_apis(u.get("apis"), f"{path}.apis") if "apis" in u else None)


def _apis(raw: Any, path: str) -> frozenset[str]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(path, f"must be a non-empty list of APIs ({', '.join(APIS)})")
    for i, api in enumerate(raw):
        if api not in APIS:
            raise ConfigError(f"{path}[{i}]", f"unknown API {api!r} (known: {', '.join(APIS)})")
    return frozenset(raw)


def _expand(value: str, path: str, env: Mapping[str, str]) -> str:
    """``${VAR}`` or ``${VAR:-default}``, as in the shell."""

    def sub(m: re.Match[str]) -> str:
        value = env.get(m.group(1))
        if value:
            return value
        default: str | None = m.group(2)
        if default is not None:
            return default
        raise ConfigError(path, f"environment variable {m.group(1)} is not set")

    return _ENV_REF.sub(sub, value)


def _str_map(raw: Any, path: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"must be a mapping of model name to model name, got {kind(raw)}")
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str) or not v:
            raise ConfigError(join(path, str(k)), "must map a model name to a model name")
    return dict(raw)


def _quota(raw: Any, path: str) -> Quota:
    """The quota section: numbers and switches, and two tables by model pattern."""
    if raw is None:
        return Quota()
    values = dict(mapping(raw, path, set(Quota.__dataclass_fields__) - {"max_tokens_by_model"}))
    by_model: tuple[tuple[str, int], ...] = ()
    allowance = values.get("default_max_tokens")
    if isinstance(allowance, dict):  # {"o*": 32768, "*": 1024}: a default by model pattern
        table = {str(k): _positive(v, join(f"{path}.default_max_tokens", str(k)), int)
                 for k, v in allowance.items()}
        values["default_max_tokens"] = table.pop(ANY_MODEL, Quota.default_max_tokens)
        by_model = tuple(table.items())
    encodings = values.pop("encodings", None)
    quota = _numbers(values, path, Quota)
    return replace(quota, max_tokens_by_model=by_model, encodings=_encodings(encodings, f"{path}.encodings"))


def _encodings(raw: Any, path: str) -> dict[str, str]:
    if raw is None:
        return {}
    table = _str_map(raw, path)
    for pattern, name in table.items():
        if name not in ENCODINGS:
            raise ConfigError(join(path, pattern), f"unknown encoding {name!r} (known: {', '.join(ENCODINGS)})")
    return table


def _numbers(raw: Any, path: str, cls: type[D]) -> D:
    """A section of positive numbers; each field's type follows its default (int or float)."""
    if raw is None:
        return cls()
    defaults = cls()
    values = mapping(raw, path, set(defaults.__dataclass_fields__))
    out: dict[str, bool | int | float] = {}
    for key, value in values.items():
        kind = type(getattr(defaults, key))
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{path}.{key}", "must be true or false")
            out[key] = value
            continue
        out[key] = _positive(value, f"{path}.{key}", kind)
    return cls(**out)


@overload
def _positive(value: Any, path: str, kind: type[int]) -> int: ...
@overload
def _positive(value: Any, path: str, kind: type[float]) -> float: ...
def _positive(value: Any, path: str, kind: type[int] | type[float]) -> int | float:
    """A number > 0 of the field's kind, finite and within the bound its name implies."""
    if kind is int:
        if not is_int(value) or value <= 0:
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
    if path.endswith("_factor"):
        return MAX_FACTOR, ""
    return math.inf, ""  # no other float setting exists; a new one names its bound here
