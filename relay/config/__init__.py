"""upstreams.yaml → frozen, typed configuration; every error names its key path. Pure."""
from relay.config.fields import ConfigError
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
from relay.config.parse import load_config, parse_config
from relay.config.prices import Price

__all__ = ["ANY_MODEL", "APIS", "Config", "ConfigError", "HealthPolicy", "Limits", "Price", "Quota", "Retries",
           "Routing", "Site", "Timeouts", "Upstream", "load_config", "parse_config"]
