"""upstreams.yaml → frozen, typed configuration; every error names its key path. Pure."""
from relay.config.fields import ConfigError
from relay.config.model import ANY_MODEL, Config, HealthPolicy, Limits, Quota, Retries, Site, Timeouts, Upstream
from relay.config.parse import load_config, parse_config
from relay.config.prices import Price

__all__ = ["ANY_MODEL", "Config", "ConfigError", "HealthPolicy", "Limits", "Price", "Quota", "Retries", "Site",
           "Timeouts", "Upstream", "load_config", "parse_config"]
